"""Safe loading of mmengine checkpoints under torch >= 2.6 (weights_only=True)."""
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn as nn
from mmengine.logging import MessageHub
from mmengine.model import BaseModel
from mmengine.runner import Runner
from mmengine.runner.checkpoint import _load_checkpoint

from twins_mm import compat


class Payload:
    """An arbitrary class: loading it would run its __reduce__ / __setstate__."""

    def __reduce__(self):
        return (os.getcwd, ())


def mmengine_style_checkpoint():
    hub = MessageHub.get_instance('twins_mm_compat_test')
    hub.update_scalar('train/loss', np.float64(0.25))
    hub.update_scalar('val/mIoU', np.float32(41.5))
    hub.update_info('best_score', np.float64(41.5))
    return {
        'meta': {'epoch': 1, 'iter': 2, 'seed': np.int64(7), 'hist': np.arange(4.0),
                 'dataset_meta': {'classes': ('a', 'b'), 'palette': [[1, 2, 3]]}},
        'state_dict': {'w': torch.ones(2)},
        'message_hub': hub.state_dict(),
    }


def test_mmengine_checkpoint_with_history_buffer_and_numpy_loads(tmp_path):
    path = tmp_path / 'epoch_1.pth'
    torch.save(mmengine_style_checkpoint(), path)
    loaded = _load_checkpoint(str(path), map_location='cpu')
    buf = loaded['message_hub']['log_scalars']['train/loss']
    assert type(buf).__name__ == 'HistoryBuffer' and buf.current() == 0.25
    assert loaded['meta']['hist'].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert loaded['message_hub']['runtime_info']['best_score'] == 41.5
    # torch.load's own default (weights_only=True) also accepts it once twins_mm is imported
    assert torch.load(path)['meta']['seed'] == 7


def test_arbitrary_pickled_object_is_refused_with_clear_message(tmp_path, monkeypatch):
    monkeypatch.delenv(compat.TRUST_ENV, raising=False)
    path = tmp_path / 'evil.pth'
    torch.save({'state_dict': {'w': torch.ones(1)}, 'meta': {'x': Payload()}}, path)
    with pytest.raises(compat.UntrustedCheckpointError) as err:
        _load_checkpoint(str(path), map_location='cpu')
    msg = str(err.value)
    assert 'posix.getcwd' in msg or 'os.getcwd' in msg
    assert str(path) in msg and compat.TRUST_ENV in msg and 'add_safe_globals' in msg
    assert 'weights_only=False' not in msg  # we never advise switching safety off globally

    monkeypatch.setenv(compat.TRUST_ENV, str(tmp_path))
    assert _load_checkpoint(str(path), map_location='cpu')['meta']['x'] == os.getcwd()


@pytest.fixture(autouse=True)
def no_trust_leaks_out_of_a_test():
    """Every test here must leave twins_mm's process-wide trust list as it found it: a
    file trusted in one test would load unchecked in every later one."""
    before = compat.trusted_paths()
    yield
    assert compat.trusted_paths() == before, 'a test left a checkpoint trusted'


def payload_files(tmp_path):
    trusted, other = tmp_path / 'trusted.pth', tmp_path / 'other.pth'
    for p in (trusted, other):
        torch.save({'x': Payload()}, p)
    return str(trusted), str(other)


def test_trust_checkpoint_opt_in_is_per_file(tmp_path, monkeypatch):
    monkeypatch.delenv(compat.TRUST_ENV, raising=False)
    trusted, other = payload_files(tmp_path)
    with compat.trust_checkpoint(trusted):
        assert _load_checkpoint(trusted)['x'] == os.getcwd()
        with pytest.raises(pickle.UnpicklingError):
            _load_checkpoint(other)


def test_trust_ends_with_the_block_and_on_revoke(tmp_path, monkeypatch):
    monkeypatch.delenv(compat.TRUST_ENV, raising=False)
    trusted, _ = payload_files(tmp_path)
    with compat.trust_checkpoint(trusted):
        assert _load_checkpoint(trusted)['x'] == os.getcwd()
    with pytest.raises(compat.UntrustedCheckpointError):  # refused again
        _load_checkpoint(trusted)
    assert os.path.realpath(trusted) not in compat.trusted_paths()

    grant = compat.trust_checkpoint(trusted)  # the plain call: trusted until revoked
    assert _load_checkpoint(trusted)['x'] == os.getcwd()
    grant.revoke()
    with pytest.raises(compat.UntrustedCheckpointError):
        _load_checkpoint(trusted)


def test_a_nested_opt_in_keeps_an_earlier_one(tmp_path, monkeypatch):
    monkeypatch.delenv(compat.TRUST_ENV, raising=False)
    trusted, _ = payload_files(tmp_path)
    outer = compat.trust_checkpoint(trusted)
    try:
        with compat.trust_checkpoint(trusted):
            pass
        assert _load_checkpoint(trusted)['x'] == os.getcwd()  # still trusted by `outer`
    finally:
        outer.revoke()


class ToyModel(BaseModel):

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 1)

    def forward(self, inputs, labels=None, mode='loss'):
        out = self.linear(inputs)
        if mode == 'loss':
            return {'loss': ((out.squeeze(-1) - labels) ** 2).mean()}
        return out


class ToyDataset(torch.utils.data.Dataset):

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return dict(inputs=torch.tensor([float(i), 1.0]), labels=torch.tensor(float(i % 3)))


def make_runner(work_dir, max_iters, resume):
    return Runner(
        model=ToyModel(), work_dir=str(work_dir), experiment_name=f'toy{max_iters}{resume}',
        train_dataloader=dict(dataset=ToyDataset(), sampler=dict(type='DefaultSampler'),
                              batch_size=2, collate_fn=dict(type='default_collate')),
        optim_wrapper=dict(optimizer=dict(type='AdamW', lr=0.01)),
        param_scheduler=dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=4),
        train_cfg=dict(by_epoch=False, max_iters=max_iters, val_interval=100),
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=2, by_epoch=False),
                           logger=dict(type='LoggerHook', interval=1)),
        resume=resume, default_scope='mmengine')


def test_runner_resume_from_its_own_checkpoint(tmp_path):
    make_runner(tmp_path, 2, False).train()
    assert (tmp_path / 'iter_2.pth').exists()
    runner = make_runner(tmp_path, 4, True)
    runner.train()
    assert runner.iter == 4
    ckpt = _load_checkpoint(str(tmp_path / 'iter_4.pth'))
    assert ckpt['meta']['iter'] == 4 and 'optimizer' in ckpt


def test_getattr_is_restricted_to_history_buffer_statistics(tmp_path):
    class Reach:
        def __reduce__(self):
            return (getattr, (np.ndarray, 'tofile'))

    path = tmp_path / 'reach.pth'
    torch.save({'x': Reach()}, path)
    with pytest.raises(compat.UntrustedCheckpointError, match='numpy.ndarray.tofile'):
        _load_checkpoint(str(path))
