# Shared by the Twins ADE20K configs: data, runtime and test-time augmentation.
_base_ = [
    'mmseg::_base_/datasets/ade20k.py',
    'mmseg::_base_/default_runtime.py',
]
default_scope = 'mmseg'
custom_imports = dict(imports=['twins_mm'], allow_failed_imports=False)

# Multi-scale + flip test (``--tta``). Official ratios 0.5..1.75 are ratios of the test
# scale (2048, 512); mmseg's base multiplies the raw image size instead, so state the scales.
img_ratios = [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]
tta_pipeline = [
    dict(type='LoadImageFromFile', backend_args=None),
    dict(
        type='TestTimeAug',
        transforms=[
            [dict(type='Resize', scale=(int(2048 * r), int(512 * r)), keep_ratio=True)
             for r in img_ratios],
            [dict(type='RandomFlip', prob=0., direction='horizontal'),
             dict(type='RandomFlip', prob=1., direction='horizontal')],
            [dict(type='LoadAnnotations')],
            [dict(type='PackSegInputs')],
        ])
]
