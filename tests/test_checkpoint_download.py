"""A checkpoint URL that cannot be fetched (an offline cluster, a proxy, a wrong URL) stops
with one error that names the URL and how to use a local copy instead of urllib's traceback.

``.invalid`` is a reserved top-level domain that never resolves, with or without network.
"""
import pytest
import torch

import twins_mm
from twins_mm.checkpoints import CheckpointDownloadError, read_checkpoint


@pytest.fixture
def empty_hub(tmp_path):
    before = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / 'hub'))
    yield tmp_path / 'hub' / 'checkpoints'
    torch.hub.set_dir(before)


@pytest.mark.parametrize('name', ['alt_gvt_small_20220308-7e1c3695.pth', 'model.safetensors'])
def test_unreachable_url_names_the_local_file_fix(empty_hub, name):
    url = f'https://twins-mm-test.invalid/weights/{name}'
    with pytest.raises(CheckpointDownloadError) as err:
        read_checkpoint(url)
    message = str(err.value)
    assert message.startswith(f'Cannot download {url} (')
    assert f'model.backbone.init_cfg.checkpoint=/path/to/{name}' in message
    assert str(empty_hub) in message


def test_backbone_init_weights_raises_the_same_error(empty_hub):
    model = twins_mm.TwinsSVT('small', init_cfg=dict(
        type='Pretrained', checkpoint='https://twins-mm-test.invalid/alt_gvt_small.pth'))
    with pytest.raises(CheckpointDownloadError,
                       match='init_cfg.checkpoint=/path/to/alt_gvt_small.pth'):
        model.init_weights()
