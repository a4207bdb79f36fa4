"""Every fast path of twins_mm.ops against its reference, forward and backward.

Per path: float64 gradcheck where it has a custom backward; fp32 and (under autocast) bf16
on CPU; CUDA (fp32, fp16 and bf16 autocast) in the cuda tier. Tolerances: float64 1e-10;
fp32 1e-5; autocast compares with plain autograd through the reference under the same
autocast, which rounds at the same places (bf16 1e-2, fp16 2e-3 relative to scale).
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from twins_mm import ops
from twins_mm.ops import cpu_fused, drop_path, mlp, windows
from twins_mm.ops.dispatch import Path, select_path

CUDA = pytest.param('cuda', marks=pytest.mark.cuda)
DEVICES = ['cpu', CUDA]
AUTOCAST = {  # device -> the dtypes its autocast serves
    'cpu': [torch.bfloat16],
    'cuda': [torch.float16, torch.bfloat16],
}
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
WINDOW_SHAPES = [(2, 14, 21), (1, 9, 16), (2, 7, 7), (1, 3, 5)]  # whole, both/one pad, tiny


def assert_rel_close(a, b, tol):
    scale = b.detach().abs().max().clamp_min(1e-12)
    err = (a.detach().double() - b.detach().double()).abs().max()
    assert err <= tol * scale, f'max error {err:.3g} vs scale {scale:.3g} (tol {tol})'


def grads(out, inputs, seed=3):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out)
    return torch.autograd.grad(out, inputs, g)


# --------------------------------------------------------------------------- windows
@pytest.mark.parametrize('B,H,W', WINDOW_SHAPES)
def test_window_partition_merge_gradcheck_float64(B, H, W):
    heads, d, ws = 2, 3, 7
    qkv = torch.randn(B, H, W, 3 * heads * d, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: windows.PartitionOnePass.apply(t, ws, heads),
                                    (qkv, ))
    nh, nw = windows.window_counts(H, W, ws)
    out = torch.randn(B * nh * nw, heads, ws * ws, d, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: windows.MergeOnePass.apply(t, B, H, W, ws),
                                    (out, ))


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('B,H,W', WINDOW_SHAPES)
def test_window_one_pass_equals_reference(B, H, W, device, dtype):
    """Bit-identical: both paths only copy (and zero the pad slots)."""
    heads, d, ws = 2, 4, 7
    qkv = torch.randn(B, H, W, 3 * heads * d, device=device, dtype=dtype, requires_grad=True)
    fast = windows.PartitionOnePass.apply(qkv, ws, heads)
    ref = windows.partition_reference(qkv, ws, heads)
    assert torch.equal(fast, ref)
    assert torch.equal(*(grads(o, qkv)[0] for o in (fast, ref)))

    out = torch.randn(fast.shape[1:], device=device, dtype=dtype, requires_grad=True)
    fast = windows.MergeOnePass.apply(out, B, H, W, ws)
    ref = windows.merge_reference(out, B, H, W, ws)
    assert torch.equal(fast, ref)
    assert torch.equal(*(grads(o, out)[0] for o in (fast, ref)))


# --------------------------------------------------------------------------- MLP
def make_mlp(dim=6, hidden=24, dtype=torch.float32, device='cpu'):
    torch.manual_seed(0)
    return (nn.Linear(dim, hidden).to(device, dtype), nn.Linear(hidden, dim).to(device, dtype))


def test_gelu_recompute_mlp_gradcheck_float64():
    fc1, fc2 = make_mlp(dtype=torch.double)
    x = torch.randn(2, 3, 5, 6, dtype=torch.double, requires_grad=True)
    params = (x, fc1.weight, fc1.bias, fc2.weight, fc2.bias)
    assert torch.autograd.gradcheck(lambda *t: mlp.GeluRecomputeMlp.apply(*t), params)
    out = mlp.gelu_mlp_recompute(x, fc1, fc2)
    ref = mlp.gelu_mlp_reference(x, fc1, fc2)
    for a, b in zip(grads(out, params), grads(ref, params)):
        assert_rel_close(a, b, TOL[torch.float64])


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('with_residual', [False, True])
def test_gelu_recompute_mlp_under_autocast_equals_reference(device, with_residual):
    """Autocast casts once in forward; backward runs outside autocast on the same dtypes."""
    for dtype in AUTOCAST[device]:
        fc1, fc2 = make_mlp(16, 64, device=device)
        x = torch.randn(2, 5, 7, 16, device=device, requires_grad=True)
        res = torch.randn_like(x) if with_residual else None
        params = (x, fc1.weight, fc1.bias, fc2.weight, fc2.bias)
        with torch.autocast(device, dtype=dtype):
            out = mlp.gelu_mlp_recompute(x, fc1, fc2, res)
            ref = mlp.gelu_mlp_reference(x, fc1, fc2, res)
        assert out.dtype == ref.dtype
        assert_rel_close(out, ref, TOL[dtype])
        for a, b, p in zip(grads(out, params), grads(ref, params), params):
            assert a.dtype == b.dtype == p.dtype
            assert_rel_close(a, b, TOL[dtype])


@pytest.mark.parametrize('with_residual', [False, True])
@pytest.mark.parametrize('rows', [40, 4200])  # 4200 rows x 1024 hidden: chunked
def test_cpu_inference_mlp_equals_reference(monkeypatch, rows, with_residual):
    fc1, fc2 = make_mlp(16, 1024)
    x = torch.randn(2, rows // 2, 16)
    res = torch.randn_like(x) if with_residual else None
    calls = []
    real = mlp.linear_gelu_fused
    monkeypatch.setattr(mlp, 'linear_gelu_fused', lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        out = mlp.gelu_mlp_cpu_inference(x, fc1, fc2, res)
        ref = mlp.gelu_mlp_reference(x, fc1, fc2, res)
    assert_rel_close(out, ref, TOL[torch.float32])
    chunk_rows = mlp.CHUNK_ELEMENTS // 1024
    expected_calls = -(-rows // chunk_rows) if rows * 1024 > mlp.CHUNK_THRESHOLD else 1
    assert len(calls) == expected_calls and (rows < 4200 or len(calls) > 1)


@pytest.mark.parametrize('contiguous', [True, False])
@pytest.mark.parametrize('with_residual', [False, True])
def test_cpu_fused_linear_equals_reference(with_residual, contiguous):
    layer = nn.Linear(16, 32)
    x = torch.randn(3, 5, 16)
    res = torch.randn(3, 32, 5).transpose(1, 2) if with_residual else None
    if res is not None and contiguous:
        res = res.contiguous()
    with torch.no_grad():
        assert_rel_close(cpu_fused.linear_residual_fused(x, layer, res),
                         cpu_fused.linear_residual_reference(x, layer, res), TOL[torch.float32])
        assert_rel_close(cpu_fused.linear_gelu_fused(x, layer), F.gelu(layer(x)),
                         TOL[torch.float32])


# --------------------------------------------------------------------------- stochastic depth
KEEPS = {'partly': [True, False, True], 'none_dropped': [True] * 3, 'all_dropped': [False] * 3}


class Branch(nn.Module):
    """``residual + fc(LN(x))``, like a block's branch."""

    def __init__(self, dim=8):
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(dim), nn.Linear(dim, dim)

    def forward(self, x, residual=None):
        out = self.fc(self.norm(x))
        return out if residual is None else residual + out


