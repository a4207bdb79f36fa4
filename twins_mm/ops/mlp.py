"""The block MLP ``residual + fc2(GELU(fc1(x)))``: its reference and two fast paths.

- :func:`gelu_mlp_reference`: plain modules, the definition the others must equal.
- :class:`GeluRecomputeMlp` (training): saves fc1's output but not GELU's and recomputes
  GELU in backward. Autograd would keep both hidden-width tensors (4C or 8C wide, the
  largest activations of a block). Autocast-aware: it computes in autocast's dtype in
  forward and in backward (which runs outside the autocast region) alike.
- :func:`gelu_mlp_cpu_inference`: oneDNN kernels with GELU and the residual fused in, in
  row chunks on large maps.
"""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cpu_fused import linear_gelu_fused, linear_residual_fused
from .dispatch import autocast_dtype


def gelu_mlp_reference(x: torch.Tensor, fc1: nn.Linear, fc2: nn.Linear,
                       residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    out = fc2(F.gelu(fc1(x)))
    return out if residual is None else residual + out


class GeluRecomputeMlp(torch.autograd.Function):
    """``fc2(GELU(fc1(x)))`` from raw tensors, recomputing GELU in backward."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2):
        inputs = (x, w1, b1, w2, b2)
        ctx.dtypes = [t.dtype for t in inputs]
        # Under autocast: cast once, as autocast would, then compute with it off so that
        # backward (which autocast does not cover) sees exactly the forward's dtypes.
        dtype = autocast_dtype(x) or x.dtype
        ctx.device_type = x.device.type
        x, w1, b1, w2, b2 = (t.to(dtype) for t in inputs)
        with torch.autocast(ctx.device_type, enabled=False):
            h = F.linear(x, w1, b1)
            out = F.linear(F.gelu(h), w2, b2)
        ctx.save_for_backward(x, h, w1, w2)
        return out

    @staticmethod
    def backward(ctx, dy):
        x, h, w1, w2 = ctx.saved_tensors
        need = ctx.needs_input_grad
        grads = [None] * 5
        with torch.autocast(ctx.device_type, enabled=False):
            dy = dy.to(h.dtype)
            dy2 = dy.reshape(-1, dy.shape[-1])
            # One hidden-width buffer serves GELU(h), then dy @ w2, then dh: fresh buffers
            # of this size cost a page-faulting pass each on CPU.
            buf = torch.empty_like(h)
            if need[3]:
                gelu_h = torch.ops.aten.gelu.out(h, out=buf)
                grads[3] = dy2.t() @ gelu_h.reshape(-1, h.shape[-1])
            if need[4]:
                grads[4] = dy2.sum(0)
            if need[0] or need[1] or need[2]:
                torch.matmul(dy, w2, out=buf)
                dh = torch.ops.aten.gelu_backward.grad_input(buf, h, grad_input=buf)
                dh = dh.reshape(-1, h.shape[-1])
                if need[1]:
                    grads[1] = dh.t() @ x.reshape(-1, x.shape[-1])
                if need[2]:
                    grads[2] = dh.sum(0)
                if need[0]:
                    grads[0] = (dh @ w1).reshape(x.shape)
        return tuple(g if g is None else g.to(dt) for g, dt in zip(grads, ctx.dtypes))


def gelu_mlp_recompute(x: torch.Tensor, fc1: nn.Linear, fc2: nn.Linear,
                       residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    out = GeluRecomputeMlp.apply(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias)
    return out if residual is None else residual + out


# Above this many hidden-layer elements (16 MiB in fp32) the inference MLP runs in chunks.
CHUNK_THRESHOLD = 2 ** 22
CHUNK_ELEMENTS = 2 ** 20  # 4 MiB of hidden activation per chunk


def gelu_mlp_cpu_inference(x: torch.Tensor, fc1: nn.Linear, fc2: nn.Linear,
                           residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Fused oneDNN kernels; large maps a few thousand tokens at a time.

    The stride-4/8 MLPs are bound by the memory traffic of their hidden activation (4C or
    8C wide; 32-64 MiB at stride 4) and its page faults, not by their multiply-adds: in
    4 MiB chunks it stays in cache and is never allocated in full.
    """
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] * fc1.out_features <= CHUNK_THRESHOLD:
        return linear_residual_fused(linear_gelu_fused(x, fc1), fc2, residual)
    res = residual.reshape(rows.shape) if residual is not None else None
    out = torch.empty_like(rows)
    step = max(256, CHUNK_ELEMENTS // fc1.out_features)
    for start in range(0, rows.shape[0], step):
        part = slice(start, start + step)
        hidden = linear_gelu_fused(rows[part], fc1)
        out[part] = linear_residual_fused(hidden, fc2, None if res is None else res[part])
    return out.view(x.shape)
