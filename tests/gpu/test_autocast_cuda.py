"""GPU tier: a training step of both backbones under CUDA autocast, against fp32.

fp16 goes through ``torch.amp.GradScaler`` (as mmengine's AmpOptimWrapper does), bf16 without
one. Stochastic depth 0.3 (partly dropped batches, checked), with and without ``with_cp``,
224x320 inputs (SVT's 7x7 windows padded in every stage). The fp32 step uses the same
weights, input and stochastic-depth draws.

Bounds: every gradient finite; for each parameter the cosine similarity of its autocast
gradient to its fp32 gradient >= ``COS_BOUND[dtype]`` and its norm within ``NORM_RTOL`` = 5%
of the fp32 norm (cosine alone would not see a wrong scale); a parameter whose fp32 gradient is
exactly zero, a branch dropped for the whole batch, must get an exactly zero one; outputs
within ``OUT_RTOL[dtype]`` relative (Frobenius) of fp32. Eval-mode output differences of
about 1e-3 (fp16) and 1e-2 (bf16) were measured on an H200 (torch 2.11, CUDA 13); the same
step in bf16 on CPU at 64x96 gave output differences <= 1.2e-2, per-parameter cosines
>= 0.997 and norms within 2%.
"""
import pytest
import torch

from tests.gpu.common import (FAMILIES, cosine, cuda_training_setup, gradients,
                              projection_loss, relative_error, skip_without_native_bf16)

pytestmark = pytest.mark.cuda

COS_BOUND = {torch.float16: 0.99, torch.bfloat16: 0.98}
OUT_RTOL = {torch.float16: 5e-3, torch.bfloat16: 3e-2}
NORM_RTOL = 0.05  # cosine ignores scale: each gradient's norm within 5% of fp32's too


def _step(model, x, weights, dtype, seed):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same stochastic-depth draws in every step
    with torch.autocast('cuda', dtype=dtype or torch.float16, enabled=dtype is not None):
        outs = model(x)
        loss = projection_loss(outs, weights)
    scale = None
    if dtype is torch.float16:
        scaler = torch.amp.GradScaler('cuda')
        optimizer = torch.optim.SGD(model.parameters(), lr=0.)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        scaler.step(optimizer)
        scaler.update()
        scale = scaler.get_scale()  # halved if any gradient overflowed
    else:
        loss.backward()
    torch.cuda.synchronize()
    return [o.detach().float() for o in outs], gradients(model), scale


@pytest.mark.parametrize('with_cp', [False, True], ids=['no_cp', 'with_cp'])
@pytest.mark.parametrize('dtype', ['float16', 'bfloat16'])
@pytest.mark.parametrize('family', FAMILIES)
def test_backbone_autocast_training_step_matches_fp32(family, dtype, with_cp):
    dtype = getattr(torch, dtype)
    if dtype is torch.bfloat16:
        skip_without_native_bf16()
    model, recorder, x, weights = cuda_training_setup(family, 4, (224, 320), 0.3, with_cp)

    ref_outs, ref_grads, _ = _step(model, x, weights, None, seed=1)
    ref_draws = list(recorder.draws)
    recorder.clear()
    outs, grads, scale = _step(model, x, weights, dtype, seed=1)
    assert [d.tolist() for d in recorder.draws[:len(ref_draws)]] == \
        [d.tolist() for d in ref_draws], 'autocast and fp32 steps drew different masks'
    assert recorder.partial() > 0, 'no partly dropped batch: raise drop_path_rate or batch'
    if scale is not None:
        assert scale == 2.**16, f'GradScaler found inf/NaN gradients (scale now {scale})'

    for out, ref in zip(outs, ref_outs):
        assert torch.isfinite(out).all()
        assert relative_error(out, ref) <= OUT_RTOL[dtype], relative_error(out, ref)
    assert grads.keys() == ref_grads.keys()
    bad = {}
    for name, ref in ref_grads.items():
        g = grads[name]
        assert torch.isfinite(g).all(), f'{name}: non-finite gradient'
        if ref.abs().max() == 0:
            if g.abs().max() != 0:
                bad[name] = 'non-zero gradient where fp32 has exactly zero'
            continue
        c = cosine(g, ref)
        ratio = float(g.norm() / ref.norm())
        if c < COS_BOUND[dtype] or abs(ratio - 1) > NORM_RTOL:
            bad[name] = f'cosine {c:.4f}, norm ratio {ratio:.4f}'
    assert not bad, f'{len(bad)} parameters below cosine {COS_BOUND[dtype]}: {bad}'
