"""Shared by the GPU tier: building a small backbone, a loss that reaches every output,
per-parameter gradient comparisons, a record of the stochastic-depth draws, and the reasons
to skip where the machine lacks what a test needs (mmcv's CUDA ops, native bf16)."""
import functools
from typing import Dict, List, Optional

import pytest
import torch

import twins_mm

FAMILIES = ['TwinsPCPVT', 'TwinsSVT']


def build(family: str, **kwargs) -> torch.nn.Module:
    return getattr(twins_mm, family)(arch='small', **kwargs)


def projection_weights(outs, seed: int = 123, dtype=torch.float32) -> List[torch.Tensor]:
    """One fixed random tensor per output map: ``sum(mean(out * w))`` gives every output
    element its own gradient (a plain sum would give a constant one)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(o.shape, generator=gen, dtype=dtype).to(o.device) for o in outs]


def projection_loss(outs, weights) -> torch.Tensor:
    return sum((o.to(w.dtype) * w).mean() for o, w in zip(outs, weights))


def gradients(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    return {n: p.grad.detach().double().cpu().clone()
            for n, p in model.named_parameters() if p.grad is not None}


def relative_error(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.detach().double().cpu(), ref.detach().double().cpu()
    return float((a - ref).norm() / ref.norm().clamp_min(1e-30))


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-300))


class DrawRecorder:
    """Records every stochastic-depth keep mask the backbone draws (the model's own
    ``StochasticDepth.draw_keep``; the draw itself is unchanged)."""

    def __init__(self, model: torch.nn.Module):
        self.draws: List[torch.Tensor] = []
        modules = [m for m in model.modules()
                   if hasattr(m, 'draw_keep') and getattr(m, 'drop_prob', 0) > 0]
        assert modules, 'no stochastic-depth module with drop_prob > 0 (draw_keep) found'
        for m in modules:
            m.draw_keep = self._wrap(m.draw_keep)

    def _wrap(self, draw):
        def recorded(batch, device):
            keep = draw(batch, device)
            self.draws.append(keep.detach().cpu().clone())
            return keep
        return recorded

    def partial(self) -> int:
        """How many draws kept some samples of the batch and dropped others."""
        return sum(1 for k in self.draws if 0 < int(k.sum()) < k.numel())

    def clear(self) -> None:
        self.draws.clear()


def cuda_training_setup(family: str, batch: int, size, drop_path_rate: float, with_cp: bool):
    """A seeded backbone on the GPU in training mode with a recorder of its drop draws, an
    input batch and the projection weights of its outputs."""
    torch.manual_seed(0)
    model = build(family, drop_path_rate=drop_path_rate, with_cp=with_cp).cuda()
    recorder = DrawRecorder(model)
    x = torch.randn(batch, 3, *size, device='cuda')
    with torch.no_grad():
        weights = projection_weights(model.eval()(x))
    return model.train(), recorder, x, weights



# --- Why a GPU test cannot run here ---------------------------------------------------------
# A CPU-built mmcv imports fine on a GPU machine and fails only when one of its ops meets a
# CUDA tensor; bf16 on a GPU without native support (compute capability < 8) is emulated.
# The decisions take the facts as arguments (so that tests/gpu/test_skip_reasons.py can
# check them on any machine); the probes below gather the facts of this machine.

def mmcv_cuda_ops_skip_reason(cuda_available: bool, compiling_cuda_version: Optional[str],
                              op_error: Optional[BaseException],
                              mmcv_version: str = '?') -> Optional[str]:
    """Why tests that run mmcv's compiled ops (NMS, RoIAlign: RetinaNet, Mask R-CNN) on the
    GPU cannot run, or None when they can.

    ``compiling_cuda_version``: ``mmcv.ops.get_compiling_cuda_version()`` ('not available'
    for a CPU build; None when mmcv.ops did not import, ``op_error`` then says why);
    ``op_error``: what ``mmcv.ops.nms`` on a CUDA tensor raised (None if it worked).
    """
    if not cuda_available:
        return 'needs a CUDA GPU (run make test-gpu on a GPU machine)'
    if compiling_cuda_version is None:
        return (f'mmcv.ops does not import ({type(op_error).__name__}: {op_error}); '
                'install the pinned stack (make install) to run the detection tier')
    if compiling_cuda_version in ('', 'not available'):
        return (f'mmcv {mmcv_version} was built without CUDA ops '
                f'(mmcv.ops.get_compiling_cuda_version() = {compiling_cuda_version!r}); '
                'install one built with CUDA ops on the GPU machine (a prebuilt mmcv wheel for '
                'your torch/CUDA, or FORCE_CUDA=1 pip install mmcv from source) to run the '
                'detection tier')
    if op_error is not None:
        return (f'mmcv {mmcv_version} (CUDA {compiling_cuda_version}) fails on a CUDA tensor: '
                f'mmcv.ops.nms raised {type(op_error).__name__}: {op_error}')
    return None


def bf16_skip_reason(cuda_available: bool, capability: Optional[tuple]) -> Optional[str]:
    """Why a CUDA bf16 test cannot run, or None: bf16 needs compute capability >= 8
    (Ampere); torch emulates it on older GPUs (``torch.cuda.is_bf16_supported()`` then
    still says True), which measures the emulation, not the model."""
    if not cuda_available:
        return 'needs a CUDA GPU (run make test-gpu on a GPU machine)'
    if capability is None or capability[0] < 8:
        return (f'this GPU has no native bfloat16 (compute capability {capability}, needs '
                '>= 8.0: torch.cuda.is_bf16_supported(including_emulation=False) is False)')
    return None


@functools.lru_cache(maxsize=None)
def probe_mmcv_cuda_ops() -> tuple:
    """(cuda_available, compiling_cuda_version, op_error, mmcv_version) of this machine.
    ``op_error`` is also set when nms runs but returns the wrong boxes."""
    cuda = torch.cuda.is_available()
    try:
        import mmcv
        from mmcv.ops import get_compiling_cuda_version, nms
        compiled = get_compiling_cuda_version()
    except Exception as e:  # ImportError, or a compiled-ops load error
        return cuda, None, e, '?'
    error = None
    if cuda and compiled not in ('', 'not available'):
        try:
            boxes = torch.tensor([[0., 0., 10., 10.], [1., 1., 10., 10.], [20., 20., 30., 30.]],
                                 device='cuda')
            scores = torch.tensor([0.9, 0.8, 0.7], device='cuda')
            _, keep = nms(boxes, scores, iou_threshold=0.5)
            if keep.cpu().tolist() != [0, 2]:
                raise RuntimeError(f'nms kept {keep.cpu().tolist()} instead of [0, 2]')
        except Exception as e:
            error = e
    return cuda, compiled, error, mmcv.__version__


def skip_without_mmcv_cuda_ops() -> None:
    cuda, compiled, error, version = probe_mmcv_cuda_ops()
    reason = mmcv_cuda_ops_skip_reason(cuda, compiled, error, mmcv_version=version)
    if reason:
        pytest.skip(reason)


def skip_without_native_bf16() -> None:
    cuda = torch.cuda.is_available()
    reason = bf16_skip_reason(cuda, torch.cuda.get_device_capability() if cuda else None)
    if reason:
        pytest.skip(reason)
