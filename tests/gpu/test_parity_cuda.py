"""GPU tier: twins_mm in fp32 on CUDA (TF32 off) against an independent float64 reference:
mmseg 1.2.2's own PCPVT / SVT (another implementation: GSA through nn.MultiheadAttention,
its own window partition and mask) on the CPU in float64, with the same weights. mmseg's
state dict goes into twins_mm through the mmseg -> official key mapping, and twins_mm's
LayerNorm eps is set to mmseg's 1e-5 (mmseg hard-codes it where the official code uses 1e-6).

Sizes, both multiples of 32 (mmseg pads a patch embedding's input to a multiple of its
stride where twins_mm drops the leftover rows, as the official code): 224x224, where every
LSA map is whole windows, and 256x320, where every LSA map is padded on both sides. With
exactly one pad zero, mmseg's mask lets padded keys in (docs/reference.md section 3.2), so
such sizes are not used. Training mode (forward and backward through the training paths)
and inference (no grad, the inference paths). Bound: relative (Frobenius) error of every
output and every parameter gradient <= ``RTOL`` = 1e-5 (fp32 round-off is ~1e-6; the
float32 CPU forward and backward of the same pairs measure <= 1.8e-6 with torch 2.13).
"""
import pytest
import torch

from tests.helpers import perturb_norms_and_biases
from tests.gpu.common import FAMILIES, build, projection_loss, projection_weights, relative_error
from twins_mm.checkpoints import load_pretrained, mmseg_to_official
from twins_mm.models.archs import PCPVT_ARCHS, SVT_ARCHS

pytestmark = pytest.mark.cuda

RTOL = 1e-5
SIZES = [(224, 224), (256, 320)]
DEVICE = 'cuda'


@pytest.fixture
def no_tf32():
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision())
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision('highest')
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
    torch.set_float32_matmul_precision(saved[2])


def mmseg_reference(family):
    """mmseg's built-in model of the same variant (small), random non-trivial weights."""
    try:
        from mmseg.models.backbones import PCPVT, SVT
    except ImportError as err:
        pytest.skip(f'needs mmseg: the independent reference is its built-in PCPVT / SVT '
                    f'({err})')
    s = (SVT_ARCHS if family == 'TwinsSVT' else PCPVT_ARCHS)['small']
    common = dict(embed_dims=s['embed_dims'], num_heads=s['num_heads'],
                  mlp_ratios=s['mlp_ratios'], depths=s['depths'], sr_ratios=s['sr_ratios'],
                  qkv_bias=True, drop_path_rate=0., out_indices=(0, 1, 2, 3))
    torch.manual_seed(0)
    if family == 'TwinsSVT':
        theirs = SVT(windiow_sizes=s['window_sizes'], norm_after_stage=True, **common)
    else:
        theirs = PCPVT(norm_after_stage=False, **common)
    theirs.init_weights()
    perturb_norms_and_biases(theirs)
    return theirs


def pair(family, training):
    """(twins_mm fp32 on DEVICE, mmseg float64 on the CPU), same weights."""
    theirs = mmseg_reference(family)
    ours = build(family)
    load_pretrained(ours, {'state_dict': theirs.state_dict()})
    for m in ours.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.eps = 1e-5
    return ours.to(DEVICE).train(training), theirs.double().train(training)


def worst(errors):
    name = max(errors, key=errors.get)
    return name, errors[name]


@pytest.mark.parametrize('size', SIZES, ids=[f'{h}x{w}' for h, w in SIZES])
@pytest.mark.parametrize('family', FAMILIES)
def test_cuda_fp32_training_step_matches_mmseg_float64(family, size, no_tf32):
    ours, theirs = pair(family, training=True)
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1),
                    dtype=torch.float64)
    ref_outs = theirs(x)
    weights = projection_weights(ref_outs, dtype=torch.float64)
    projection_loss(ref_outs, weights).backward()
    outs = ours(x.float().to(DEVICE))
    projection_loss(outs, [w.float().to(DEVICE) for w in weights]).backward()

    assert [o.shape for o in outs] == [r.shape for r in ref_outs]
    errors = {f'out{i}': relative_error(o, r) for i, (o, r) in enumerate(zip(outs, ref_outs))}
    ref_grads = mmseg_to_official({n: p.grad for n, p in theirs.named_parameters()})
    grads = {n: p.grad for n, p in ours.named_parameters()}
    assert grads.keys() == ref_grads.keys()
    errors.update({n: relative_error(grads[n], g) for n, g in ref_grads.items()})
    name, error = worst(errors)
    assert error <= RTOL, f'{name}: relative error {error:.3g} > {RTOL}'


@pytest.mark.parametrize('size', SIZES, ids=[f'{h}x{w}' for h, w in SIZES])
@pytest.mark.parametrize('family', FAMILIES)
def test_cuda_fp32_inference_matches_mmseg_float64(family, size, no_tf32):
    ours, theirs = pair(family, training=False)
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1),
                    dtype=torch.float64)
    with torch.no_grad():
        ref_outs = theirs(x)
        outs = ours(x.float().to(DEVICE))
    assert [o.shape for o in outs] == [r.shape for r in ref_outs]
    name, error = worst({f'out{i}': relative_error(o, r)
                         for i, (o, r) in enumerate(zip(outs, ref_outs))})
    assert error <= RTOL, f'{name}: relative error {error:.3g} > {RTOL}'
