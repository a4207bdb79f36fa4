# Twins-SVT-L + Semantic FPN, ADE20K 512x512, 80k iterations, 4 GPUs x 4 images
# (global batch 16, the paper's).
_base_ = ['./_base_/seg_fpn_80k.py']
checkpoint = 'https://download.openmmlab.com/mmsegmentation/v0.5/pretrain/twins/alt_gvt_large_20220308-fb5936f3.pth'  # noqa: E501
# Official segmentation code hard-codes drop path 0.3 for SVT-L (0.2 elsewhere).
model = dict(
    backbone=dict(
        type='TwinsSVT', arch='large', drop_path_rate=0.3,
        init_cfg=dict(checkpoint=checkpoint)),
    neck=dict(in_channels=[128, 256, 512, 1024]))
