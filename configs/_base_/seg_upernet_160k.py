# UPerNet, 160k iterations ("swin setting"): the official effective settings
# (docs/reference.md 4.1-4.4). Leaf configs set the backbone type/arch/checkpoint and
# the decode/auxiliary heads' in_channels (auxiliary head: stage 2, C_2 channels).
_base_ = [
    'mmseg::_base_/models/upernet_r50.py',
    'mmseg::_base_/schedules/schedule_160k.py',
    './seg_ade20k_runtime.py',
]
# Heads keep the official SyncBN: mmengine's Runner reverts it to BN when not distributed,
# and tools/train.py swaps it for BN on CPU-only distributed runs (torch SyncBN needs a GPU).
crop_size = (512, 512)
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    pretrained=None,
    backbone=dict(
        _delete_=True,
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.2,
        init_cfg=dict(type='Pretrained', checkpoint=None)),
    decode_head=dict(num_classes=150),
    auxiliary_head=dict(num_classes=150))

# No weight decay on the PEG (twins_mm module ``pos_block``) and on every LayerNorm
# (substring ``norm``: norm1/norm2, attn.norm, patch_embeds.*.norm, norm_list.*).
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=6e-5, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=dict(custom_keys={
        'pos_block': dict(decay_mult=0.),
        'norm': dict(decay_mult=0.),
    }),
    clip_grad=None)
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type='PolyLR', power=1.0, eta_min=0.0, begin=1500, end=160000, by_epoch=False),
]
train_dataloader = dict(batch_size=2)
# The paper's global batch: 16 = 8 GPUs x 2 images (the official configs and logs).
# --auto-scale-lr scales lr by (GPUs x train_dataloader.batch_size) / 16.
auto_scale_lr = dict(enable=False, base_batch_size=16)
