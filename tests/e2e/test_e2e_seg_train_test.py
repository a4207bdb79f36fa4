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


TTA_RATIOS = (0.5, 1.0, 1.5)


def hand_merged_tta(config, options, checkpoint, num_images):
    """What SegTTAModel must predict, computed here view by view: the plain segmentor runs
    on each scaled / flipped view of the config's tta_pipeline (its predict() resizes the
    logits back to the original image and undoes the flip), the per-view softmax
    probabilities are averaged, and the argmax is the label (mmseg's SegTTAModel.merge_preds
    for a multi-class head, docs/reference.md 4.1). Also returns the plain single-view
    (ratio 1.0, no flip) labels, to show that the merge changes something."""
    import argparse

    from mmengine.config import Config, DictAction
    from mmengine.registry import init_default_scope
    from mmengine.runner import load_checkpoint
    from mmseg.registry import DATASETS, MODELS

    parser = argparse.ArgumentParser()
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    cfg = Config.fromfile(config)
    cfg.merge_from_dict(parser.parse_args(['--cfg-options', *options]).cfg_options)
    init_default_scope('mmseg')
    model = MODELS.build(cfg.model)
    load_checkpoint(model, checkpoint, map_location='cpu')
    model.eval()
    dataset_cfg = cfg.test_dataloader.dataset.copy()
    dataset_cfg.pipeline = cfg.tta_pipeline
    dataset = DATASETS.build(dataset_cfg)
    merged, single = {}, {}
    for idx in range(num_images):
        views = dataset[idx]
        assert len(views['inputs']) == 2 * len(TTA_RATIOS)
        probs = 0
        for inputs, sample in zip(views['inputs'], views['data_samples']):
            with torch.no_grad():
                [out] = model.test_step(dict(inputs=[inputs], data_samples=[sample]))
            logits = out.seg_logits.data
            probs = probs + logits.softmax(dim=0)
            if sample.scale_factor == (1.0, 1.0) and not sample.flip:
                single_view = logits.argmax(dim=0)
        name = osp.splitext(osp.basename(sample.img_path))[0]
        merged[name] = (probs / len(views['inputs'])).argmax(dim=0).numpy()
        single[name] = single_view.numpy()
    return merged, single


def test_test_with_tta(ws, uninterrupted):
    """``--tta`` wraps the model in SegTTAModel and tests multi-scale + flip (the config's
    scales are shrunk with the image size, as the other sizes are). Its predictions must be
    the merge of the views computed by hand, and its mIoU the one of those predictions."""
    ratios = ', '.join(str(r) for r in TTA_RATIOS)
    config = derived_config(
        osp.join(ws['root'], 'tta_config.py'), ws['probe_config'],
        "tta_pipeline = [dict(type='LoadImageFromFile'), dict(type='TestTimeAug',\n"
        "    transforms=[[dict(type='Resize', scale=(int(256 * r), int(64 * r)),\n"
        f"                      keep_ratio=True) for r in ({ratios})],\n"
        "                [dict(type='RandomFlip', prob=0.), dict(type='RandomFlip', prob=1.)],\n"
        "                [dict(type='LoadAnnotations')], [dict(type='PackSegInputs')]])]\n")
    out = osp.join(ws['root'], 'tta')
    checkpoint = osp.join(uninterrupted['work_dir'], f'iter_{ITERS}.pth')
    options = small_run_options(ws, ITERS, EVERY)
    run_tool(['tools/test.py', config, checkpoint, '--tta', '--work-dir', out,
              '--out', osp.join(out, 'pred'), '--cfg-options', *options])
    [log] = glob.glob(osp.join(out, '*', '*.log'))
    with open(log) as f:
        assert "type='SegTTAModel'" in f.read()

    merged, single = hand_merged_tta(config, options, checkpoint, NUM_VAL)
    assert sorted(merged) == sorted(osp.splitext(osp.basename(p))[0]
                                    for p in glob.glob(osp.join(out, 'pred', '*.png')))
    changed = 0
    for name, labels in merged.items():
        written = cv2.imread(osp.join(out, 'pred', f'{name}.png'), cv2.IMREAD_UNCHANGED)
        # IoUMetric writes label + 1 for reduce_zero_label datasets (0 = ignore).
        np.testing.assert_array_equal(written.astype(int) - 1, labels, err_msg=name)
        changed += int((labels != single[name]).sum())
    assert changed > 0, 'the merge equals the single view: the comparison proves nothing'

    [metrics_file] = glob.glob(osp.join(out, '*', '*.json'))
    with open(metrics_file) as f:
        miou = json.load(f)['mIoU']
    expected = miou_from_files(osp.join(out, 'pred'),
                               osp.join(ws['data_root'], 'annotations', 'validation'))
    assert miou == pytest.approx(expected, abs=0.01)


@pytest.fixture(scope='module')
def stochastic(ws):
    """The same run as ``uninterrupted`` but with the config's own stochastic depth
    (drop_path_rate 0.2 for SVT-S FPN), one checkpoint at the end."""
    work_dir = osp.join(ws['root'], 'stochastic')
    losses = osp.join(ws['root'], 'stochastic_losses.jsonl')
    run_tool(['tools/train.py', ws['probe_config'], '--work-dir', work_dir, '--cfg-options',
              *small_run_options(ws, ITERS, ITERS, loss_file=losses, stochastic_depth=True)])
    return dict(work_dir=work_dir, losses=losses)


def test_train_with_the_configs_stochastic_depth(stochastic, uninterrupted):
    """Training with drop path 0.2 runs end to end, and the drop path fires: same seed,
    data, initial weights and first batch as the run without it, so the first loss can
    differ only through dropped residual branches."""
    ckpt = load(osp.join(stochastic['work_dir'], f'iter_{ITERS}.pth'))
    assert 'drop_path_rate=0.2' in ckpt['meta']['cfg']
    curve, plain = read_losses(stochastic['losses']), read_losses(uninterrupted['losses'])
    assert [r['iter'] for r in curve] == list(range(1, ITERS + 1))
    assert all(np.isfinite(r['loss']) for r in curve)
    assert [r['lr'] for r in curve] == pytest.approx([r['lr'] for r in plain], rel=1e-9)
    assert curve[0]['loss'] != pytest.approx(plain[0]['loss'], rel=1e-4), (curve[0], plain[0])
