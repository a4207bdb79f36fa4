# Twins-PCPVT-S Cascade Mask R-CNN, COCO 3x (36 epochs, multi-scale), 8x2 images.
_base_ = ['./_base_/det_cascade_mask_rcnn_3x.py']
checkpoint = 'https://download.openmmlab.com/mmsegmentation/v0.5/pretrain/twins/pcpvt_small_20220308-e638c41c.pth'  # noqa: E501
model = dict(
    backbone=dict(type='TwinsPCPVT', arch='small', init_cfg=dict(checkpoint=checkpoint)),
    neck=dict(in_channels=[64, 128, 320, 512]))
