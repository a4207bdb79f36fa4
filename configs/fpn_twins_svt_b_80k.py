# Twins-SVT-B + Semantic FPN, ADE20K 512x512, 80k iterations, 4 GPUs x 4 images
# (global batch 16, the paper's).
_base_ = ['./_base_/seg_fpn_80k.py']
checkpoint = 'https://download.openmmlab.com/mmsegmentation/v0.5/pretrain/twins/alt_gvt_base_20220308-1b7eb711.pth'  # noqa: E501
model = dict(
    backbone=dict(
        type='TwinsSVT', arch='base',
        init_cfg=dict(checkpoint=checkpoint)),
    neck=dict(in_channels=[96, 192, 384, 768]))
