# Twins-SVT-B + UPerNet, ADE20K 512x512, 160k iterations, 8 GPUs x 2 images
# (global batch 16, the paper's).
_base_ = ['./_base_/seg_upernet_160k.py']
checkpoint = 'https://download.openmmlab.com/mmsegmentation/v0.5/pretrain/twins/alt_gvt_base_20220308-1b7eb711.pth'  # noqa: E501
model = dict(
    backbone=dict(
        type='TwinsSVT', arch='base',
        init_cfg=dict(checkpoint=checkpoint)),
    decode_head=dict(in_channels=[96, 192, 384, 768]),
    auxiliary_head=dict(in_channels=384))
