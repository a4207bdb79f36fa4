# Cascade Mask R-CNN + FPN, COCO 3x (36 epochs, multi-scale with crops), 8x2 images:
# mmdet's ConvNeXt recipe
# convnext/cascade-mask-rcnn_convnext-t-p4-w7_fpn_4conv1fc-giou_amp-ms-crop-3x_coco.py with a
# Twins backbone (mmdet 3.3 ships no Swin Cascade Mask R-CNN; this is its transformer-era
# 3x cascade recipe). Its three 4conv1fc box heads with SyncBN and GIoU loss, mask head, the
# DETR-style multi-scale + crop pipeline (the same policy as the Twins 3x configs),
# warm-up of 1000 iterations, steps at epochs 27 and 33 and mixed precision stay as they
# are. Leaf configs set the backbone type/arch/checkpoint and the neck's in_channels.
# What differs, and why:
_base_ = [
    'mmdet::convnext/cascade-mask-rcnn_convnext-t-p4-w7_fpn_4conv1fc-giou_amp-ms-crop-3x_coco.py'
]
# The recipe imports mmpretrain for ConvNeXt; twins_mm registers the Twins backbones.
custom_imports = dict(imports=['twins_mm'], allow_failed_imports=False)

# Twins instead of ConvNeXt, the four stages to the FPN as ConvNeXt's. Drop path 0.2 for all
# six: the official Twins detection code's value (docs/reference.md 1.8), instead of
# ConvNeXt-T's 0.4.
model = dict(
    backbone=dict(
        _delete_=True,
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.2,
        init_cfg=dict(type='Pretrained', checkpoint=None)))

# The recipe's LearningRateDecayOptimizerConstructor (layer-wise lr decay 0.7 over 6 layers,
# with lr 2e-4) knows only ConvNeXt's and BEiT's layer names and raises for any other
# backbone. In its place, the 3x optimiser that Swin's and Twins' own Mask R-CNN 3x recipes
# use (docs/reference.md 5.3): AdamW lr 1e-4, weight decay 0.05 (the recipe's), no weight
# decay on the PEG and the norms (keys match twins_mm's module names by substring:
# 'pos_block' = the PEG convs; 'norm' = norm1/norm2, attn.norm, patch_embeds.*.norm,
# norm_list; the heads' SyncBN layers are named 'bn' and keep their decay). fp16 with
# dynamic loss scaling, as the recipe; without a GPU tools/train.py trains in fp32.
optim_wrapper = dict(
    _delete_=True,
    type='AmpOptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(custom_keys={
        'pos_block': dict(decay_mult=0.),
        'norm': dict(decay_mult=0.),
    }))