@pytest.mark.parametrize('keep', list(KEEPS))
@pytest.mark.parametrize('device', DEVICES)
def test_stochastic_depth_skip_equals_multiply(device, keep):
    keep = torch.tensor(KEEPS[keep])
    for dtype in [None, *AUTOCAST[device]]:  # None: fp32 without autocast
        torch.manual_seed(0)
        branch = Branch().to(device)
        x = torch.randn(3, 4, 5, 8, device=device, requires_grad=True)
        params = (x, *branch.parameters())
        with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = drop_path.stochastic_depth_skip(x, branch, keep, 0.75)
            ref = drop_path.stochastic_depth_multiply(x, branch, keep, 0.75)
        assert out.dtype == x.dtype  # the residual stream keeps its dtype
        tol = TOL[dtype or torch.float32]
        assert_rel_close(out, ref, tol)
        got = grads(out, params)
        for a, b in zip(got, grads(ref, params)):
            assert a is not None  # every parameter gets a gradient (DDP)
            assert_rel_close(a, b, tol)


def test_stochastic_depth_skip_gradcheck_float64():
    branch = Branch().double()
    x = torch.randn(3, 2, 2, 8, dtype=torch.double, requires_grad=True)
    for keep in KEEPS.values():
        keep = torch.tensor(keep)
        assert torch.autograd.gradcheck(
            lambda t: drop_path.stochastic_depth_skip(t, branch, keep, 0.75), (x, ))


# --------------------------------------------------------------------------- dispatch
def test_dispatch_names_the_path():
    x = torch.randn(2, 3)
    assert select_path(x) is Path.TRAINING
    with torch.no_grad():
        assert select_path(x) is Path.CPU_INFERENCE
        assert select_path(x.double()) is Path.EAGER
        with torch.autocast('cpu', dtype=torch.bfloat16):
            assert select_path(x) is Path.EAGER  # fp32-only kernels are not taken
    with torch.inference_mode():
        assert select_path(x) is Path.CPU_INFERENCE
    seen = []

    @torch.compile(backend='eager', fullgraph=True)
    def traced(t):
        seen.append(select_path(t))
        return t + 1

    traced(x)
    assert seen == [Path.GRAPH]


def test_public_ops_follow_the_dispatch(monkeypatch):
    """Each public op runs the implementation the dispatch names."""
    fc1, fc2 = make_mlp()
    x = torch.randn(2, 3, 6)
    used = []
    for name in ('gelu_mlp_reference', 'gelu_mlp_recompute', 'gelu_mlp_cpu_inference'):
        real = getattr(mlp, name)
        monkeypatch.setattr(mlp, name, lambda *a, real=real, name=name: used.append(name)
                            or real(*a))
    ops.gelu_mlp(x, fc1, fc2)
    with torch.no_grad():
        ops.gelu_mlp(x, fc1, fc2)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            ops.gelu_mlp(x, fc1, fc2)
    assert used == ['gelu_mlp_recompute', 'gelu_mlp_cpu_inference', 'gelu_mlp_reference']
