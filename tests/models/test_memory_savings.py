"""The activation memory the training paths save, counted exactly.

What autograd keeps for backward is observed with ``torch.autograd.graph.saved_tensors_hooks``:
every tensor packed for backward is recorded by the storage it lives in (a tensor saved by
two ops, or a view of a saved tensor, is counted once) and the parameters are left out, so
the count is the activation bytes a training step holds between forward and backward.

- The recomputing MLP (``GeluRecomputeMlp``) keeps fc1's input and output but not GELU's
  output: one hidden-width tensor (``N * hidden`` values) less per block than plain
  fc1 -> GELU -> fc2 autograd, which keeps all three.
- Stochastic depth in its skip form computes a branch on the kept samples only, so the
  branch's activations scale with the kept samples instead of the batch; it adds the
  kept-sample index and the branch output that ``index_add`` keeps. The multiply form keeps
  the whole batch's branch activations and the per-sample weights.

Expected values are written from the shapes and from what each op of the plain form saves
(LayerNorm: input, mean, rstd; linear: input; GELU: input).
"""
import pytest
import torch
import torch.nn as nn

import twins_mm
from twins_mm.models.twins import GlobalSubsampledAttention, LocallyGroupedAttention, TwinsBlock
from twins_mm.ops import drop_path, mlp

F32 = 4  # bytes per float32 value
I64 = 8
TINY_SVT = dict(embed_dims=[16, 32, 32, 64], num_heads=[1, 2, 2, 4], mlp_ratios=[2, 2, 4, 2],
                depths=[2, 2, 2, 2], sr_ratios=[8, 4, 2, 1], window_sizes=[7, 7, 7, 7])


def saved_bytes(fn, params=()):
    """(bytes of the non-parameter tensors autograd saves while ``fn`` runs, fn's result)."""
    skip = {p.untyped_storage().data_ptr() for p in params}
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(storages.values()), out


# --------------------------------------------------------------------------- recompute MLP
@pytest.mark.parametrize('with_residual', [False, True])
def test_recompute_mlp_saves_one_hidden_tensor_less_than_plain_autograd(with_residual):
    B, H, W, C, hidden = 2, 5, 7, 16, 64
    torch.manual_seed(0)
    fc1, fc2 = nn.Linear(C, hidden), nn.Linear(hidden, C)
    params = [*fc1.parameters(), *fc2.parameters()]
    x = torch.randn(B, H, W, C, requires_grad=True)
    res = torch.randn_like(x, requires_grad=True) if with_residual else None
    n = B * H * W
    recompute, out = saved_bytes(lambda: mlp.gelu_mlp_recompute(x, fc1, fc2, res), params)
    plain, ref = saved_bytes(lambda: mlp.gelu_mlp_reference(x, fc1, fc2, res), params)
    # plain: x (fc1's input), fc1's output (GELU's input), GELU's output (fc2's input)
    assert plain == n * (C + hidden + hidden) * F32
    # recompute: x and fc1's output; GELU's output is recomputed in backward
    assert recompute == n * (C + hidden) * F32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def stage_maps(arch, h, w):
    """(tokens, hidden width, blocks) per stage for an h x w input."""
    h, w = h // 4, w // 4
    for i, (c, ratio, depth) in enumerate(zip(arch['embed_dims'], arch['mlp_ratios'],
                                              arch['depths'])):
        if i:
            h, w = h // 2, w // 2
        yield h * w, c * ratio, depth


