"""Which implementation runs inside a whole backbone, forward and backward.

tests/ops/test_ops.py holds each fast path against its reference and checks that the
public ops follow :func:`twins_mm.ops.dispatch.select_path`. This file checks what a full
``TwinsPCPVT`` / ``TwinsSVT`` forward (and backward) actually runs, in each situation the
docs name (docs/compile.md, "Layout"):

- eager fp32 CPU inference: every linear layer of every block is a oneDNN
  ``mkldnn._linear_pointwise`` kernel (bias, GELU or residual add fused in), no plain matrix
  multiply;
- eager training: the GELU-recomputing MLP, the one-pass window partition / merge and the
  stochastic depth that skips dropped samples (their branches see only the kept samples);
- CPU autocast (bfloat16), training and inference: every matrix multiply and attention
  computes in bfloat16, and the fp32-only oneDNN kernels are not taken.

Two independent observers: a ``TorchDispatchMode`` that records every ATen / oneDNN op with
the dtypes of its inputs (what the hardware was asked to compute), and spies that wrap the
functions of :mod:`twins_mm.ops` and call through to them (which implementation was chosen).
Expected counts come from the architecture: per block, LSA has 2 linear layers (qkv, proj),
GSA 3 (q, kv, proj), the MLP 2 (fc1, fc2); proj and fc2 take the block's residual.
"""
import collections

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

import twins_mm
from twins_mm.models.twins import LocallyGroupedAttention, StochasticDepth
from twins_mm.ops import cpu_fused, drop_path, mlp, windows

ARCHS = {
    'TwinsSVT': dict(embed_dims=[16, 32, 32, 64], num_heads=[1, 2, 2, 4], mlp_ratios=[2, 2, 2, 2],
                     depths=[2, 2, 2, 2], sr_ratios=[8, 4, 2, 1], window_sizes=[7, 7, 7, 7]),
    'TwinsPCPVT': dict(embed_dims=[16, 32, 32, 64], num_heads=[1, 2, 2, 4],
                       mlp_ratios=[4, 4, 2, 2], depths=[2, 1, 1, 1], sr_ratios=[8, 4, 2, 1]),
}
# 64x80: stage maps 16x20, 8x10, 4x5, 2x2 -- every LSA map needs padding;
# 56x112: 14x28, 7x14, 3x7, 1x3 -- whole windows in stages 1-2, padding in 3-4.
SIZES = [(64, 80), (56, 112)]
KEEP = [True, False, True]  # the stochastic-depth draw forced on every branch
MATMULS = ('aten.mm.', 'aten.addmm.', 'aten.bmm.', 'aten.baddbmm.', 'aten.addbmm.',
           'aten.matmul.', 'aten.linear.', 'aten._addmm_activation.')
ONEDNN_LINEAR = 'mkldnn._linear_pointwise.'
ATTENTION = 'aten._scaled_dot_product'


class OpRecorder(TorchDispatchMode):
    """Every op that reaches the kernels, with the dtypes of its tensor inputs."""

    def __init__(self):
        super().__init__()
        self.calls = []  # (op name, dtypes of the tensor arguments)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        dtypes = [a.dtype for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        self.calls.append((str(func), dtypes))
        return func(*args, **kwargs)

    def named(self, *prefixes):
        return [(name, dtypes) for name, dtypes in self.calls if name.startswith(prefixes)]


class Spy:
    """Wraps ``owner.name``: records each call's positional arguments, then calls through."""

    def __init__(self, monkeypatch, owner, name):
        real = getattr(owner, name)
        self.calls = []

        def wrapper(*args, **kwargs):
            self.calls.append(args)
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapper)

    def __len__(self):
        return len(self.calls)


def build(family, **kwargs):
    torch.manual_seed(0)
    return getattr(twins_mm, family)(ARCHS[family], **kwargs)


def blocks(model):
    return [b for stage in model.blocks for b in stage]


def linear_layers(model):
    return [m for b in blocks(model) for m in b.modules() if isinstance(m, nn.Linear)]


def lsa_blocks(model):
    return [b for b in blocks(model) if isinstance(b.attn, LocallyGroupedAttention)]


def force_draw(model, keep):
    for m in model.modules():
        if isinstance(m, StochasticDepth):
            m.draw_keep = lambda batch, device, keep=keep: torch.tensor(keep, device=device)


