# Twins-SVT-L + Mask2Former, ADE20K 512x512, 160k iterations, 8x2 images.
_base_ = ['./_base_/seg_mask2former_160k.py']
checkpoint = 'https://download.openmmlab.com/mmsegmentation/v0.5/pretrain/twins/alt_gvt_large_20220308-fb5936f3.pth'  # noqa: E501
# Official segmentation code trains SVT-L with drop path 0.3 (0.2 elsewhere).
model = dict(
    backbone=dict(
        type='TwinsSVT', arch='large', drop_path_rate=0.3,
        init_cfg=dict(checkpoint=checkpoint)),
    decode_head=dict(in_channels=[128, 256, 512, 1024]))
