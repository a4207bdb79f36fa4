"""Twins-PCPVT and Twins-SVT backbones (Chu et al., NeurIPS 2021) for OpenMMLab 2.0.

Inside the backbone the token map is kept as a channels-last ``(B, H, W, C)`` tensor:
LayerNorm and Linear act on the last dimension, and the convolutions (patch embedding,
PEG, GSA sub-sampling) see it through a free ``permute`` as a channels-last NCHW tensor.
Module names follow the official (and timm) checkpoint keys, so those files load as-is.
"""
import copy
import math
import warnings
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from mmengine.model import BaseModule
from mmengine.model.weight_init import constant_init, normal_init, trunc_normal_init

MIN_INPUT_SIZE = 32

# The paper's six variants (reference section 1.2).
PCPVT_ARCHS: Dict[str, dict] = {
    'small': dict(embed_dims=[64, 128, 320, 512], num_heads=[1, 2, 5, 8], mlp_ratios=[8, 8, 4, 4],
                  depths=[3, 4, 6, 3], sr_ratios=[8, 4, 2, 1]),
    'base': dict(embed_dims=[64, 128, 320, 512], num_heads=[1, 2, 5, 8], mlp_ratios=[8, 8, 4, 4],
                 depths=[3, 4, 18, 3], sr_ratios=[8, 4, 2, 1]),
    'large': dict(embed_dims=[64, 128, 320, 512], num_heads=[1, 2, 5, 8], mlp_ratios=[8, 8, 4, 4],
                  depths=[3, 8, 27, 3], sr_ratios=[8, 4, 2, 1]),
}
SVT_ARCHS: Dict[str, dict] = {
    'small': dict(embed_dims=[64, 128, 256, 512], num_heads=[2, 4, 8, 16], mlp_ratios=[4, 4, 4, 4],
                  depths=[2, 2, 10, 4], sr_ratios=[8, 4, 2, 1], window_sizes=[7, 7, 7, 7]),
    'base': dict(embed_dims=[96, 192, 384, 768], num_heads=[3, 6, 12, 24], mlp_ratios=[4, 4, 4, 4],
                 depths=[2, 2, 18, 2], sr_ratios=[8, 4, 2, 1], window_sizes=[7, 7, 7, 7]),
    'large': dict(embed_dims=[128, 256, 512, 1024], num_heads=[4, 8, 16, 32],
                  mlp_ratios=[4, 4, 4, 4], depths=[2, 2, 18, 2], sr_ratios=[8, 4, 2, 1],
                  window_sizes=[7, 7, 7, 7]),
}
ARCH_ALIASES = {'s': 'small', 'b': 'base', 'l': 'large'}


def _graph_capture() -> bool:
    """True while torch.compile / torch.export / ONNX export / jit.trace see the model."""
    return (torch.compiler.is_compiling() or torch.compiler.is_exporting()
            or torch.onnx.is_in_onnx_export() or torch.jit.is_tracing())


def _exporting() -> bool:
    return torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export()


_MKLDNN_LINEAR = (getattr(torch.ops.mkldnn, '_linear_pointwise', None)
                  if torch.backends.mkldnn.is_available() else None)


def _use_fused_cpu_kernels(x: torch.Tensor) -> bool:
    """oneDNN's fused linear kernels have no autograd: inference only, fp32 CPU, eager."""
    # Graph capture first: tracers must not see the eager-only checks after it.
    return (not _graph_capture() and _MKLDNN_LINEAR is not None
            and not torch.is_grad_enabled() and x.device.type == 'cpu'
            and x.dtype == torch.float32)