def spy_paths(monkeypatch):
    """Spies on the implementations of every op of twins_mm.ops, by name."""
    targets = {
        # the attention's linear layers (the MLP's are counted as a whole below)
        'fused_linear': (cpu_fused, 'linear_residual_fused'),
        'reference_linear': (cpu_fused, 'linear_residual_reference'),
        'mlp_cpu_inference': (mlp, 'gelu_mlp_cpu_inference'),
        'mlp_recompute': (mlp.GeluRecomputeMlp, 'apply'),
        'mlp_reference': (mlp, 'gelu_mlp_reference'),
        'partition_one_pass': (windows.PartitionOnePass, 'apply'),
        'merge_one_pass': (windows.MergeOnePass, 'apply'),
        'partition_reference': (windows, 'partition_reference'),
        'merge_reference': (windows, 'merge_reference'),
        'depth_skip': (drop_path, 'stochastic_depth_skip'),
        'depth_multiply': (drop_path, 'stochastic_depth_multiply'),
    }
    return {key: Spy(monkeypatch, owner, name) for key, (owner, name) in targets.items()}


def count(spies):
    return {key: len(spy) for key, spy in spies.items()}


# --------------------------------------------------------------------------- CPU inference
@pytest.mark.parametrize('mode', ['no_grad', 'inference_mode'])
@pytest.mark.parametrize('family', list(ARCHS))
def test_cpu_inference_runs_every_block_linear_as_a_fused_onednn_kernel(monkeypatch, family,
                                                                        mode):
    model = build(family).eval()
    n_blocks, n_linear = len(blocks(model)), len(linear_layers(model))
    n_lsa = len(lsa_blocks(model))
    for size in SIZES:
        spies = spy_paths(monkeypatch)
        rec = OpRecorder()
        with getattr(torch, mode)(), rec:
            model(torch.randn(2, 3, *size))
        onednn = rec.named(ONEDNN_LINEAR)
        # One kernel per linear layer; proj and fc2 (two per block) fuse the residual add.
        assert len(onednn) == n_linear, (size, [n for n, _ in onednn])
        assert sum(n.endswith('.binary') for n, _ in onednn) == 2 * n_blocks
        assert all(dtypes and set(dtypes) == {torch.float32} for _, dtypes in onednn)
        assert rec.named(*MATMULS) == [], 'a block linear ran as a plain matrix multiply'
        assert count(spies) == dict(
            fused_linear=3 * n_blocks - n_lsa, reference_linear=0,
            mlp_cpu_inference=n_blocks, mlp_recompute=0, mlp_reference=0,
            partition_one_pass=n_lsa, merge_one_pass=n_lsa, partition_reference=0,
            merge_reference=0, depth_skip=0, depth_multiply=0), size
        monkeypatch.undo()


# --------------------------------------------------------------------------- training
def batches_seen_by_branches(model):
    """Hooks on each block's two pre-norms: the batch each residual branch computes on."""
    seen = collections.defaultdict(list)
    for i, block in enumerate(blocks(model)):
        for name in ('norm1', 'norm2'):
            getattr(block, name).register_forward_hook(
                lambda m, args, out, key=(i, name): seen[key].append(args[0].shape[0]))
    return seen


@pytest.mark.parametrize('autocast', [False, True], ids=['fp32', 'bf16_autocast'])
@pytest.mark.parametrize('family', list(ARCHS))
def test_training_runs_recompute_mlp_one_pass_windows_and_skips_dropped_samples(
        monkeypatch, family, autocast):
    model = build(family, drop_path_rate=0.3).train()
    force_draw(model, KEEP)
    all_blocks = blocks(model)
    dropping = [b.drop_path.drop_prob > 0 for b in all_blocks]
    assert not dropping[0] and all(dropping[1:])  # linear schedule from 0
    n_lsa = len(lsa_blocks(model))
    seen = batches_seen_by_branches(model)
    spies = spy_paths(monkeypatch)
    rec = OpRecorder()
    x = torch.randn(len(KEEP), 3, *SIZES[0])
    with rec:
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
            outs = model(x)
        sum(o.float().square().mean() for o in outs).backward()

    n_dropping = sum(dropping)
    assert count(spies) == dict(
        fused_linear=0, reference_linear=3 * len(all_blocks) - n_lsa,  # q/kv/qkv, proj
        mlp_cpu_inference=0, mlp_recompute=len(all_blocks), mlp_reference=0,
        partition_one_pass=n_lsa, merge_one_pass=n_lsa, partition_reference=0,
        merge_reference=0, depth_skip=2 * n_dropping, depth_multiply=0)
    # Dropped samples skip the branch: it computes on the kept samples only.
    for i, drops in enumerate(dropping):
        expected = sum(KEEP) if drops else len(KEEP)
        assert seen[(i, 'norm1')] == seen[(i, 'norm2')] == [expected], i
    # The recomputing MLP gets the kept samples of its block too.
    assert [a[0].shape[0] for a in spies['mlp_recompute'].calls] == \
        [sum(KEEP) if d else len(KEEP) for d in dropping]
    assert rec.named(ONEDNN_LINEAR) == []
    for p in model.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()