@pytest.mark.parametrize('family', ['TwinsSVT', 'TwinsPCPVT'])
def test_backbone_training_saves_one_hidden_tensor_per_block(monkeypatch, family):
    """A whole backbone's training forward against the same model with the plain MLP: the
    difference is exactly one hidden-width tensor per block, nothing else."""
    arch = dict(TINY_SVT)
    if family == 'TwinsPCPVT':
        arch.pop('window_sizes')
    torch.manual_seed(0)
    model = getattr(twins_mm, family)(arch).train()
    params = list(model.parameters())
    B, h, w = 2, 64, 80
    x = torch.randn(B, 3, h, w)
    ours, outs = saved_bytes(lambda: model(x), params)
    monkeypatch.setattr(mlp, 'gelu_mlp_recompute', mlp.gelu_mlp_reference)  # the plain form
    plain, ref = saved_bytes(lambda: model(x), params)
    hidden_tensors = sum(depth * B * n * hidden * F32 for n, hidden, depth in
                         stage_maps(arch, h, w))
    assert plain - ours == hidden_tensors
    for a, b in zip(outs, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- stochastic depth
DRAWS = {  # keep mask of a batch of 4 -> kept samples that the skip form computes
    'half_dropped': ([True, False, True, False], 2),
    'none_dropped': ([True] * 4, 4),
    # A fully dropped batch still runs one sample, added with weight 0, so that every
    # parameter gets a gradient (DDP without find_unused_parameters).
    'all_dropped': ([False] * 4, 1),
}


def make_block(kind, C=16):
    torch.manual_seed(0)
    attn = (LocallyGroupedAttention(C, 2, 7) if kind == 'lsa'
            else GlobalSubsampledAttention(C, 2, 2))
    return TwinsBlock(attn, C, 4, drop_path=0.25).train()


@pytest.mark.parametrize('draw', list(DRAWS))
def test_skip_form_mlp_branch_saves_the_kept_samples_only(draw):
    keep, computed = DRAWS[draw]
    keep = torch.tensor(keep)
    B, H, W, C = len(keep), 9, 11, 16
    block = make_block('lsa', C)
    hidden = block.mlp.fc1.out_features
    params = list(block.parameters())
    x = torch.randn(B, H, W, C, requires_grad=True)
    n = H * W
    skip, out = saved_bytes(
        lambda: drop_path.stochastic_depth_skip(x, block._mlp_branch, keep, 0.75), params)
    multiply, ref = saved_bytes(
        lambda: drop_path.stochastic_depth_multiply(x, block._mlp_branch, keep, 0.75), params)
    # Per computed sample, the MLP branch LN -> recomputing MLP saves: LN input, mean and
    # rstd; the MLP's input (the LN output) and fc1's output.
    per_sample = n * (C + 2 + C + hidden) * F32
    assert multiply == B * per_sample + B * F32  # + the per-sample weights
    if computed == B:
        assert skip == B * per_sample  # nothing dropped: one residual add, nothing else
    else:
        # + the kept-sample index and index_add's source (the branch output, C wide)
        assert skip == computed * (per_sample + n * C * F32) + computed * I64
    if computed < B:
        assert skip < multiply
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('kind', ['lsa', 'gsa'])
def test_skip_form_attention_branch_saves_what_the_kept_samples_need(kind):
    """The attention branch, whose saved tensors include SDPA's internals: the skip form
    saves what the same branch saves when run on the kept samples alone (plus the index
    and index_add's source); the multiply form what it saves on the whole batch."""
    keep = torch.tensor(DRAWS['half_dropped'][0])
    B, H, W, C = len(keep), 9, 11, 16
    block = make_block(kind, C)
    params = list(block.parameters())
    x = torch.randn(B, H, W, C, requires_grad=True)
    kept = int(keep.sum())
    x_kept = x[keep].detach().requires_grad_()
    alone, _ = saved_bytes(lambda: block._attn_branch(x_kept), params)
    whole, _ = saved_bytes(lambda: block._attn_branch(x), params)
    skip, out = saved_bytes(
        lambda: drop_path.stochastic_depth_skip(x, block._attn_branch, keep, 0.75), params)
    multiply, ref = saved_bytes(
        lambda: drop_path.stochastic_depth_multiply(x, block._attn_branch, keep, 0.75), params)
    assert skip == alone + kept * H * W * C * F32 + kept * I64
    assert multiply == whole + B * F32
    assert skip < multiply
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
