# RetinaNet + FPN with a Twins backbone on COCO, single-scale 1333x800, 2 images/GPU
# (docs/reference.md 5.1-5.2). Leaf configs set the backbone type/arch/checkpoint and the
# neck's in_channels; a schedule base adds the optimiser and epochs.
_base_ = [
    'mmdet::_base_/models/retinanet_r50_fpn.py',
    'mmdet::_base_/datasets/coco_detection.py',
    './det_runtime.py',
]
# mmdet's FPN here already is the official one: start_level 1 (the stride-4 map is unused),
# add_extra_convs='on_input' (P6/P7 from C5), num_outs 5.
model = dict(backbone={{_base_.twins_backbone}})
