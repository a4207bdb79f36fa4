# Mask R-CNN + FPN with a Twins backbone on COCO, single-scale 1333x800, 2 images/GPU
# (docs/reference.md 5.1-5.2). Leaf configs set the backbone type/arch/checkpoint and the
# neck's in_channels; a schedule base adds the optimiser and epochs.
_base_ = [
    'mmdet::_base_/models/mask-rcnn_r50_fpn.py',
    'mmdet::_base_/datasets/coco_instance.py',
    './det_runtime.py',
]
# mmdet's FPN (start_level 0, num_outs 5, P6 by max-pool) and RPN / RoI heads here are the
# official ones.
model = dict(backbone={{_base_.twins_backbone}})
