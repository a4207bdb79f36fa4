# DINO 4-scale, COCO 12 epochs, 8x2 images: mmdet's dino/dino-4scale_r50_8xb2-12e_coco.py
# with a Twins backbone, the way mmdet's Swin DINO recipe (dino-5scale_swin-l_8xb2-12e_coco.py)
# puts in a transformer backbone. Its 900 queries, denoising groups, 6-layer deformable
# encoder and decoder, losses, multi-scale + crop pipeline, AdamW lr 1e-4 / weight decay
# 1e-4, gradient clipping at 0.1, backbone at 0.1x the lr and the step at epoch 11 stay as
# they are. Leaf configs set the backbone type/arch/checkpoint and the neck's in_channels
# (the widths of stages 1-3). What differs, and why:
_base_ = [
    'mmdet::dino/dino-4scale_r50_8xb2-12e_coco.py',
    './twins_no_decay.py',
]
custom_imports = dict(imports=['twins_mm'], allow_failed_imports=False)

# 4 scales as in the recipe: the backbone gives strides 8, 16 and 32 (stages 1-3, as ResNet's
# out_indices (1, 2, 3)) and the ChannelMapper adds the fourth level (stride 64) with a
# stride-2 conv on the last map. Stage 0 still runs (it feeds stage 1); only its map is not
# returned. Drop path 0.2 for all six: the official Twins detection code's value
# (docs/reference.md 1.8), which is also what the Swin-L DINO recipe uses.
model = dict(
    backbone=dict(
        _delete_=True,
        out_indices=(1, 2, 3),
        drop_path_rate=0.2,
        init_cfg=dict(type='Pretrained', checkpoint=None)))

# The recipe's backbone lr multiplier (key 'backbone': 0.1), plus Twins' rule: no weight decay
# on the PEG and the backbone's norms (keys in twins_no_decay.py, longer than 'backbone' so
# that they apply), at the same 0.1x lr.
optim_wrapper = dict(
    paramwise_cfg=dict(
        custom_keys={
            'backbone': dict(lr_mult=0.1),
            **{key: dict(lr_mult=0.1, decay_mult=0.0)
               for key in _base_.twins_backbone_no_decay_keys},
        }))
