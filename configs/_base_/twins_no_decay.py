# Twins' no-weight-decay rule as mmengine ``custom_keys``, for recipes that also scale the
# whole backbone's learning rate with a key ``'backbone'`` (Mask2Former, DINO).
#
# The rule (official UPerNet and 3x detection recipes, docs/reference.md 4.3 and 5.3): no
# weight decay on the PEG (twins_mm module ``pos_block``) and on every LayerNorm. The other
# Twins configs write it as the short keys ``'pos_block'`` and ``'norm'``. mmengine's
# DefaultOptimWrapperConstructor applies only the longest key that matches a parameter's name,
# so next to ``'backbone'`` (8 characters) those short keys would never apply to a backbone
# parameter. These keys are longer than ``'backbone'`` and name the Twins modules, as mmseg's
# Swin Mask2Former recipes enumerate Swin's norms block by block:
#   backbone.pos_block                 the PEG convs of the four stages
#   backbone.norm_list                 SVT's per-stage output norms (PCPVT: no parameters)
#   backbone.patch_embeds.{i}.norm     the norm of each patch embedding (not its conv)
#   backbone.blocks.{i}.{j}.norm       norm1 and norm2 of block j of stage i
#   backbone.blocks.{i}.{j}.attn.norm  the norm after the GSA reduction conv (sr > 1)
# One list serves all six variants: per stage it counts the most blocks any variant has
# (stages 0-2: PCPVT-L's 3, 8 and 27; stage 3: SVT-S's 4; docs/reference.md 1.2). A key of a
# block that a variant lacks matches nothing.
_most_blocks_per_stage = (3, 8, 27, 4)
twins_backbone_no_decay_keys = (
    ['backbone.pos_block', 'backbone.norm_list'] +
    [f'backbone.patch_embeds.{i}.norm' for i in range(4)] +
    [f'backbone.blocks.{i}.{j}.{norm}'
     for i, blocks in enumerate(_most_blocks_per_stage) for j in range(blocks)
     for norm in ('norm', 'attn.norm')])
del _most_blocks_per_stage
