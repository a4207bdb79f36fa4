# Official 1x ("pvt setting"): AdamW lr 1e-4, weight decay 1e-4, no paramwise rules;
# mmdet's schedule_1x already has LinearLR warm-up 500 iterations from 0.001,
# MultiStepLR at epochs 8 and 11 and 12 epochs (docs/reference.md 5.3).
_base_ = ['mmdet::_base_/schedules/schedule_1x.py']
optim_wrapper = dict(
    optimizer=dict(_delete_=True, type='AdamW', lr=1e-4, betas=(0.9, 0.999),
                   weight_decay=1e-4))
