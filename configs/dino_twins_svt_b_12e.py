# Twins-SVT-B DINO 4-scale, COCO 12 epochs, 8x2 images.
_base_ = ['./_base_/det_dino_4scale_12e.py']
checkpoint = 'https://download.openmmlab.com/mmsegmentation/v0.5/pretrain/twins/alt_gvt_base_20220308-1b7eb711.pth'  # noqa: E501
model = dict(
    backbone=dict(type='TwinsSVT', arch='base', init_cfg=dict(checkpoint=checkpoint)),
    neck=dict(in_channels=[192, 384, 768]))  # stages 1-3 (strides 8, 16, 32)
