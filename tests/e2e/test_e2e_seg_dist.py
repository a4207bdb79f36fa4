"""End to end, distributed (slow): tools/dist_train.sh with 2 processes on gloo (CPU)
follows the same loss and LR curve as one process with the same global batch.

What makes the two comparable: the global batch is equal (2 x 1 vs 1 x 2); InfiniteSampler
gives rank r the indices r::2 of one seeded permutation, i.e. exactly the pairs a single
process batches; augmentation is off (each process has its own numpy RNG), dropout and
drop path are 0; the heads use GroupNorm, since per-process BN statistics (what runs
instead of SyncBN on CPU) differ from whole-batch ones; and the loss averaged over ranks
(tests/e2e/loss_probe.py) is what the averaged DDP gradient belongs to. The loss is a mean
over all pixels of equal-sized images, so the mean of per-rank means is the batch mean.
"""
import os.path as osp
import subprocess

import pytest

from tests.e2e.seg_support import (REPO, derived_config, free_port, make_workspace, read_losses,
                                   run_tool, small_run_options, tool_env)

ITERS = 4
# Summation order differs (gloo all-reduce vs one batch): float32 noise, amplified a little
# by Adam's normalisation over a few steps.
LOSS_RTOL = 1e-5  # measured: about 1e-7


@pytest.fixture(scope='module')
def ws(tmp_path_factory):
    ws = make_workspace(str(tmp_path_factory.mktemp('seg_dist')))
    ws['dist_config'] = derived_config(
        osp.join(ws['root'], 'dist_config.py'), ws['probe_config'],
        "model = dict(decode_head=dict(\n"
        "    norm_cfg=dict(type='GN', num_groups=32, requires_grad=True)))\n"
        "train_dataloader = dict(dataset=dict(pipeline=[\n"
        "    dict(type='LoadImageFromFile'),\n"
        "    dict(type='LoadAnnotations', reduce_zero_label=True),\n"
        "    dict(type='PackSegInputs')]))\n")
    return ws


def options(ws, batch, loss_file):
    return [o for o in small_run_options(ws, ITERS, ITERS, batch=batch, loss_file=loss_file)
            if not o.startswith('train_dataloader.dataset.pipeline.')]


def test_two_gloo_processes_match_one_process(ws):
    single = osp.join(ws['root'], 'single.jsonl')
    run_tool(['tools/train.py', ws['dist_config'], '--work-dir', osp.join(ws['root'], 'single'),
              '--cfg-options', *options(ws, 2, single)])

    dist = osp.join(ws['root'], 'dist.jsonl')
    env = dict(tool_env(), PORT=str(free_port()), PYTHON=__import__('sys').executable)
    proc = subprocess.run(
        ['bash', 'tools/dist_train.sh', ws['dist_config'], '2', '--work-dir',
         osp.join(ws['root'], 'dist'), '--cfg-options', *options(ws, 1, dist)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert 'distributed run on the gloo backend' in proc.stdout + proc.stderr

    single_curve, dist_curve = read_losses(single), read_losses(dist)
    assert [r['iter'] for r in dist_curve] == list(range(1, ITERS + 1))
    assert [r['iter'] for r in single_curve] == list(range(1, ITERS + 1))
    for s, d in zip(single_curve, dist_curve):
        assert d['loss'] == pytest.approx(s['loss'], rel=LOSS_RTOL), (s, d)
        assert d['lr'] == pytest.approx(s['lr'], rel=1e-9)
    # Not a flat curve: the comparison would be vacuous if nothing trained.
    assert single_curve[-1]['loss'] != pytest.approx(single_curve[0]['loss'], rel=1e-3)
