"""tools/train.py: configs that ask for mixed precision (AmpOptimWrapper, which mmengine runs
only on a GPU) train in fp32 with OptimWrapper on CPU, with a warning; no training is run."""
import logging
import os.path as osp

import pytest
import torch.nn as nn
from mmengine.config import Config
from mmengine.logging import MMLogger
from mmengine.optim import build_optim_wrapper

from tools import train  # tools/ is a namespace package under the repo root

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
AMP_CONFIG = osp.join(REPO, 'configs', 'mask_rcnn_twins_svt_s_3x.py')
FP32_CONFIG = osp.join(REPO, 'configs', 'mask_rcnn_twins_svt_s_1x.py')


class Records(logging.Handler):

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)

    def warnings(self):
        return [r.getMessage() for r in self.records if r.levelno == logging.WARNING]


@pytest.fixture
def log():
    logger = MMLogger.get_current_instance()
    handler = Records()
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(train, 'amp_device_available', lambda: False)


def test_amp_config_switches_to_fp32_on_cpu(no_gpu, log):
    cfg = Config.fromfile(AMP_CONFIG)
    official = cfg.optim_wrapper.to_dict()
    assert official['type'] == 'AmpOptimWrapper' and official['loss_scale'] == 512
    train.amp_config_to_fp32_without_gpu(cfg)

    wrapper = cfg.optim_wrapper.to_dict()
    assert wrapper['type'] == 'OptimWrapper'
    assert 'loss_scale' not in wrapper and 'dtype' not in wrapper
    # everything else (AdamW settings, no-decay rules, clipping) is the official one
    for key in set(official) - {'type', 'loss_scale'}:
        assert wrapper[key] == official[key], key
    built = build_optim_wrapper(nn.Linear(2, 2), cfg.optim_wrapper)  # mmengine takes it on CPU
    assert type(built).__name__ == 'OptimWrapper'

    (warning, ) = log.warnings()
    assert 'No GPU' in warning and 'AmpOptimWrapper' in warning and 'fp32' in warning
    assert 'OptimWrapper instead' in warning and 'loss_scale=512.0' in warning


def test_amp_config_is_kept_where_amp_can_run(monkeypatch, log):
    monkeypatch.setattr(train, 'amp_device_available', lambda: True)
    cfg = Config.fromfile(AMP_CONFIG)
    train.amp_config_to_fp32_without_gpu(cfg)
    assert cfg.optim_wrapper.type == 'AmpOptimWrapper' and cfg.optim_wrapper.loss_scale == 512
    assert log.warnings() == []


def test_fp32_config_is_untouched(no_gpu, log):
    cfg = Config.fromfile(FP32_CONFIG)
    before = cfg.optim_wrapper.to_dict()
    train.amp_config_to_fp32_without_gpu(cfg)
    assert cfg.optim_wrapper.to_dict() == before and log.warnings() == []


def test_amp_flag_still_refused_without_gpu(no_gpu):
    cfg = Config.fromfile(FP32_CONFIG)
    with pytest.raises(SystemExit, match='--amp needs a GPU'):
        train.enable_amp(cfg)


def test_main_applies_the_switch_before_building_the_runner(no_gpu, monkeypatch, tmp_path):
    built = []

    class Runner:
        def train(self):
            pass

    monkeypatch.setattr(train, 'check_data_or_exit', lambda cfg, splits: None)
    monkeypatch.setattr(train, 'build_runner', lambda cfg: built.append(cfg) or Runner())
    train.main([AMP_CONFIG, '--work-dir', str(tmp_path)])
    (cfg, ) = built
    assert cfg.optim_wrapper.type == 'OptimWrapper' and 'loss_scale' not in cfg.optim_wrapper
