"""End to end, in subprocesses (slow): tools/train.py on demo ADE20K data writes checkpoints,
tools/test.py computes mIoU with IoUMetric (checked against the written predictions),
tools/inference.py writes an overlay, and a run killed after its first checkpoint resumes
with the state it had."""
import glob
import json
import os.path as osp
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest
import torch

from tests.e2e.seg_support import (NUM_VAL, REPO, derived_config, make_workspace, read_losses,
                                   run_tool, small_run_options, tool_env)

ITERS, EVERY = 6, 2


@pytest.fixture(scope='module')
def ws(tmp_path_factory):
    return make_workspace(str(tmp_path_factory.mktemp('seg_e2e')))


@pytest.fixture(scope='module')
def uninterrupted(ws):
    work_dir = osp.join(ws['root'], 'uninterrupted')
    losses = osp.join(ws['root'], 'uninterrupted_losses.jsonl')
    run_tool(['tools/train.py', ws['probe_config'], '--work-dir', work_dir, '--cfg-options',
              *small_run_options(ws, ITERS, EVERY, loss_file=losses)])
    return dict(work_dir=work_dir, losses=losses)


def load(path):
    return torch.load(path, map_location='cpu', weights_only=False)


def test_train_writes_checkpoints(uninterrupted):
    work_dir = uninterrupted['work_dir']
    for it in range(EVERY, ITERS + 1, EVERY):
        assert osp.isfile(osp.join(work_dir, f'iter_{it}.pth'))
    ckpt = load(osp.join(work_dir, f'iter_{ITERS}.pth'))
    assert ckpt['meta']['iter'] == ITERS
    assert any(k.startswith('backbone.blocks.') for k in ckpt['state_dict'])
    assert 'optimizer' in ckpt and 'param_schedulers' in ckpt
    assert [r['iter'] for r in read_losses(uninterrupted['losses'])] == list(range(1, ITERS + 1))


def miou_from_files(pred_dir, ann_dir, num_classes=150):
    """IoUMetric's mIoU, recomputed from the written label PNGs (values 1..150, 0 = ignore)."""
    inter, union = np.zeros(num_classes), np.zeros(num_classes)
    for ann_path in sorted(glob.glob(osp.join(ann_dir, '*.png'))):
        gt = cv2.imread(ann_path, cv2.IMREAD_UNCHANGED).astype(int) - 1
        pred = cv2.imread(osp.join(pred_dir, osp.basename(ann_path)),
                          cv2.IMREAD_UNCHANGED).astype(int) - 1
        valid = gt >= 0
        gt, pred = gt[valid], pred[valid]
        i = np.bincount(gt[gt == pred], minlength=num_classes)
        inter += i
        union += np.bincount(gt, minlength=num_classes) + \
            np.bincount(pred, minlength=num_classes) - i
    with np.errstate(invalid='ignore', divide='ignore'):
        return float(np.nanmean(inter / union) * 100)


def test_test_computes_miou_and_writes_predictions(ws, uninterrupted):
    checkpoint = osp.join(uninterrupted['work_dir'], f'iter_{ITERS}.pth')
    out = osp.join(ws['root'], 'test')
    run_tool(['tools/test.py', ws['probe_config'], checkpoint, '--work-dir', out,
              '--out', osp.join(out, 'pred'), '--show-dir', osp.join(out, 'show'),
              '--cfg-options', *small_run_options(ws, ITERS, EVERY)])
    [metrics_file] = glob.glob(osp.join(out, '*', '*.json'))
    with open(metrics_file) as f:
        metrics = json.load(f)
    assert 0 <= metrics['mIoU'] <= 100
    preds = glob.glob(osp.join(out, 'pred', '*.png'))
    assert len(preds) == NUM_VAL
    expected = miou_from_files(osp.join(out, 'pred'),
                               osp.join(ws['data_root'], 'annotations', 'validation'))
    assert metrics['mIoU'] == pytest.approx(expected, abs=0.01)
    shown = glob.glob(osp.join(out, 'show', '**', '*.png'), recursive=True)
    assert len(shown) == NUM_VAL


def test_inference_writes_overlay(ws, uninterrupted):
    image = sorted(glob.glob(osp.join(ws['data_root'], 'images', 'validation', '*.jpg')))[0]
    out = osp.join(ws['root'], 'overlay.png')
    run_tool(['tools/inference.py', ws['probe_config'],
              osp.join(uninterrupted['work_dir'], f'iter_{ITERS}.pth'), image, '--out', out,
              '--device', 'cpu'])
    overlay, original = cv2.imread(out), cv2.imread(image)
    assert overlay.shape == original.shape
    assert not np.array_equal(overlay, original)


