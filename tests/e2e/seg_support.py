"""Shared by the segmentation end-to-end tests: tiny demo data, a fake ImageNet checkpoint,
a config that records the rank-averaged loss, and subprocess runners for tools/*.py."""
import importlib.util
import os
import os.path as osp
import socket
import subprocess
import sys

import torch

from twins_mm.demo_data.ade20k import make_ade20k
from twins_mm.testing import official_state_dict

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
CONFIG = osp.join(REPO, 'configs', 'fpn_twins_svt_s_80k.py')
SIZE, NUM_TRAIN, NUM_VAL = 64, 8, 4


def _demo_module():
    spec = importlib.util.spec_from_file_location(
        'demo_segmentation', osp.join(REPO, 'tools', 'demo_segmentation.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_workspace(root: str) -> dict:
    data_root = make_ade20k(osp.join(root, 'data'), num_train=NUM_TRAIN, num_val=NUM_VAL,
                            size=SIZE, seed=0)
    pretrained = osp.join(root, 'fake_imagenet_svt_s.pth')
    torch.save({'model': official_state_dict('TwinsSVT', 'small')}, pretrained)
    probe_config = derived_config(
        osp.join(root, 'probe_config.py'), CONFIG,
        "custom_imports = dict(imports=['twins_mm', 'tests.e2e.loss_probe'],\n"
        "                      allow_failed_imports=False)\n"
        "custom_hooks = [dict(type='GlobalLossProbeHook', out_file=None)]\n")
    return dict(root=root, data_root=data_root, pretrained=pretrained,
                probe_config=probe_config)


def derived_config(path: str, base: str, body: str) -> str:
    """Writes a config that inherits ``base`` and adds ``body``; returns its path."""
    with open(path, 'w') as f:
        f.write(f'_base_ = [{base!r}]\n' + body)
    return path


def small_run_options(ws: dict, iters: int, checkpoint_every: int, batch: int = 2,
                      loss_file: str = None, stochastic_depth: bool = False) -> list:
    """The demo's overrides (data root, sizes, iterations, checkpoint), made deterministic:
    fixed seed, no dropout, loading in the main process, no validation. Drop path is 0
    unless ``stochastic_depth``: then the config's own rate stays (mmengine does not save
    the RNG state, so a resumed run would draw other masks than an uninterrupted one)."""
    opts = _demo_module().demo_overrides(ws['data_root'], ws['pretrained'], iters, SIZE,
                                         batch, workers=0)
    opts += [f'default_hooks.checkpoint.interval={checkpoint_every}',
             f'train_cfg.val_interval={iters + 1}', 'default_hooks.logger.interval=1',
             'randomness.seed=0', 'model.decode_head.dropout_ratio=0.0',
             'train_dataloader.persistent_workers=False',
             'val_dataloader.persistent_workers=False',
             'test_dataloader.persistent_workers=False']
    if not stochastic_depth:
        opts.append('model.backbone.drop_path_rate=0.0')
    if loss_file:
        opts.append(f'custom_hooks.0.out_file={loss_file}')
    return opts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def tool_env() -> dict:
    env = dict(os.environ, PYTHONPATH=REPO)
    env.pop('LOCAL_RANK', None)
    return env


def run_tool(args, timeout=600, expect_ok=True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=tool_env(),
                          capture_output=True, text=True, timeout=timeout)
    if expect_ok:
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc


def read_losses(path: str) -> list:
    import json
    with open(path) as f:
        return [json.loads(line) for line in f]
