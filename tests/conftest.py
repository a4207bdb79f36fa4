import pytest
import torch

import twins_mm  # noqa: F401  (registers the backbones, installs the safe loader)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
