_base_ = ['./det_retinanet.py', './det_schedule_1x.py']
