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


def make_runner(work_dir, max_iters, resume, model_seed=0):
    torch.manual_seed(model_seed)  # the initial weights
    return Runner(
        model=ToyModel(), work_dir=str(work_dir), experiment_name=f'toy{max_iters}{resume}',
        train_dataloader=dict(dataset=ToyDataset(), sampler=dict(type='DefaultSampler'),
                              batch_size=2, collate_fn=dict(type='default_collate')),
        optim_wrapper=dict(optimizer=dict(type='AdamW', lr=0.01)),
        param_scheduler=dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=4),
        train_cfg=dict(by_epoch=False, max_iters=max_iters, val_interval=100),
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=2, by_epoch=False),
                           logger=dict(type='LoggerHook', interval=1)),
        randomness=dict(seed=0), resume=resume, default_scope='mmengine')


def test_runner_resume_from_its_own_checkpoint(tmp_path):
    """Train 2 iterations, resume (through twins_mm's safe loading of the message hub's
    HistoryBuffers and the numpy meta) to 4: weights, AdamW moments, LR schedule and logged
    history equal those of an uninterrupted 4-iteration run. The resumed runner's model is
    built from another seed: a resume that loaded nothing would train those weights."""
    straight = make_runner(tmp_path / 'straight', 4, False)
    straight.train()
    make_runner(tmp_path / 'resumed', 2, False).train()
    assert (tmp_path / 'resumed' / 'iter_2.pth').exists()
    runner = make_runner(tmp_path / 'resumed', 4, True, model_seed=1)
    runner.train()
    assert runner.iter == 4
    a = _load_checkpoint(str(tmp_path / 'straight' / 'iter_4.pth'))
    b = _load_checkpoint(str(tmp_path / 'resumed' / 'iter_4.pth'))
    assert a['meta']['iter'] == b['meta']['iter'] == 4
    assert a['state_dict'].keys() == b['state_dict'].keys()
    for key, value in a['state_dict'].items():
        torch.testing.assert_close(b['state_dict'][key], value, rtol=1e-6, atol=1e-7)
    sa, sb = a['optimizer']['state'], b['optimizer']['state']
    assert sa.keys() == sb.keys() and sa
    for i in sa:
        assert float(sa[i]['step']) == float(sb[i]['step']) == 4.
        for moment in ('exp_avg', 'exp_avg_sq'):
            torch.testing.assert_close(sb[i][moment], sa[i][moment], rtol=1e-6, atol=1e-9)
    assert a['optimizer']['param_groups'][0]['lr'] == b['optimizer']['param_groups'][0]['lr']
    assert a['param_schedulers'] == b['param_schedulers']
    assert a['param_schedulers'][0]['last_step'] == 3  # LinearLR over iterations 0..3
    # the resumed run's logged LR history holds the two values saved at iteration 2, then
    # its own two: LinearLR from 0.1 to 1 of lr=0.01 over 3 steps
    lr_a = a['message_hub']['log_scalars']['train/lr'].data[0]
    lr_b = b['message_hub']['log_scalars']['train/lr'].data[0]
    np.testing.assert_allclose(lr_b, lr_a, rtol=1e-7)
    np.testing.assert_allclose(lr_a, 0.01 * np.array([0.1, 0.4, 0.7, 1.0]), rtol=1e-6)


def test_getattr_is_restricted_to_history_buffer_statistics(tmp_path):
    class Reach:
        def __reduce__(self):
            return (getattr, (np.ndarray, 'tofile'))

    path = tmp_path / 'reach.pth'
    torch.save({'x': Reach()}, path)
    with pytest.raises(compat.UntrustedCheckpointError, match='numpy.ndarray.tofile'):
        _load_checkpoint(str(path))