def linear(x: torch.Tensor, layer: nn.Linear, gelu: bool = False,
           residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``residual + act(layer(x))`` with the activation or the residual add fused in.

    On CPU the bias add, the GELU and the residual add are each a full pass over a large
    activation; oneDNN does them inside the matrix multiply (~1.8x faster for fc1 + GELU).
    """
    assert not (gelu and residual is not None)
    if _use_fused_cpu_kernels(x):
        if residual is not None and residual.is_contiguous():
            return _MKLDNN_LINEAR.binary(x, residual, layer.weight, layer.bias, 'add')
        if residual is None:
            return _MKLDNN_LINEAR(x, layer.weight, layer.bias, 'gelu' if gelu else 'none',
                                  [], 'none' if gelu else '')
    out = F.linear(x, layer.weight, layer.bias)
    if gelu:
        out = F.gelu(out)
    return out if residual is None else residual + out


def _split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, N, C) -> (B, heads, N, C // heads)."""
    B, N, C = x.shape
    return x.reshape(B, N, num_heads, C // num_heads).transpose(1, 2)


class PatchEmbed(nn.Module):
    """Non-overlapping strided conv + LayerNorm (eps 1e-5). Leftover rows/columns are dropped."""

    def __init__(self, in_channels: int, embed_dims: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, embed_dims, patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dims, eps=1e-5)

    def forward(self, x_nchw: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x_nchw).permute(0, 2, 3, 1))


class PositionEncodingGenerator(nn.Module):
    """PEG: a residual depthwise 3x3 conv (the official ``pos_block`` keys: ``proj.0``)."""

    def __init__(self, embed_dims: int):
        super().__init__()
        self.proj = nn.Sequential(
            nn.Conv2d(embed_dims, embed_dims, 3, padding=1, groups=embed_dims))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.proj(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class GlobalSubsampledAttention(nn.Module):
    """GSA: every query attends to a map sub-sampled by a strided conv (none when sr = 1)."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.sr_ratio = sr_ratio
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, H, W, C = x.shape
        q = _split_heads(linear(x, self.q).reshape(B, H * W, C), self.num_heads)
        source = x
        if self.sr_ratio > 1:
            # The conv floors: rows/columns beyond a whole sr x sr cell are left out.
            source = self.norm(self.sr(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
        kv = linear(source, self.kv).reshape(B, -1, 2, self.num_heads, C // self.num_heads)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return linear(out.transpose(1, 2).reshape(B, H, W, C), self.proj, residual=residual)


def _window_counts(H: int, W: int, ws: int) -> Tuple[int, int]:
    """Windows per column and per row; integer ceil, which dynamic-shape export can prove."""
    return (H + ws - 1) // ws, (W + ws - 1) // ws


class LocallyGroupedAttention(nn.Module):
    """LSA: attention inside non-overlapping windows.

    Maps that are not whole windows are zero-padded right/bottom and the padded keys are
    masked out exactly, whatever combination of the two pads is zero (the official and
    mmseg mask ignores the padding when exactly one pad is zero; timm does not mask).
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.window_size = window_size
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    @staticmethod
    def window_key_mask(H: int, W: int, window_size: int,
                        device: torch.device) -> torch.Tensor:
        """(num_windows, 1, 1, ws*ws) boolean mask, True where the key is a real token."""
        ws = window_size
        nh, nw = _window_counts(H, W, ws)
        rows = torch.arange(nh * ws, device=device) < H
        cols = torch.arange(nw * ws, device=device) < W
        valid = rows[:, None] & cols[None, :]
        valid = valid.reshape(nh, ws, nw, ws).permute(0, 2, 1, 3).reshape(nh * nw, 1, 1, ws * ws)
        return valid

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, H, W, C = x.shape
        ws, heads = self.window_size, self.num_heads
        # Projecting before padding costs fewer FLOPs; padded keys are masked and padded
        # queries cropped, so what they hold never reaches a real token.
        qkv = linear(x, self.qkv)
        # An exported graph must serve every size, so it always pads and masks (both are
        # no-ops on whole windows); otherwise only maps that are not whole windows need them.
        padded = _exporting() or H % ws > 0 or W % ws > 0
        capture = _graph_capture()
        if capture:
            q, k, v = self._windows_traceable(qkv)
        else:
            q, k, v = _ToWindows.apply(qkv, ws, heads).unbind(0)
        mask = None
        if padded:
            mask = self.window_key_mask(H, W, ws, x.device).repeat(B, 1, 1, 1)
            if _exporting():  # ONNX Attention (opset 23) wants the query length in the mask
                mask = mask.expand(-1, -1, ws * ws, -1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        if capture:
            out = self._merge_windows_traceable(out, B, H, W)
        else:
            out = _FromWindows.apply(out, B, H, W, ws)
        return linear(out, self.proj, residual=residual)

    def _windows_traceable(self, qkv: torch.Tensor):
        B, H, W, C3 = qkv.shape
        ws, heads = self.window_size, self.num_heads
        # Window counts first, pads from them: the padded side is then nh * ws by
        # construction, which symbolic (dynamic-shape) tracing can prove.
        nh, nw = _window_counts(H, W, ws)
        qkv = F.pad(qkv, (0, 0, 0, nw * ws - W, 0, nh * ws - H))
        qkv = qkv.reshape(B, nh, ws, nw, ws, 3, heads, C3 // (3 * heads))
        return qkv.permute(5, 0, 1, 3, 6, 2, 4, 7).reshape(
            3, B * nh * nw, heads, ws * ws, C3 // (3 * heads)).unbind(0)

    def _merge_windows_traceable(self, out: torch.Tensor, B: int, H: int, W: int):
        ws = self.window_size
        _, heads, _, d = out.shape
        nh, nw = _window_counts(H, W, ws)
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
    """Copies a (B, H, W, *tail) map into a (B, nh, ws, nw, ws, *tail) windowed view.

    One pass: every token goes straight to its window slot and only the pad slots are
    zeroed (F.pad + permute would fill the whole padded map, then copy it twice).
    """
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


# Windowed layouts seen as (B, nh, ws, nw, ws, ...) maps: q/k/v windows are
# (3, B, nh, nw, heads, ws, ws, d), attention output windows (B, nh, nw, heads, ws, ws, d).
_QKV_WINDOWS_AS_MAP = (1, 2, 5, 3, 6, 0, 4, 7)
_OUT_WINDOWS_AS_MAP = (0, 1, 4, 2, 5, 3, 6)


class _ToWindows(torch.autograd.Function):
    """(B, H, W, 3 * C) q/k/v map -> (3, B * windows, heads, ws * ws, d), zero-padded.

    Its own backward (the inverse gather): autograd through in-place copies into views
    would clone the whole gradient once per copy.
    """

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, ws: int, heads: int) -> torch.Tensor:
        B, H, W, C3 = qkv.shape
        d = C3 // (3 * heads)
        nh, nw = _window_counts(H, W, ws)
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


class _FromWindows(torch.autograd.Function):
    """(B * windows, heads, ws * ws, d) attention output -> (B, H, W, C), padding dropped."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, B: int, H: int, W: int, ws: int) -> torch.Tensor:
        _, heads, _, d = out.shape
        nh, nw = _window_counts(H, W, ws)
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


class _GeluMlpFunction(torch.autograd.Function):
    """``fc2(GELU(fc1(x)))`` that saves fc1's output but not GELU's, for backward.

    Autograd would keep both hidden-width tensors (4C or 8C wide, the largest activations
    of a block); GELU is cheap to recompute from fc1's output, so training needs one
    hidden tensor per block less memory at the cost of one elementwise pass.
    """

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2):
        h = F.linear(x, w1, b1)
        ctx.save_for_backward(x, h, w1, w2)
        return F.linear(F.gelu(h), w2, b2)

    @staticmethod
    def backward(ctx, dy):
        x, h, w1, w2 = ctx.saved_tensors
        need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad
        dy2 = dy.reshape(-1, dy.shape[-1])
        dw2 = db2 = dx = dw1 = db1 = None
        # One hidden-width buffer serves GELU(h), then dy @ w2, then dh: fresh buffers of
        # this size cost a page-faulting pass each on CPU.
        buf = torch.empty_like(h)
        if need_w2:
            dw2 = dy2.t() @ torch.ops.aten.gelu.out(h, out=buf).reshape(-1, h.shape[-1])
        if need_b2:
            db2 = dy2.sum(0)
        if need_x or need_w1 or need_b1:
            torch.matmul(dy, w2, out=buf)
            dh = torch.ops.aten.gelu_backward.grad_input(buf, h, grad_input=buf)
            dh = dh.reshape(-1, h.shape[-1])
            if need_w1:
                dw1 = dh.t() @ x.reshape(-1, x.shape[-1])
            if need_b1:
                db1 = dh.sum(0)
            if need_x:
                dx = (dh @ w1).reshape(x.shape)
        return dx, dw1, db1, dw2, db2


class Mlp(nn.Module):

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        if torch.is_grad_enabled() and not _graph_capture():
            out = _GeluMlpFunction.apply(x, self.fc1.weight, self.fc1.bias, self.fc2.weight,
                                         self.fc2.bias)
            return out if residual is None else residual + out
        if _use_fused_cpu_kernels(x) and x[..., 0].numel() * self.fc1.out_features > 2 ** 22:
            return self._forward_in_row_chunks(x, residual)
        return linear(linear(x, self.fc1, gelu=True), self.fc2, residual=residual)

    def _forward_in_row_chunks(self, x: torch.Tensor,
                               residual: Optional[torch.Tensor]) -> torch.Tensor:
        """Inference on large maps, a few thousand tokens at a time.

        Used when the hidden activation would exceed 16 MiB (4C or 8C wide; 32-64 MiB at
        stride 4): in 4 MiB chunks it stays in cache and is never allocated in full, and
        the stride-4/8 MLPs are bound by that memory traffic and its page faults, not by
        their multiply-adds.
        """
        rows = x.reshape(-1, x.shape[-1])
        res = residual.reshape(-1, x.shape[-1]) if residual is not None else None
        out = torch.empty_like(rows)
        step = max(256, 2 ** 20 // self.fc1.out_features)  # 4 MiB of hidden per chunk
        for start in range(0, rows.shape[0], step):
            part = slice(start, start + step)
            hidden = linear(rows[part], self.fc1, gelu=True)
            out[part] = linear(hidden, self.fc2, residual=None if res is None else res[part])
        return out.view(x.shape)


class StochasticDepth(nn.Module):
    """Per-sample stochastic depth of one residual branch: ``x + branch(x) / keep_prob`` for
    kept samples, ``x`` for dropped ones.

    Dropped samples skip the branch entirely (the "skip" of the stochastic depth paper),
    where DropPath modules compute the branch for the whole batch and multiply it by zero:
    same outputs and gradients for the same draw, about ``drop_prob`` of the branch's
    compute and activation memory saved.
    """

    def __init__(self, drop_prob: float):
        super().__init__()
        self.drop_prob = drop_prob

    def draw_keep(self, batch: int) -> torch.Tensor:
        # Drawn on the CPU: choosing the kept samples then needs no device synchronisation.
        return torch.rand(batch) >= self.drop_prob

    def forward(self, x: torch.Tensor, branch) -> torch.Tensor:
        if not self.training or self.drop_prob == 0:
            return branch(x, residual=x)
        scale = 1. / (1. - self.drop_prob)
        keep = self.draw_keep(x.shape[0])
        if _graph_capture():  # no data-dependent shapes in a graph: the multiply form
            weight = keep.to(x.device, x.dtype).mul_(scale).view(-1, *[1] * (x.dim() - 1))
            return x + branch(x) * weight
        kept = keep.nonzero().flatten()
        if len(kept) == len(keep):
            return torch.add(x, branch(x), alpha=scale)
        if len(kept) == 0:
            # Every parameter must still get a (zero) gradient, or DDP without
            # find_unused_parameters fails: one sample, added with weight 0.
            kept, scale = kept.new_zeros(1), 0.
        kept = kept.to(x.device)
        return x.index_add(0, kept, branch(x.index_select(0, kept)), alpha=scale)


class TwinsBlock(nn.Module):
    """Pre-norm transformer block (LayerNorm eps 1e-6), stochastic depth per residual branch."""

    def __init__(self, attn: nn.Module, dim: int, mlp_ratio: float, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = attn
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = StochasticDepth(drop_path)

    def _attn_branch(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None):
        return self.attn(self.norm1(x), residual=residual)

    def _mlp_branch(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None):
        return self.mlp(self.norm2(x), residual=residual)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Without stochastic depth the residual adds go into the output projections.
        x = self.drop_path(x, self._attn_branch)
        return self.drop_path(x, self._mlp_branch)


def resolve_arch(arch: Union[str, dict], presets: Dict[str, dict], family: str) -> dict:
    """Turns ``arch`` (a preset name or a dict of hyper-parameters) into a checked dict."""
    required = list(next(iter(presets.values())).keys())
    if isinstance(arch, str):
        name = ARCH_ALIASES.get(arch.lower(), arch.lower())
        if name not in presets:
            raise ValueError(f'Unknown {family} arch {arch!r}: choose one of '
                             f'{sorted(presets)} (or {sorted(ARCH_ALIASES)}), or pass a dict '
                             f'with the keys {required}.')
        return copy.deepcopy(presets[name])
    if not isinstance(arch, dict):
        raise ValueError(f'{family} arch must be one of {sorted(presets)} or a dict with the '
                         f'keys {required}, got {type(arch).__name__}.')
    missing = [k for k in required if k not in arch]
    extra = [k for k in arch if k not in required]
    if missing or extra:
        raise ValueError(f'{family} arch dict must have exactly the keys {required}; '
                         f'missing {missing}, unexpected {extra}. Presets: {sorted(presets)}.')
    choices = f'Presets: {sorted(presets)}; a dict needs the keys {required}.'
    lengths = {k: len(v) for k, v in arch.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f'{family} arch dict: every entry needs one value per stage, '
                         f'got lengths {lengths}. {choices}')
    for dim, heads in zip(arch['embed_dims'], arch['num_heads']):
        if dim % heads:
            raise ValueError(f'{family} arch dict: embed_dims {arch["embed_dims"]} must be '
                             f'divisible by num_heads {arch["num_heads"]} stage by stage. '
                             f'{choices}')
    if any(d < 1 for d in arch['depths']):
        raise ValueError(f'{family} arch dict: depths must be >= 1, got {arch["depths"]}. '
                         f'{choices}')
    return {k: list(v) for k, v in arch.items()}


class TwinsBase(BaseModule):
    """Shared by :class:`TwinsPCPVT` and :class:`TwinsSVT`.

    Stage ``i`` = patch embedding ``patch_embeds[i]`` -> blocks ``blocks[i]`` (PEG
    ``pos_block[i]`` right after block 0) -> optional LayerNorm ``norm_list[i]``, whose output
    is both the stage output and the next stage's input.

    Args:
        arch: 'small' | 'base' | 'large' (or 's' | 'b' | 'l'), or a dict of hyper-parameters.
        in_channels: input image channels.
        out_indices: stages whose maps are returned (strides 4, 8, 16, 32).
        qkv_bias: bias in the q / kv / qkv projections (True in every paper model).
        drop_path_rate: stochastic depth, linear from 0 over all blocks.
        norm_after_stage: a per-stage LayerNorm (eps 1e-6); bool or one bool per stage.
        frozen_stages: -1 freezes nothing, 0 the first patch embedding (the stem), k >= 1
            stages 1..k entirely (the ResNet / Swin convention). Frozen parts stay in eval mode.
        norm_eval: keep the norm layers in eval mode while training (LayerNorm has no
            running statistics, so this only matters for norms added by subclasses; kept so
            configs written for CNN backbones run unchanged).
        with_cp: activation checkpointing per block (less memory, more compute).
        compile: opt-in ``torch.compile`` of the forward pass: True, or a dict of
            ``torch.compile`` kwargs (e.g. ``dict(dynamic=True)``). The forward has no
            graph breaks; compiling costs time at the first call (and per new input size
            unless dynamic).
        pretrained: deprecated alias of ``init_cfg=dict(type='Pretrained', checkpoint=...)``.
        init_cfg: mmengine init config. ``dict(type='Pretrained', checkpoint=...)`` accepts
            official, timm, mmseg and twins_mm checkpoints (see ``twins_mm.checkpoints``).
    """
    presets: Dict[str, dict] = {}
    family = 'Twins'
    default_norm_after_stage = False

    def __init__(self,
                 arch: Union[str, dict] = 'small',
                 in_channels: int = 3,
                 out_indices: Sequence[int] = (0, 1, 2, 3),
                 qkv_bias: bool = True,
                 drop_path_rate: float = 0.,
                 norm_after_stage: Optional[Union[bool, Sequence[bool]]] = None,
                 frozen_stages: int = -1,
                 norm_eval: bool = False,
                 with_cp: bool = False,
                 compile: Union[bool, dict] = False,
                 pretrained: Optional[str] = None,
                 init_cfg: Optional[Union[dict, list]] = None):
        if pretrained is not None:
            # mmseg's EncoderDecoder hands its model-level ``pretrained`` to the backbone.
            if init_cfg is not None:
                raise ValueError('Set either init_cfg or pretrained on the backbone, not both.')
            warnings.warn('pretrained is deprecated; use init_cfg=dict(type="Pretrained", '
                          'checkpoint=...) instead.', DeprecationWarning)
            init_cfg = dict(type='Pretrained', checkpoint=pretrained)
        super().__init__(init_cfg=init_cfg)
        self.arch_settings = resolve_arch(arch, self.presets, self.family)
        self.arch_name = arch if isinstance(arch, str) else 'custom'
        s = self.arch_settings
        self.embed_dims = s['embed_dims']
        self.num_stages = num_stages = len(self.embed_dims)
        self.in_channels = in_channels

        if isinstance(out_indices, int):
            out_indices = (out_indices, )
        out_indices = tuple(i + num_stages if i < 0 else i for i in out_indices)
        if not out_indices or any(not 0 <= i < num_stages for i in out_indices):
            raise ValueError(f'out_indices must be stage indices in [0, {num_stages - 1}], '
                             f'got {out_indices}.')
        self.out_indices = out_indices

        if norm_after_stage is None:
            norm_after_stage = self.default_norm_after_stage
        if isinstance(norm_after_stage, bool):
            norm_after_stage = [norm_after_stage] * num_stages
        if len(norm_after_stage) != num_stages:
            raise ValueError(f'norm_after_stage needs one bool per stage ({num_stages}), '
                             f'got {norm_after_stage}.')
        self.norm_after_stage = [bool(n) for n in norm_after_stage]

        if not -1 <= frozen_stages <= num_stages:
            raise ValueError(f'frozen_stages must be in [-1, {num_stages}], got {frozen_stages}.')
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.with_cp = with_cp
        if not isinstance(compile, (bool, dict)):
            raise ValueError(f'compile must be a bool or a dict of torch.compile kwargs, '
                             f'got {type(compile).__name__}.')
        self._compiled_forward = None
        if compile:
            self._compiled_forward = torch.compile(
                self._forward, **(compile if isinstance(compile, dict) else {}))

        self.patch_embeds = nn.ModuleList()
        self.pos_block = nn.ModuleList()
        self.blocks = nn.ModuleList()
        self.norm_list = nn.ModuleList()
        dpr = torch.linspace(0, drop_path_rate, sum(s['depths'])).tolist()
        prev_dims, cursor = in_channels, 0
        for i, dims in enumerate(self.embed_dims):
            self.patch_embeds.append(PatchEmbed(prev_dims, dims, 4 if i == 0 else 2))
            self.pos_block.append(PositionEncodingGenerator(dims))
            self.blocks.append(nn.ModuleList(
                TwinsBlock(self.build_attention(i, j, qkv_bias), dims, s['mlp_ratios'][i],
                           dpr[cursor + j]) for j in range(s['depths'][i])))
            self.norm_list.append(
                nn.LayerNorm(dims, eps=1e-6) if self.norm_after_stage[i] else nn.Identity())
            prev_dims, cursor = dims, cursor + s['depths'][i]
        self._freeze_stages()

    def build_attention(self, stage: int, block: int, qkv_bias: bool) -> nn.Module:
        raise NotImplementedError

    # ------------------------------------------------------------------ weights
    def init_weights(self):
        if isinstance(self.init_cfg, dict) and self.init_cfg.get('type') == 'Pretrained':
            # Our own loader: it recognises the checkpoint layout and refuses a wrong one
            # instead of mmengine's silent strict=False load.
            from twins_mm.checkpoints import load_pretrained
            self._init_default()
            load_pretrained(self, self.init_cfg['checkpoint'],
                            prefix=self.init_cfg.get('prefix'),
                            map_location=self.init_cfg.get('map_location', 'cpu'))
            self._is_init = True
            return
        if self.init_cfg is None:
            self._init_default()
        super().init_weights()

    def _init_default(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_init(m, std=.02, bias=0.)
            elif isinstance(m, nn.LayerNorm):
                constant_init(m, val=1.0, bias=0.)
            elif isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                normal_init(m, mean=0, std=math.sqrt(2.0 / fan_out), bias=0)

    # ------------------------------------------------------------------ train mode
    def stage_modules(self, i: int):
        return [self.patch_embeds[i], self.pos_block[i], self.blocks[i], self.norm_list[i]]

    def _frozen_modules(self):
        if self.frozen_stages < 0:
            return []
        if self.frozen_stages == 0:
            return [self.patch_embeds[0]]
        return [m for i in range(self.frozen_stages) for m in self.stage_modules(i)]

    def _freeze_stages(self):
        for m in self._frozen_modules():
            m.eval()
            for p in m.parameters():
                p.requires_grad = False

    def train(self, mode: bool = True):
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)):
                    m.eval()
        return self

    # ------------------------------------------------------------------ forward
    def _check_input(self, x: torch.Tensor):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f'{type(self).__name__} expects a 4-D (N, C, H, W) image tensor, '
                             f'got {shape}; add a batch dimension with x[None] if needed.')
        if x.shape[1] != self.in_channels:
            raise ValueError(f'{type(self).__name__} was built with in_channels='
                             f'{self.in_channels} but the input has {x.shape[1]} channels '
                             f'(shape {tuple(x.shape)}); convert the image or set in_channels.')
        if x.shape[2] < MIN_INPUT_SIZE or x.shape[3] < MIN_INPUT_SIZE:
            raise ValueError(f'{type(self).__name__} needs inputs of at least '
                             f'{MIN_INPUT_SIZE}x{MIN_INPUT_SIZE} (the stride-32 stage must '
                             f'keep one row and column), got {x.shape[2]}x{x.shape[3]}; '
                             f'resize or pad the image.')

    def _run_block(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.with_cp and x.requires_grad:
            return cp.checkpoint(block, x, use_reentrant=False)
        return block(x)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        self._check_input(x)
        if self._compiled_forward is not None:
            return self._compiled_forward(x)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        outs = []
        for i in range(self.num_stages):
            x = self.patch_embeds[i](x)
            for j, block in enumerate(self.blocks[i]):
                x = self._run_block(block, x)
                if j == 0:
                    x = self.pos_block[i](x)
            x = self.norm_list[i](x)
            x = x.permute(0, 3, 1, 2)
            if i in self.out_indices:
                outs.append(x.contiguous())
        return tuple(outs)


class TwinsPCPVT(TwinsBase):
    """Twins-PCPVT: PVT's global sub-sampled attention in every block, plus the PEG.

    ``arch`` keys: embed_dims, num_heads, mlp_ratios, depths, sr_ratios.
    ``norm_after_stage`` defaults to False (as the official dense-prediction code).
    """
    presets = PCPVT_ARCHS
    family = 'TwinsPCPVT'
    default_norm_after_stage = False

    def build_attention(self, stage, block, qkv_bias):
        s = self.arch_settings
        return GlobalSubsampledAttention(s['embed_dims'][stage], s['num_heads'][stage],
                                         s['sr_ratios'][stage], qkv_bias)


class TwinsSVT(TwinsBase):
    """Twins-SVT: LSA in even blocks, GSA in odd blocks, in every stage including the last.

    ``arch`` keys: embed_dims, num_heads, mlp_ratios, depths, sr_ratios, window_sizes.
    ``norm_after_stage`` defaults to True (the official dense-prediction ``norm_list``).
    """
    presets = SVT_ARCHS
    family = 'TwinsSVT'
    default_norm_after_stage = True

    def build_attention(self, stage, block, qkv_bias):
        s = self.arch_settings
        dims, heads = s['embed_dims'][stage], s['num_heads'][stage]
        if block % 2 == 0:
            return LocallyGroupedAttention(dims, heads, s['window_sizes'][stage], qkv_bias)
        return GlobalSubsampledAttention(dims, heads, s['sr_ratios'][stage], qkv_bias)
