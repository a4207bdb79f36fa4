_base_ = ['./det_mask_rcnn.py', './det_schedule_1x.py']
optim_wrapper = dict(optimizer=dict(lr=2e-4))  # the official Mask R-CNN 1x doubles the lr
