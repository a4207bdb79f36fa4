"""Shared by the GPU tier: building a small backbone, a loss that reaches every output,
per-parameter gradient comparisons and a record of the stochastic-depth draws."""
from typing import Dict, List

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