# --------------------------------------------------------------------------- autocast
def assert_low_precision(rec, dtype):
    matmuls = rec.named(*MATMULS)
    assert matmuls, 'no matrix multiply recorded'
    wrong = [(n, d) for n, d in matmuls if set(d) != {dtype}]
    assert not wrong, f'matrix multiplies not in {dtype}: {wrong[:5]} ({len(wrong)} in all)'
    attention = rec.named(ATTENTION)
    assert attention
    # The first three tensor inputs: q, k, v in forward; the output gradient, q, k in
    # backward (a mask, and the log-sum-exp backward gets, come later).
    assert all(set(d[:3]) == {dtype} for _, d in attention), attention


@pytest.mark.parametrize('family', list(ARCHS))
def test_autocast_training_computes_every_matmul_in_bfloat16(family):
    """Forward and backward: the linear layers, attention and their gradients in bf16."""
    model = build(family, drop_path_rate=0.3).train()
    force_draw(model, KEEP)
    n_linear = len(linear_layers(model))
    fwd, bwd = OpRecorder(), OpRecorder()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        with fwd:
            outs = model(torch.randn(len(KEEP), 3, *SIZES[0]))
    with bwd:
        sum(o.float().square().mean() for o in outs).backward()
    assert_low_precision(fwd, torch.bfloat16)
    assert len(fwd.named(*MATMULS)) == n_linear  # one per linear layer, all of them
    assert_low_precision(bwd, torch.bfloat16)
    # The parameters and their gradients stay fp32 (autocast casts copies).
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize('family', list(ARCHS))
def test_autocast_inference_computes_in_bfloat16_without_the_fp32_kernels(monkeypatch, family):
    model = build(family).eval()
    n_blocks, n_lsa = len(blocks(model)), len(lsa_blocks(model))
    spies = spy_paths(monkeypatch)
    rec = OpRecorder()
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16), rec:
        outs = model(torch.randn(2, 3, *SIZES[0]))
    assert all(o.dtype == torch.bfloat16 for o in outs)
    assert rec.named(ONEDNN_LINEAR) == []
    assert_low_precision(rec, torch.bfloat16)
    assert len(rec.named(*MATMULS)) == len(linear_layers(model))
    assert count(spies) == dict(
        fused_linear=0, reference_linear=3 * n_blocks - n_lsa, mlp_cpu_inference=0,
        mlp_recompute=0, mlp_reference=n_blocks, partition_one_pass=n_lsa,
        merge_one_pass=n_lsa, partition_reference=0, merge_reference=0, depth_skip=0,
        depth_multiply=0)


# --------------------------------------------------------------------------- masks
@pytest.mark.parametrize('training', [False, True], ids=['inference', 'training'])
def test_attention_gets_a_mask_only_where_a_map_needs_padding(monkeypatch, training):
    """README: both attention kinds run through SDPA, and no mask is built for a map of
    whole windows (GSA never needs one)."""
    import torch.nn.functional as F
    model = build('TwinsSVT', drop_path_rate=0.3 if training else 0.).train(training)
    force_draw(model, KEEP)
    ws = ARCHS['TwinsSVT']['window_sizes']
    masks = []
    real = F.scaled_dot_product_attention

    def sdpa(q, k, v, attn_mask=None, **kwargs):
        masks.append(attn_mask is not None)
        return real(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, 'scaled_dot_product_attention', sdpa)
    h, w = SIZES[1]  # stage maps 14x28, 7x14 (whole windows), 3x7, 1x3 (padded)
    expected, h, w = [], h // 4, w // 4
    for i, stage in enumerate(model.blocks):
        if i:
            h, w = h // 2, w // 2
        for block in stage:
            lsa = isinstance(block.attn, LocallyGroupedAttention)
            expected.append(lsa and bool(h % ws[i] or w % ws[i]))
    assert True in expected and expected.count(False) > len(expected) // 2
    with torch.set_grad_enabled(training):
        model(torch.randn(len(KEEP), 3, *SIZES[1]))
    assert masks == expected
