"""LSA window partition and merge: the traceable reference and a one-pass copy.

Layouts: the q/k/v map is ``(B, H, W, 3 * C)`` (q | k | v, each split into heads), the
windows ``(3, B * nh * nw, heads, ws * ws, d)``; the attention output goes back from
``(B * nh * nw, heads, ws * ws, d)`` to ``(B, H, W, C)``. Maps that are not whole windows
are zero-padded right/bottom (the padded keys are masked by the caller, the padded queries
dropped by the merge).

- :func:`partition_reference` / :func:`merge_reference`: pad, reshape, permute, crop. Any
  tracer follows them; autograd derives their backward.
- :class:`PartitionOnePass` / :class:`MergeOnePass`: every token goes straight to its window
  slot (only the pad slots are zeroed; pad + permute fills the whole padded map, then copies
  it twice), each with the inverse copy as its backward (autograd through in-place copies
  into views clones the whole gradient once per copy).
"""
from typing import Tuple

import torch
import torch.nn.functional as F


def window_counts(H: int, W: int, ws: int) -> Tuple[int, int]:
    """Windows per column and per row; integer ceil, which dynamic-shape tracing can prove."""
    return (H + ws - 1) // ws, (W + ws - 1) // ws


def partition_reference(qkv: torch.Tensor, ws: int, heads: int) -> torch.Tensor:
    B, H, W, C3 = qkv.shape
    d = C3 // (3 * heads)
    # Window counts first, pads from them: the padded side is then nh * ws by
    # construction, which symbolic (dynamic-shape) tracing can prove.
    nh, nw = window_counts(H, W, ws)
    qkv = F.pad(qkv, (0, 0, 0, nw * ws - W, 0, nh * ws - H))
    qkv = qkv.reshape(B, nh, ws, nw, ws, 3, heads, d)
    return qkv.permute(5, 0, 1, 3, 6, 2, 4, 7).reshape(3, B * nh * nw, heads, ws * ws, d)


def merge_reference(out: torch.Tensor, B: int, H: int, W: int, ws: int) -> torch.Tensor:
    _, heads, _, d = out.shape
    nh, nw = window_counts(H, W, ws)
    out = out.reshape(B, nh, nw, heads, ws, ws, d).permute(0, 1, 4, 2, 5, 3, 6)
    return out.reshape(B, nh * ws, nw * ws, heads * d)[:, :H, :W]


def _window_parts(n: int, ws: int):
    """Splits a side of n tokens into its whole windows and the last, partial one.

    Yields (window index, in-window slice, map slice, split shape): indexing the windowed
    view with the first two and the map with the third selects the same tokens, and the
    map part reshaped to the split shape lines up with the windowed part.
    """
    full, rest = divmod(n, ws)
    if full:
        yield slice(0, full), slice(None), slice(0, full * ws), (full, ws)
    if rest:
        yield full, slice(0, rest), slice(full * ws, n), (rest, )


def _scatter_to_windows(src: torch.Tensor, dst: torch.Tensor, ws: int) -> None:
    """Copies a (B, H, W, *tail) map into a (B, nh, ws, nw, ws, *tail) windowed view."""
    B, H, W = src.shape[:3]
    tail = src.shape[3:]
    for ri, rin, rows, rshape in _window_parts(H, ws):
        for ci, cin, cols, cshape in _window_parts(W, ws):
            dst[:, ri, rin, ci, cin].copy_(src[:, rows, cols].reshape(B, *rshape, *cshape, *tail))
    if H % ws:
        dst[:, -1, H % ws:].zero_()
    if W % ws:
        dst[:, :, :, -1, W % ws:].zero_()


def _gather_from_windows(src: torch.Tensor, dst: torch.Tensor, ws: int) -> None:
    """The inverse: (B, nh, ws, nw, ws, *tail) windowed view -> (B, H, W, *tail) map."""
    B, H, W = dst.shape[:3]
    tail = dst.shape[3:]
    for ri, rin, rows, rshape in _window_parts(H, ws):
        for ci, cin, cols, cshape in _window_parts(W, ws):
            dst[:, rows, cols].view(B, *rshape, *cshape, *tail).copy_(src[:, ri, rin, ci, cin])


# The windowed layouts seen as (B, nh, ws, nw, ws, ...) maps: q/k/v windows are
# (3, B, nh, nw, heads, ws, ws, d), attention output windows (B, nh, nw, heads, ws, ws, d).
_QKV_WINDOWS_AS_MAP = (1, 2, 5, 3, 6, 0, 4, 7)
_OUT_WINDOWS_AS_MAP = (0, 1, 4, 2, 5, 3, 6)


class PartitionOnePass(torch.autograd.Function):
    """Same result as :func:`partition_reference`; the backward is the inverse gather."""

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, ws: int, heads: int) -> torch.Tensor:
        B, H, W, C3 = qkv.shape
        d = C3 // (3 * heads)
        nh, nw = window_counts(H, W, ws)
        ctx.shape, ctx.ws = (B, H, W, nh, nw, heads, d), ws
        out = qkv.new_empty(3, B, nh, nw, heads, ws, ws, d)
        _scatter_to_windows(qkv.view(B, H, W, 3, heads, d), out.permute(_QKV_WINDOWS_AS_MAP), ws)
        return out.view(3, B * nh * nw, heads, ws * ws, d)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (B, H, W, nh, nw, heads, d), ws = ctx.shape, ctx.ws
        windows = grad.reshape(3, B, nh, nw, heads, ws, ws, d).permute(_QKV_WINDOWS_AS_MAP)
        dqkv = grad.new_empty(B, H, W, 3, heads, d)
        _gather_from_windows(windows, dqkv, ws)
        return dqkv.view(B, H, W, 3 * heads * d), None, None


class MergeOnePass(torch.autograd.Function):
    """Same result as :func:`merge_reference`; the backward is the inverse scatter."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, B: int, H: int, W: int, ws: int) -> torch.Tensor:
        _, heads, _, d = out.shape
        nh, nw = window_counts(H, W, ws)
        ctx.shape, ctx.ws = (B, H, W, nh, nw, heads, d), ws
        merged = out.new_empty(B, H, W, heads, d)
        _gather_from_windows(out.view(B, nh, nw, heads, ws, ws, d).permute(_OUT_WINDOWS_AS_MAP),
                             merged, ws)
        return merged.view(B, H, W, heads * d)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (B, H, W, nh, nw, heads, d), ws = ctx.shape, ctx.ws
        windows = grad.new_empty(B, nh, nw, heads, ws, ws, d)
        _scatter_to_windows(grad.reshape(B, H, W, heads, d),
                            windows.permute(_OUT_WINDOWS_AS_MAP), ws)
        return windows.view(B * nh * nw, heads, ws * ws, d), None, None, None, None


def window_key_mask(H: int, W: int, ws: int, device: torch.device) -> torch.Tensor:
    """(num_windows, 1, 1, ws*ws) boolean mask, True where the key is a real token."""
    nh, nw = window_counts(H, W, ws)
    rows = torch.arange(nh * ws, device=device) < H
    cols = torch.arange(nw * ws, device=device) < W
    valid = rows[:, None] & cols[None, :]
    return valid.reshape(nh, ws, nw, ws).permute(0, 2, 1, 3).reshape(nh * nw, 1, 1, ws * ws)
