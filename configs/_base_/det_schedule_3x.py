# Official 3x: AdamW lr 1e-4, weight decay 0.05 with none on the PEG and the norms,
# warm-up 500 iterations from 0.001, steps at epochs 27 and 33, 36 epochs
# (docs/reference.md 5.3), and the DETR-style multi-scale train policy of 5.1, which the
# detector bases put between RandomFlip and PackDetInputs.
_base_ = ['mmdet::_base_/schedules/schedule_1x.py']
max_epochs = 36
train_cfg = dict(max_epochs=max_epochs)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[27, 33],
         gamma=0.1)
]
# Keys match twins_mm's module names by substring: 'pos_block' = the PEG convs, 'norm' =
# norm1/norm2, attn.norm, patch_embeds.*.norm and norm_list (and the heads' norms, if any).
optim_wrapper = dict(
    optimizer=dict(_delete_=True, type='AdamW', lr=1e-4, betas=(0.9, 0.999),
                   weight_decay=0.05),
    paramwise_cfg=dict(custom_keys={
        'pos_block': dict(decay_mult=0.),
        'norm': dict(decay_mult=0.),
    }))

ms_scales = [(short, 1333) for short in range(480, 801, 32)]
ms_train_policy = dict(
    type='RandomChoice',
    transforms=[
        [dict(type='RandomChoiceResize', scales=ms_scales, keep_ratio=True)],
        [
            dict(type='RandomChoiceResize', scales=[(400, 1333), (500, 1333), (600, 1333)],
                 keep_ratio=True),
            dict(type='RandomCrop', crop_type='absolute_range', crop_size=(384, 600),
                 allow_negative_crop=True),
            dict(type='RandomChoiceResize', scales=ms_scales, keep_ratio=True),
        ],
    ])
