# Twins-SVT-S DINO 4-scale, COCO 12 epochs, 8x2 images.
_base_ = ['./_base_/det_dino_4scale_12e.py']
checkpoint = 'https://download.openmmlab.com/mmsegmentation/v0.5/pretrain/twins/alt_gvt_small_20220308-7e1c3695.pth'  # noqa: E501
model = dict(
    backbone=dict(type='TwinsSVT', arch='small', init_cfg=dict(checkpoint=checkpoint)),
    neck=dict(in_channels=[128, 256, 512]))  # stages 1-3 (strides 8, 16, 32)
