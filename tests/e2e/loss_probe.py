"""A test-only hook: the training loss averaged over all ranks, one JSON line per iteration.

mmengine logs rank 0's own loss; with DDP the loss that the averaged gradient belongs to is
the mean over ranks, which is what a single process with the same global batch computes.
"""
import json

import torch
import torch.distributed as dist
from mmengine.hooks import Hook
from mmengine.registry import HOOKS


@HOOKS.register_module(force=True)
class GlobalLossProbeHook(Hook):

    def __init__(self, out_file: str):
        self.out_file = out_file

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        loss = outputs['loss'].detach().clone().double()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(loss)
            loss /= dist.get_world_size()
        if runner.rank == 0:
            lr = runner.optim_wrapper.get_lr()['lr'][0]
            with open(self.out_file, 'a') as f:
                f.write(json.dumps(dict(iter=runner.iter + 1, loss=float(loss), lr=lr)) + '\n')
