# Mask2Former (semantic), ADE20K 512x512, 160k iterations, 8x2 images: mmseg's Swin recipe
# mask2former/mask2former_swin-t_8xb2-160k_ade20k-512x512.py with a Twins backbone. Its
# data pipeline, crop size, head (100 queries, 6-layer deformable pixel decoder, 9-layer
# decoder), losses, AdamW lr 1e-4 / weight decay 0.05 / eps 1e-8, gradient clipping at
# 0.01, poly schedule and 160k iterations stay as they are. Leaf configs set the backbone
# type/arch/checkpoint and the head's in_channels (the four Twins widths, which the head
# hands to its pixel decoder). What differs, and why:
_base_ = [
    'mmseg::mask2former/mask2former_swin-t_8xb2-160k_ade20k-512x512.py',
    './twins_no_decay.py',
]
# The recipe imports mmdet.models (Mask2Former's pixel decoder and assigner live there);
# twins_mm registers the backbones.
custom_imports = dict(imports=['mmdet.models', 'twins_mm'], allow_failed_imports=False)

# Twins instead of Swin, all four stages to the pixel decoder as Swin's. Drop path 0.2 (SVT-L:
# 0.3, in its leaf): the values the official Twins segmentation code trains every ADE20K model
# with (docs/reference.md 1.8), instead of the recipe's 0.3 for Swin.
model = dict(
    backbone=dict(
        _delete_=True,
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.2,
        init_cfg=dict(type='Pretrained', checkpoint=None)))

# The recipe's rules, for Twins' modules: the whole backbone at 0.1x the lr, its norms (and
# here the PEG, Twins' position encoding, as the recipe does for Swin's position tables) with
# no weight decay, the queries and level embeddings with no weight decay. The Swin keys
# (patch_embed.norm, stages.*, relative_position_bias_table, ...) match nothing in Twins and
# are dropped. Other norms (the heads' GroupNorm / LayerNorm) get no decay via the recipe's
# norm_decay_mult=0.
backbone_no_decay = dict(lr_mult=0.1, decay_mult=0.0)
embed_no_decay = dict(lr_mult=1.0, decay_mult=0.0)
optim_wrapper = dict(
    paramwise_cfg=dict(
        custom_keys={
            '_delete_': True,
            'backbone': dict(lr_mult=0.1, decay_mult=1.0),
            'query_embed': embed_no_decay,
            'query_feat': embed_no_decay,
            'level_embed': embed_no_decay,
            **{key: backbone_no_decay for key in _base_.twins_backbone_no_decay_keys},
        },
        norm_decay_mult=0.0))
