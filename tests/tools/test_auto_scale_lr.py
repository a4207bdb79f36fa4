"""``tools/train.py CONFIG --auto-scale-lr`` scales the learning rate for every zoo config.

Each config runs through ``tools/train.py``'s own ``main`` (argument parsing, config loading,
``--auto-scale-lr``, the data check, ``Runner.train``: dataloaders, the config's optimizer
wrapper with its paramwise rules, mmengine's LR scaling, the config's schedulers) on a few demo
images. A wrapper config changes two things: the model is a tiny one with parameters named
like the backbone's (``pos_block``, ``norm``, a linear layer), so that building 36 detectors
and segmentors does not dominate the test (the LR scaling does not read the model), and one
hook, at ``before_run`` (after the optimizer is built, its LR scaled and the schedulers
built, before any iteration), records each parameter group's ``initial_lr`` and stops the run.
The expectation comes from the config the run loaded (``runner.cfg``): lr x world size (1) x
images per GPU / ``auto_scale_lr.base_batch_size``, and that base batch must be the global
batch of the official setup the LR belongs to (its GPUs x the config's images per GPU), so the
LR moves by 1 / GPUs here.
"""
import functools
import os.path as osp
import sys
from pathlib import Path

import mmengine.config.utils as mmengine_config_utils
import pytest
import torch.nn as nn
from mmengine.hooks import Hook
from mmengine.model import BaseModel
from mmengine.registry import HOOKS, MODELS

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / 'tools'))

import train  # noqa: E402

from twins_mm.demo_data.ade20k import make_ade20k  # noqa: E402
from twins_mm.demo_data.coco import make_coco  # noqa: E402

CONFIGS = sorted(p.stem for p in (REPO / 'configs').glob('*.py')
                 if p.stem.split('_twins_')[0] in ('fpn', 'upernet', 'retinanet', 'mask_rcnn'))
# GPUs of the setup each config's LR belongs to (the paper: global batch 16; the official
# UPerNet PCPVT-S run: 8 GPUs x 4 images = 32). Global batch = GPUs x the config's images/GPU.
OFFICIAL_GPUS = {'fpn': 4, 'upernet': 8, 'retinanet': 8, 'mask_rcnn': 8}
# mmengine reads every metafile of mmseg / mmdet for each `mmseg::` / `mmdet::` base of every
# config it loads (about a second each); the answer depends only on the installed packages.
_cfg_metainfo = functools.lru_cache(maxsize=None)(mmengine_config_utils._get_cfg_metainfo)


class LrRecorded(Exception):
    def __init__(self, runner):
        self.lrs = [g['initial_lr'] for g in runner.optim_wrapper.optimizer.param_groups]
        cfg = runner.cfg
        self.base_lr = cfg.optim_wrapper.optimizer.lr
        self.batch = cfg.train_dataloader.batch_size
        self.base_batch = cfg.auto_scale_lr.base_batch_size
        self.world_size = runner.world_size
        super().__init__(f'initial lr of each param group: {self.lrs}')


@HOOKS.register_module(force=True)
class RecordLrAndStop(Hook):
    def before_run(self, runner):
        raise LrRecorded(runner)


@MODELS.register_module(force=True)
class TinyLrModel(BaseModel):
    """Parameters in the three groups the configs' paramwise rules can make."""

    def __init__(self, data_preprocessor=None):
        super().__init__(data_preprocessor=data_preprocessor)
        self.pos_block = nn.Conv2d(3, 3, 3, groups=3)  # no weight decay in the 3x / UPerNet
        self.norm = nn.LayerNorm(3)                     # configs
        self.proj = nn.Linear(3, 3)

    def forward(self, inputs=None, data_samples=None, mode='tensor'):
        raise AssertionError('the run must stop before the first iteration')


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp('data')
    ade = make_ade20k(str(root / 'ade'), num_train=2, num_val=1, size=64)
    coco = make_coco(str(root / 'coco'), num_train=2, num_val=1)
    return ade, coco


def data_options(config, data):
    ade, coco = data
    if config.startswith(('fpn', 'upernet')):
        return [f'{split}_dataloader.dataset.data_root={ade}' for split in ('train', 'val')]
    ann = osp.join(coco, 'annotations', 'instances_val2017.json')
    return ([f'{split}_dataloader.dataset.data_root={coco}' for split in ('train', 'val')]
            + [f'val_evaluator.ann_file={ann}'])


@pytest.fixture
def fast_config_loading(monkeypatch):
    """The Runner logs and dumps the config through yapf (seconds per config, nothing the LR
    depends on): the text stays as mmengine writes it, unformatted. mmengine's metafile lookup
    for `mmseg::` / `mmdet::` bases is memoised (same answers)."""
    import mmengine.config.config as mmengine_config
    monkeypatch.setattr(mmengine_config, 'FormatCode', lambda text, **kwargs: (text, False))
    monkeypatch.setattr(mmengine_config_utils, '_get_cfg_metainfo', _cfg_metainfo)


@pytest.mark.parametrize('config', CONFIGS)
def test_auto_scale_lr_scales_by_the_actual_batch(config, data, tmp_path, fast_config_loading):
    path = REPO / 'configs' / f'{config}.py'
    wrapper = tmp_path / f'{config}_record_lr.py'
    wrapper.write_text(f'_base_ = [{str(path)!r}]\n'
                       "model = dict(_delete_=True, type='TinyLrModel')\n"
                       "custom_hooks = [dict(type='RecordLrAndStop')]\n")
    no_workers = [f'{split}_dataloader.{key}'
                  for split in ('train', 'val') for key in ('num_workers=0',
                                                            'persistent_workers=False',
                                                            'dataset.serialize_data=False')]
    argv = [str(wrapper), '--auto-scale-lr', '--work-dir', str(tmp_path / 'work'),
            '--cfg-options', *no_workers, *data_options(config, data)]
    with pytest.raises(LrRecorded) as recorded:
        train.main(argv)
    run = recorded.value

    gpus = OFFICIAL_GPUS[config.split('_twins_')[0]]
    assert run.base_batch == gpus * run.batch, (
        f'{config}: auto_scale_lr.base_batch_size is {run.base_batch}, but its LR belongs to '
        f'{gpus} GPUs x {run.batch} images')
    assert run.world_size == 1
    want = run.base_lr * run.world_size * run.batch / run.base_batch  # = base_lr / gpus
    assert len(run.lrs) >= 1 and all(lr == pytest.approx(want, rel=1e-9) for lr in run.lrs), (
        config, run.lrs, want)
    assert want == pytest.approx(run.base_lr / gpus)
