# Twins-PCPVT-L + Mask2Former, ADE20K 512x512, 160k iterations, 8x2 images.
_base_ = ['./_base_/seg_mask2former_160k.py']
checkpoint = 'https://download.openmmlab.com/mmsegmentation/v0.5/pretrain/twins/pcpvt_large_20220308-37579dc6.pth'  # noqa: E501
model = dict(
    backbone=dict(
        type='TwinsPCPVT', arch='large',
        init_cfg=dict(checkpoint=checkpoint)),
    decode_head=dict(in_channels=[64, 128, 320, 512]))
