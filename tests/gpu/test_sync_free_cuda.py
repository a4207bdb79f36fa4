"""GPU tier: a training forward + backward makes no host-device synchronisation.

``torch.cuda.set_sync_debug_mode('error')`` turns every synchronising CUDA call (a blocking
copy from pageable memory, ``.item()``, ``nonzero`` on the device, ...) into an error. Both
families, stochastic depth 0.5 at batch 8 (partly dropped batches, checked), fp32 and fp16
autocast, with and without ``with_cp``. One step runs first outside the check (lazy
initialisation of CUDA libraries may synchronise once).
"""
import pytest
import torch

from tests.gpu.common import FAMILIES, cuda_training_setup, projection_loss

pytestmark = pytest.mark.cuda


def _forward_backward(model, x, weights, amp):
    with torch.autocast('cuda', dtype=torch.float16, enabled=amp):
        loss = projection_loss(model(x), weights)
    loss.backward()


@pytest.mark.parametrize('with_cp', [False, True], ids=['no_cp', 'with_cp'])
@pytest.mark.parametrize('amp', [False, True], ids=['fp32', 'fp16'])
@pytest.mark.parametrize('family', FAMILIES)
def test_training_step_does_not_synchronise(family, amp, with_cp):
    model, recorder, x, weights = cuda_training_setup(family, 8, (224, 224), 0.5, with_cp)
    _forward_backward(model, x, weights, amp)  # warm-up, not checked
    torch.cuda.synchronize()
    recorder.clear()
    model.zero_grad(set_to_none=True)

    torch.cuda.set_sync_debug_mode('error')
    try:
        _forward_backward(model, x, weights, amp)
    finally:
        torch.cuda.set_sync_debug_mode('default')
    torch.cuda.synchronize()
    assert recorder.partial() > 0, 'no partly dropped batch in the checked step'
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
