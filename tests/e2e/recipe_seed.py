"""A test-only hook: reseeds torch before every training iteration from the iteration number.

Mask2Former (importance point sampling) and DINO (denoising queries) draw random numbers from
torch's generator while training. mmengine does not checkpoint that generator's state, so a
run resumed at iteration k would draw other numbers than the uninterrupted run draws from
iteration k + 1 on. Seeding every iteration from ``seed + iteration`` makes the draws of an
iteration the same in both runs, which is what lets the tests compare them number for number.
"""
import torch
from mmengine.hooks import Hook
from mmengine.registry import HOOKS


@HOOKS.register_module(force=True)
class PerIterationSeedHook(Hook):

    priority = 'VERY_HIGH'

    def __init__(self, seed: int = 0):
        self.seed = seed

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        torch.manual_seed(self.seed + runner.iter)
