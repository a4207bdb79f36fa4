# Twins-SVT-L DINO 4-scale, COCO 12 epochs, 8x2 images.
_base_ = ['./_base_/det_dino_4scale_12e.py']
checkpoint = 'https://download.openmmlab.com/mmsegmentation/v0.5/pretrain/twins/alt_gvt_large_20220308-fb5936f3.pth'  # noqa: E501
model = dict(
    backbone=dict(type='TwinsSVT', arch='large', init_cfg=dict(checkpoint=checkpoint)),
    neck=dict(in_channels=[256, 512, 1024]))  # stages 1-3 (strides 8, 16, 32)
