import os

# Idle OpenMP threads sleep instead of spinning (set before torch loads its OpenMP runtime;
# inherited by the tools the tests start). Numerics and thread counts are unchanged; on a
# shared machine, spinning threads of one process steal the cores the other needs: with a
# load of ~12 on 2 cores a small backbone's forward took 4.6 s spinning and 0.03 s passive.
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

import pytest  # noqa: E402
import torch  # noqa: E402

import twins_mm  # noqa: F401,E402  (registers the backbones, installs the safe loader)
from tests.helpers import global_torch_flags, restore_global_torch_flags  # noqa: E402

CUDA_SKIP_REASON = 'needs a CUDA GPU (run make test-gpu on a GPU machine)'


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _restore_torch_flags():
    """TF32, cuDNN autotuning / determinism, deterministic algorithms and the CPU thread
    count are process-wide: whatever a test sets, the next test starts from the same state."""
    saved = global_torch_flags()
    yield
    if global_torch_flags() != saved:
        restore_global_torch_flags(saved)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` (the GPU tier, tests/gpu) are reported as skipped, with the
    reason, where torch sees no CUDA device; they are the only tests allowed to skip."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=CUDA_SKIP_REASON)
    for item in items:
        if item.get_closest_marker('cuda') is not None:
            item.add_marker(skip)
