"""The fast paths of the Twins layers, each beside the plain reference it must equal.

The model (:mod:`twins_mm.models.twins`) calls only the functions below; each asks
:func:`twins_mm.ops.dispatch.select_path` which implementation runs.
"""
from typing import Callable, Optional

import torch
import torch.nn as nn

from . import cpu_fused, drop_path, mlp, windows
from .compile import compile_forward
from .dispatch import Path, exporting, graph_capture, select_path

__all__ = ['compile_forward', 'linear_residual', 'gelu_mlp', 'partition_windows', 'merge_windows',
           'window_key_mask', 'stochastic_depth', 'select_path', 'Path', 'graph_capture',
           'exporting']

window_key_mask = windows.window_key_mask


def linear_residual(x: torch.Tensor, layer: nn.Linear,
                    residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``residual + layer(x)``, or ``layer(x)`` without a residual."""
    if select_path(x) is Path.CPU_INFERENCE:
        return cpu_fused.linear_residual_fused(x, layer, residual)
    return cpu_fused.linear_residual_reference(x, layer, residual)


def gelu_mlp(x: torch.Tensor, fc1: nn.Linear, fc2: nn.Linear,
             residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``residual + fc2(GELU(fc1(x)))``."""
    path = select_path(x)
    if path is Path.TRAINING:
        return mlp.gelu_mlp_recompute(x, fc1, fc2, residual)
    if path is Path.CPU_INFERENCE:
        return mlp.gelu_mlp_cpu_inference(x, fc1, fc2, residual)
    return mlp.gelu_mlp_reference(x, fc1, fc2, residual)


def partition_windows(qkv: torch.Tensor, ws: int, heads: int) -> torch.Tensor:
    """(B, H, W, 3C) q/k/v map -> (3, B * windows, heads, ws * ws, d) zero-padded windows."""
    if select_path(qkv) is Path.GRAPH:
        return windows.partition_reference(qkv, ws, heads)
    return windows.PartitionOnePass.apply(qkv, ws, heads)


def merge_windows(out: torch.Tensor, B: int, H: int, W: int, ws: int) -> torch.Tensor:
    """(B * windows, heads, ws * ws, d) attention output -> (B, H, W, C), padding dropped."""
    if select_path(out) is Path.GRAPH:
        return windows.merge_reference(out, B, H, W, ws)
    return windows.MergeOnePass.apply(out, B, H, W, ws)


def stochastic_depth(x: torch.Tensor, branch: drop_path.Branch, keep_prob: float,
                     draw_keep: Callable[[int, torch.device], torch.Tensor]) -> torch.Tensor:
    """``x + branch(x) * keep / keep_prob`` with ``keep = draw_keep(batch, device)``."""
    if select_path(x) is Path.GRAPH:
        # The draw on the model's device: a graph (CUDA graphs too) holds no host tensor.
        keep = draw_keep(x.shape[0], x.device)
        return drop_path.stochastic_depth_multiply(x, branch, keep, keep_prob)
    keep = draw_keep(x.shape[0], torch.device('cpu'))
    return drop_path.stochastic_depth_skip(x, branch, keep, keep_prob)
