# Twins-SVT-S + UPerNet, ADE20K 512x512, 160k iterations, 8 GPUs x 2 images
# (global batch 16, the paper's).
_base_ = ['./_base_/seg_upernet_160k.py']
checkpoint = 'https://download.openmmlab.com/mmsegmentation/v0.5/pretrain/twins/alt_gvt_small_20220308-7e1c3695.pth'  # noqa: E501
model = dict(
    backbone=dict(
        type='TwinsSVT', arch='small',
        init_cfg=dict(checkpoint=checkpoint)),
    decode_head=dict(in_channels=[64, 128, 256, 512]),
    auxiliary_head=dict(in_channels=256))
