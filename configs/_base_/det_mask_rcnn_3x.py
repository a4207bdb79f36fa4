_base_ = ['./det_mask_rcnn.py', './det_schedule_3x.py']
train_pipeline = [
    dict(type='LoadImageFromFile', backend_args={{_base_.backend_args}}),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='RandomFlip', prob=0.5),
    {{_base_.ms_train_policy}},
    dict(type='PackDetInputs')
]
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))
# Official: fp16 with a static loss scale of 512. mmengine's AmpOptimWrapper needs a GPU;
# without a GPU tools/train.py trains it in fp32 (OptimWrapper) and says so.
optim_wrapper = dict(type='AmpOptimWrapper', loss_scale=512.)
