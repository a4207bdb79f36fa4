import pytest
import torch

import twins_mm  # noqa: F401  (registers the backbones, installs the safe loader)

CUDA_SKIP_REASON = 'needs a CUDA GPU (run make test-gpu on a GPU machine)'


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` (the GPU tier, tests/gpu) are reported as skipped, with the
    reason, where torch sees no CUDA device; they are the only tests allowed to skip."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=CUDA_SKIP_REASON)
    for item in items:
        if item.get_closest_marker('cuda') is not None:
            item.add_marker(skip)
