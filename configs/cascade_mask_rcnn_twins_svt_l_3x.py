# Twins-SVT-L Cascade Mask R-CNN, COCO 3x (36 epochs, multi-scale), 8x2 images.
_base_ = ['./_base_/det_cascade_mask_rcnn_3x.py']
checkpoint = 'https://download.openmmlab.com/mmsegmentation/v0.5/pretrain/twins/alt_gvt_large_20220308-fb5936f3.pth'  # noqa: E501
model = dict(
    backbone=dict(type='TwinsSVT', arch='large', init_cfg=dict(checkpoint=checkpoint)),
    neck=dict(in_channels=[128, 256, 512, 1024]))
