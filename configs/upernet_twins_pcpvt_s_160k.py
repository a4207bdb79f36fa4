# Twins-PCPVT-S + UPerNet, ADE20K 512x512, 160k iterations, 8 GPUs x 4 images
# (global batch 32, as the official log; the paper states 16).
_base_ = ['./_base_/seg_upernet_160k.py']
checkpoint = 'https://download.openmmlab.com/mmsegmentation/v0.5/pretrain/twins/pcpvt_small_20220308-e638c41c.pth'  # noqa: E501
model = dict(
    backbone=dict(
        type='TwinsPCPVT', arch='small',
        init_cfg=dict(checkpoint=checkpoint)),
    decode_head=dict(in_channels=[64, 128, 320, 512]),
    auxiliary_head=dict(in_channels=320))
# The official PCPVT-S UPerNet run used 4 images/GPU (global batch 32 in its log).
train_dataloader = dict(batch_size=4)
# Its lr 6e-5 went with that batch of 32: --auto-scale-lr scales from 32, not from 16.
auto_scale_lr = dict(enable=False, base_batch_size=32)