def wait_for_first_checkpoint(proc, work_dir, timeout=300):
    marker = osp.join(work_dir, 'last_checkpoint')
    deadline = time.time() + timeout
    while time.time() < deadline:
        if osp.isfile(marker):
            with open(marker) as f:
                saved = f.read().strip()
            if saved and osp.isfile(saved):
                return
        assert proc.poll() is None, 'training ended before its first checkpoint'
        time.sleep(0.05)
    raise AssertionError('no checkpoint within the timeout')


def test_resume_after_kill_continues_with_the_state_it_had(ws, uninterrupted):
    work_dir = osp.join(ws['root'], 'killed')
    losses = osp.join(ws['root'], 'killed_losses.jsonl')
    args = [sys.executable, 'tools/train.py', ws['probe_config'], '--work-dir', work_dir,
            '--cfg-options', *small_run_options(ws, ITERS, EVERY, loss_file=losses)]
    proc = subprocess.Popen(args, cwd=REPO, env=tool_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_for_first_checkpoint(proc, work_dir)
    finally:
        proc.kill()
        proc.wait()
    assert not osp.isfile(osp.join(work_dir, f'iter_{ITERS}.pth')), 'killed too late'
    with open(osp.join(work_dir, 'last_checkpoint')) as f:
        resumed_from = load(f.read().strip())['meta']['iter']

    run_tool(args[1:] + ['--resume'])
    killed_curve = {r['iter']: r for r in read_losses(losses)}
    full_curve = {r['iter']: r for r in read_losses(uninterrupted['losses'])}
    # The resumed run starts at the checkpoint's iteration ...
    assert min(it for it in killed_curve if it > resumed_from) == resumed_from + 1
    # ... and follows the uninterrupted loss and LR curves from there.
    for it in range(resumed_from + 1, ITERS + 1):
        assert killed_curve[it]['loss'] == pytest.approx(full_curve[it]['loss'], rel=1e-4)
        assert killed_curve[it]['lr'] == pytest.approx(full_curve[it]['lr'], rel=1e-9)
    final = load(osp.join(work_dir, f'iter_{ITERS}.pth'))
    reference = load(osp.join(uninterrupted['work_dir'], f'iter_{ITERS}.pth'))
    for name, value in reference['state_dict'].items():
        torch.testing.assert_close(final['state_dict'][name], value, rtol=1e-4, atol=1e-6,
                                   msg=name)
    exp_avg = [s['exp_avg'] for s in final['optimizer']['state'].values()]
    ref_avg = [s['exp_avg'] for s in reference['optimizer']['state'].values()]
    for a, b in zip(exp_avg, ref_avg):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-8)
    assert final['param_schedulers'] == reference['param_schedulers']


def test_test_with_tta(ws, uninterrupted):
    """``--tta`` wraps the model in SegTTAModel and tests multi-scale + flip (the config's
    scales are shrunk with the image size, as the other sizes are)."""
    config = derived_config(
        osp.join(ws['root'], 'tta_config.py'), ws['probe_config'],
        "tta_pipeline = [dict(type='LoadImageFromFile'), dict(type='TestTimeAug',\n"
        "    transforms=[[dict(type='Resize', scale=(int(256 * r), int(64 * r)),\n"
        "                      keep_ratio=True) for r in (0.5, 1.0, 1.5)],\n"
        "                [dict(type='RandomFlip', prob=0.), dict(type='RandomFlip', prob=1.)],\n"
        "                [dict(type='LoadAnnotations')], [dict(type='PackSegInputs')]])]\n")
    out = osp.join(ws['root'], 'tta')
    proc = run_tool(['tools/test.py', config,
                     osp.join(uninterrupted['work_dir'], f'iter_{ITERS}.pth'), '--tta',
                     '--work-dir', out, '--cfg-options', *small_run_options(ws, ITERS, EVERY)])
    [metrics_file] = glob.glob(osp.join(out, '*', '*.json'))
    with open(metrics_file) as f:
        assert 0 <= json.load(f)['mIoU'] <= 100
    [log] = glob.glob(osp.join(out, '*', '*.log'))
    with open(log) as f:
        assert "type='SegTTAModel'" in f.read()
    assert proc.returncode == 0
