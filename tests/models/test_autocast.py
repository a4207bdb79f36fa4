"""Mixed precision: the whole backbone under ``torch.autocast`` against fp32 of the same weights.

CPU autocast (bfloat16) runs the same autograd code as CUDA autocast, so these tests catch on
CPU what crashes a GPU's first mixed-precision step. The CUDA versions (fp16 with a
GradScaler, bf16) are in tests/gpu.

Metric: for every parameter, the cosine similarity of its bf16-autocast gradient with its
fp32 gradient (same weights, input and stochastic-depth draw) is at least ``MIN_COSINE``;
outputs agree to ``OUT_RTOL`` of their scale. bfloat16 keeps 8 significant bits (relative
rounding ~4e-3 per operation); measured worst cases over these tests: cosine 0.9990,
output error 1.5 % of the output's scale (torch 2.13 CPU).

The models are the variants' own widths, heads, MLP ratios, sub-sampling and windows with two
blocks per stage (``tests.helpers.shallow_arch``): the blocks of a stage run the same code, and
two per stage keep every path of the full depth (the PEG between block 0 and block 1, SVT's
LSA and GSA blocks). The six variants differ from each other only in those widths and
depths (PCPVT-B/L from S only in depth), so they are checked in one test; the other tests
vary what does take another path (stochastic-depth draws, padded or whole windows,
activation checkpointing, frozen stages, inference) on the small variant.
"""
import pytest
import torch

from tests.helpers import VARIANTS, build_backbone, shallow_arch

MIN_COSINE = 0.99
OUT_RTOL = 0.05
SIZES = {'padded': (64, 80), 'whole': (56, 112)}  # 16x20 map: padded windows; 14x28: whole

DRAWS = {  # which of the 3 samples each stochastic-depth branch keeps
    'partly_dropped': [True, False, True],
    'none_dropped': [True, True, True],
    'all_dropped': [False, False, False],
}


def build(family, arch='small', **kwargs):
    return build_backbone(family, shallow_arch(family, arch, depth=2), **kwargs)


def force_draw(model, keep):
    for m in model.modules():
        if hasattr(m, 'draw_keep'):
            m.draw_keep = lambda batch, device='cpu', keep=keep: torch.tensor(keep, device=device)


def loss_of(outs, probes):
    return sum((o.float() * p).sum() for o, p in zip(outs, probes))


def grads_fp32_and_autocast(model, x, dtype=torch.bfloat16):
    """(outputs, gradients) in fp32 and under CPU autocast, for the same weights and input."""
    results = []
    probes = None
    for autocast in (False, True):
        model.zero_grad(set_to_none=True)
        with torch.autocast('cpu', dtype=dtype, enabled=autocast):
            outs = model(x)
        if probes is None:
            gen = torch.Generator().manual_seed(1)
            probes = [torch.randn(o.shape, generator=gen) for o in outs]
        loss_of(outs, probes).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append(([o.detach().float() for o in outs], grads))
    return results


def assert_close_to_fp32(model, x):
    (outs32, g32), (outs16, g16) = grads_fp32_and_autocast(model, x)
    for a, b in zip(outs16, outs32):
        assert torch.isfinite(a).all()
        assert (a - b).abs().max() <= OUT_RTOL * b.abs().max()
    assert g16.keys() == g32.keys()
    assert g32, 'no parameter got a gradient'
    for name, g in g16.items():
        assert torch.isfinite(g).all(), name
        ref = g32[name]
        if ref.norm() == 0:
            assert g.norm() == 0, name
            continue
        cos = torch.nn.functional.cosine_similarity(g.flatten().double(),
                                                    ref.flatten().double(), dim=0)
        assert cos >= MIN_COSINE, f'{name}: cosine {cos:.4f}'


# Two blocks per stage make PCPVT-B and -L the same model as PCPVT-S (they differ in depth
# only; checked below), so the distinct variants are these four.
DISTINCT_VARIANTS = [('TwinsPCPVT', 'small'), ('TwinsSVT', 'small'), ('TwinsSVT', 'base'),
                     ('TwinsSVT', 'large')]


def test_distinct_variants_cover_all_six():
    shallow = {v: shallow_arch(*v, depth=2) for v in VARIANTS}
    for variant in VARIANTS:
        assert any(shallow[variant] == shallow[d] for d in DISTINCT_VARIANTS), variant


@pytest.mark.parametrize('family,arch', DISTINCT_VARIANTS)
def test_bf16_autocast_training_all_variants(family, arch):
    torch.manual_seed(0)
    model = build(family, arch, drop_path_rate=0.2).train()
    force_draw(model, DRAWS['partly_dropped'])
    assert_close_to_fp32(model, torch.randn(3, 3, *SIZES['padded']))


@pytest.mark.parametrize('family', ['TwinsPCPVT', 'TwinsSVT'])
def test_bf16_autocast_training_whole_windows(family):
    torch.manual_seed(0)
    model = build(family, drop_path_rate=0.2).train()
    force_draw(model, DRAWS['partly_dropped'])
    assert_close_to_fp32(model, torch.randn(3, 3, *SIZES['whole']))


@pytest.mark.parametrize('draw', list(DRAWS))
@pytest.mark.parametrize('family', ['TwinsPCPVT', 'TwinsSVT'])
def test_bf16_autocast_stochastic_depth_draws(family, draw):
    torch.manual_seed(0)
    model = build(family, drop_path_rate=0.3).train()
    force_draw(model, DRAWS[draw])
    assert_close_to_fp32(model, torch.randn(3, 3, *SIZES['padded']))


@pytest.mark.parametrize('family', ['TwinsPCPVT', 'TwinsSVT'])
def test_bf16_autocast_with_cp_and_frozen_stages(family):
    torch.manual_seed(0)
    model = build(family, drop_path_rate=0.2, with_cp=True,
                           frozen_stages=1).train()
    force_draw(model, DRAWS['partly_dropped'])
    assert_close_to_fp32(model, torch.randn(3, 3, *SIZES['padded']))
    assert all(p.grad is None for p in model.blocks[0].parameters())


@pytest.mark.parametrize('family', ['TwinsPCPVT', 'TwinsSVT'])
def test_autocast_outputs_are_bf16_and_inference_matches(family):
    """Autocast inference takes the autocast path (bf16 outputs), not the fp32-only kernels."""
    torch.manual_seed(0)
    model = build(family).eval()
    x = torch.randn(2, 3, *SIZES['padded'])
    with torch.no_grad():
        ref = model(x)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            outs = model(x)
    for a, b in zip(outs, ref):
        assert a.dtype == torch.bfloat16
        assert (a.float() - b).abs().max() <= OUT_RTOL * b.abs().max()
