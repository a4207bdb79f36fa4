# Shared by the Twins COCO configs: mmdet's runtime, plus the import that registers the
# backbones, so the configs also run with upstream mmdet tools.
_base_ = ['mmdet::_base_/default_runtime.py']
default_scope = 'mmdet'
custom_imports = dict(imports=['twins_mm'], allow_failed_imports=False)
# Backbone settings of every Twins detector; the detector bases put them in model.backbone.
twins_backbone = dict(
    _delete_=True,
    out_indices=(0, 1, 2, 3),
    drop_path_rate=0.2,  # the official detection code hard-codes 0.2 for all six variants
    init_cfg=dict(type='Pretrained', checkpoint=None))
