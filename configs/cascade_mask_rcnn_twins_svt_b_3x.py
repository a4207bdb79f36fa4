# Twins-SVT-B Cascade Mask R-CNN, COCO 3x (36 epochs, multi-scale), 8x2 images.
_base_ = ['./_base_/det_cascade_mask_rcnn_3x.py']
checkpoint = 'https://download.openmmlab.com/mmsegmentation/v0.5/pretrain/twins/alt_gvt_base_20220308-1b7eb711.pth'  # noqa: E501
model = dict(
    backbone=dict(type='TwinsSVT', arch='base', init_cfg=dict(checkpoint=checkpoint)),
    neck=dict(in_channels=[96, 192, 384, 768]))
