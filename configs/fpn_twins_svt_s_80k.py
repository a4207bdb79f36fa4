# Twins-SVT-S + Semantic FPN, ADE20K 512x512, 80k iterations, 4 GPUs x 4 images
# (global batch 16, the paper's).
_base_ = ['./_base_/seg_fpn_80k.py']
checkpoint = 'https://download.openmmlab.com/mmsegmentation/v0.5/pretrain/twins/alt_gvt_small_20220308-7e1c3695.pth'  # noqa: E501
model = dict(
    backbone=dict(
        type='TwinsSVT', arch='small',
        init_cfg=dict(checkpoint=checkpoint)),
    neck=dict(in_channels=[64, 128, 256, 512]))
