"""Twins-PCPVT and Twins-SVT backbones (Chu et al., NeurIPS 2021) for OpenMMLab 2.0.

Inside the backbone the token map is kept as a channels-last ``(B, H, W, C)`` tensor:
LayerNorm and Linear act on the last dimension, and the convolutions (patch embedding,
PEG, GSA sub-sampling) see it through a free ``permute`` as a channels-last NCHW tensor.
Module names follow the official (and timm) checkpoint keys, so those files load as-is.

This file is the architecture only. Where a layer has a faster implementation it calls the
one function of :mod:`twins_mm.ops` that computes it (``linear_residual``, ``gelu_mlp``,
``partition_windows`` / ``merge_windows``, ``stochastic_depth``); which implementation runs
is decided there.
"""
import math
import warnings
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from mmengine.model import BaseModule
from mmengine.model.weight_init import constant_init, normal_init, trunc_normal_init

from twins_mm import ops
from twins_mm.checkpoints import load_pretrained
from twins_mm.models.archs import ARCH_ALIASES, PCPVT_ARCHS, SVT_ARCHS, resolve_arch

__all__ = ['TwinsPCPVT', 'TwinsSVT', 'PCPVT_ARCHS', 'SVT_ARCHS', 'ARCH_ALIASES']

MIN_INPUT_SIZE = 32


def _split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, N, C) -> (B, heads, N, C // heads); a copy under graph capture (see _nchw)."""
    B, N, C = x.shape
    x = x.reshape(B, N, num_heads, C // num_heads).transpose(1, 2)
    # clone, not contiguous: with one head the transposed view already counts as contiguous.
    return x.clone(memory_format=torch.contiguous_format) if ops.graph_capture() else x


def _nchw(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) map -> (B, C, H, W) for a convolution.

    Eager: a free permuted view (a channels-last NCHW tensor). Under graph capture: a
    contiguous copy. With dynamic H and W, inductor (torch 2.13, 2.14) orders the strides
    of a permuted view that a graph saves for backward with plain sympy comparisons, which
    cannot decide ``W * C < C`` for a symbolic ``W`` ("cannot determine truth value of
    Relational"); a contiguous tensor is saved as a buffer of its own and never ordered so.
    """
    x = x.permute(0, 3, 1, 2)
    return x.contiguous() if ops.graph_capture() else x


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
        return x + self.proj(_nchw(x)).permute(0, 2, 3, 1)


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
        q = _split_heads(ops.linear_residual(x, self.q).reshape(B, H * W, C), self.num_heads)
        source = x
        if self.sr_ratio > 1:
            # The conv floors: rows/columns beyond a whole sr x sr cell are left out.
            source = self.norm(self.sr(_nchw(x)).permute(0, 2, 3, 1))
        kv = ops.linear_residual(source, self.kv)
        k, v = kv.reshape(B, -1, 2, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1,
                                                                                 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return ops.linear_residual(out.transpose(1, 2).reshape(B, H, W, C), self.proj, residual)


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

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, H, W, C = x.shape
        ws = self.window_size
        # Projecting before padding costs fewer FLOPs; padded keys are masked and padded
        # queries dropped, so what they hold never reaches a real token.
        q, k, v = ops.partition_windows(ops.linear_residual(x, self.qkv), ws,
                                        self.num_heads).unbind(0)
        mask = None
        # An exported graph must serve every size, so it always masks (a no-op on whole
        # windows); otherwise only maps that are not whole windows need the mask.
        if ops.exporting() or H % ws or W % ws:
            mask = ops.window_key_mask(H, W, ws, x.device).repeat(B, 1, 1, 1)
            if ops.exporting():  # ONNX Attention (opset 23) wants the query length in the mask
                mask = mask.expand(-1, -1, ws * ws, -1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return ops.linear_residual(ops.merge_windows(out, B, H, W, ws), self.proj, residual)


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2 (the official ``mlp.fc1`` / ``mlp.fc2`` keys)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        return ops.gelu_mlp(x, self.fc1, self.fc2, residual)


class StochasticDepth(nn.Module):
    """Per-sample stochastic depth of one residual branch: ``x + branch(x) / keep_prob`` for
    kept samples, ``x`` for dropped ones (``branch(x, residual)`` adds the residual itself).
    """

    def __init__(self, drop_prob: float):
        super().__init__()
        self.drop_prob = drop_prob

    def draw_keep(self, batch: int, device: torch.device) -> torch.Tensor:
        return torch.rand(batch, device=device) >= self.drop_prob

    def forward(self, x: torch.Tensor, branch) -> torch.Tensor:
        if not self.training or self.drop_prob == 0:
            return branch(x, residual=x)
        return ops.stochastic_depth(x, branch, 1. - self.drop_prob, self.draw_keep)


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
        x = self.drop_path(x, self._attn_branch)
        return self.drop_path(x, self._mlp_branch)


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
            ``torch.compile`` kwargs (e.g. ``dict(mode='reduce-overhead')``). The forward
            has no graph breaks, in training too; the first call compiles, a second input
            size compiles one dynamic graph for all later sizes (docs/compile.md).
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
        # torch.compile kwargs, or None; the compiled forward itself is made at the first
        # call and never copied (see __getstate__).
        self.compile_cfg = (dict(compile) if isinstance(compile, dict) else {}) if compile else None
        self._compiled_forward = None

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

    def __getstate__(self):
        # The compiled forward is bound to this instance: a deep copy (EMA, averaged
        # models) or an unpickled model compiles its own at its first call.
        state = dict(super().__getstate__())
        state['_compiled_forward'] = None
        return state

    # ------------------------------------------------------------------ weights
    def init_weights(self):
        if isinstance(self.init_cfg, dict) and self.init_cfg.get('type') == 'Pretrained':
            # Our own loader: it recognises the checkpoint layout and refuses a wrong one
            # instead of mmengine's silent strict=False load.
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
        if self.compile_cfg is not None:
            if self._compiled_forward is None:
                self._compiled_forward = ops.compile_forward(self._forward, **self.compile_cfg)
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
            x = _nchw(x)
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
