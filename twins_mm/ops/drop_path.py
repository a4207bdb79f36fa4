"""Stochastic depth of one residual branch: ``x + branch(x) * keep / keep_prob`` per sample.

- :func:`stochastic_depth_multiply` (reference, and the graph path): the branch runs on the
  whole batch and dropped samples are multiplied by zero. No data-dependent shapes.
- :func:`stochastic_depth_skip` (eager): dropped samples skip the branch entirely, saving
  about ``drop_prob`` of its compute and activation memory. The draw is made on the CPU, so
  which samples to keep is known without a device synchronisation; their indices reach the
  device through pinned memory, asynchronously.

``branch(x, residual=None)`` computes ``residual + f(x)`` (``f(x)`` without a residual), so
that an unscaled residual add can be fused into its last kernel.
"""
from typing import Callable

import torch

Branch = Callable[..., torch.Tensor]


def stochastic_depth_multiply(x: torch.Tensor, branch: Branch, keep: torch.Tensor,
                              keep_prob: float) -> torch.Tensor:
    weight = keep.to(x.device, x.dtype).div(keep_prob).view(-1, *[1] * (x.dim() - 1))
    return x + branch(x) * weight


def _to_device_async(index: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == 'cpu':
        return index
    return index.pin_memory().to(device, non_blocking=True)


def stochastic_depth_skip(x: torch.Tensor, branch: Branch, keep: torch.Tensor,
                          keep_prob: float) -> torch.Tensor:
    """``keep`` must be a CPU tensor (reading it must not wait for the device)."""
    kept = keep.nonzero().flatten()
    scale = 1. / keep_prob
    if len(kept) == len(keep):
        return torch.add(x, branch(x), alpha=scale)
    if len(kept) == 0:
        # Every parameter must still get a (zero) gradient, or DDP without
        # find_unused_parameters fails: one sample, added with weight 0.
        kept, scale = kept.new_zeros(1), 0.
    kept = _to_device_async(kept, x.device)
    # The branch may compute in autocast's lower precision; the residual stream keeps its own.
    out = branch(x.index_select(0, kept)).to(x.dtype)
    return x.index_add(0, kept, out, alpha=scale)
