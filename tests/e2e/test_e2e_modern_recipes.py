"""End to end (slow): the S variants of the Mask2Former, Cascade Mask R-CNN and DINO recipes
train on the demo data through tools/train.py (and, for the detector that can learn the demo
within CI time, are scored through tools/test.py).

Each run inherits the real recipe and changes only what the demo needs: the data (demo COCO,
4 training images at 128x96; demo ADE20K, 8 at 64x64), a fixed resize instead of the
multi-scale / crop / flip / photometric augmentation (so that runs can be compared number for
number), the length of the run (and Cascade Mask R-CNN's 1000-iteration warm-up shortened to
2), drop path 0 (mmengine does not checkpoint the RNG, see below) and a random ImageNet
checkpoint in the official layout. Model, losses, optimiser, paramwise rules and gradient
clipping stay the recipe's; its mixed precision falls back to fp32 without a GPU
(tools/train.py). Two overrides shrink work per image and keep every code path: Cascade Mask
R-CNN samples 32 RoIs per image and stage (not 512) from 100 proposals (not 2000) and tests
50 proposals (not 1000) at score threshold 0; DINO selects 100 queries (not 900), because its
two-stage query selection takes the top num_queries encoder tokens and a 128x96 image has
256 (a COCO image has over 16,000).

Every process runs one CPU thread (OMP_NUM_THREADS=1): on a loaded 2-core machine a second
OpenMP thread mostly spins (measured: a DINO step cost 12-15 CPU seconds with two threads,
1.6 with one). The three tests together took 179 CPU seconds (155 user + 25 sys, all
processes; 2-core VM shared with other jobs, torch 2.13 CPU) and 8.5 minutes of wall time.
"""
import glob
import json
import os
import os.path as osp
import subprocess
import sys

import pytest
import torch

from tests.e2e.seg_support import read_losses
from twins_mm.demo_data.ade20k import make_ade20k
from twins_mm.demo_data.coco import make_coco
from twins_mm.testing import official_state_dict

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
TIMEOUT = 900  # wall seconds per process; a step takes 1-2 CPU seconds, a start-up about 13

# Cascade Mask R-CNN PCPVT-S after 12 iterations (6 epochs of 2 x 2 images), mAP@0.5 on the
# 2 validation images with every box kept: measured bbox 0.554 and segm 0.337 trained,
# 0.000 and 0.000 untrained (same backbone checkpoint, heads as training starts). A run whose
# heads do not learn, or whose weights or masks are lost on the way to CocoMetric, stays at
# the untrained level.
CASCADE_EPOCHS = 6
CASCADE_MARGIN = dict(bbox=0.2, segm=0.1)
# Loss falls: mean training loss of the last epoch-worth of iterations over the first.
# Measured: Mask2Former SVT-S 138.9 -> 103.0 (-26 %) over 12 iterations; DINO SVT-S 50.5 ->
# 40.6 (-20 %) over 12 (epoch means; DINO's denoising queries make single steps noisy).
MASK2FORMER_ITERS, MASK2FORMER_FALL = 12, 0.15
DINO_EPOCHS, DINO_FALL = 6, 0.10


@pytest.fixture(scope='module')
def ws(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('recipes_e2e'))
    coco = make_coco(osp.join(root, 'coco'), num_train=4, num_val=2, seed=0, size=(128, 96))
    ade = make_ade20k(osp.join(root, 'ade'), num_train=8, num_val=4, size=64, seed=0)
    weights = {}
    for family, name in (('TwinsPCPVT', 'pcpvt_s'), ('TwinsSVT', 'svt_s')):
        weights[name] = osp.join(root, f'fake_imagenet_{name}.pth')
        torch.save({'model': official_state_dict(family, 'small', seed=0)}, weights[name])
    return dict(root=root, coco=coco, ade=ade, weights=weights)


PROBES = ("custom_hooks = [dict(type='GlobalLossProbeHook', out_file=None),\n"
          "                dict(type='PerIterationSeedHook', seed=0)]\n"
          "randomness = dict(seed=0)\n")


def write_config(path, recipe, imports, body):
    """A config that inherits ``configs/<recipe>.py`` and adds ``body``, with the loss probe
    (tests/e2e/loss_probe.py) and the per-iteration seed (tests/e2e/recipe_seed.py)."""
    with open(path, 'w') as f:
        f.write(f"_base_ = [{osp.join(REPO, 'configs', recipe + '.py')!r}]\n"
                f"custom_imports = dict(imports={imports + ['tests.e2e.loss_probe', 'tests.e2e.recipe_seed']!r},\n"  # noqa: E501
                "                      allow_failed_imports=False)\n" + PROBES + body)
    return path


def coco_body(ws, weights, with_mask, extra=''):
    data_root = ws['coco'] + '/'
    ann = data_root + 'annotations/instances_val2017.json'
    load_ann = f"dict(type='LoadAnnotations', with_bbox=True, with_mask={with_mask})"
    return f"""
data_root = {data_root!r}
model = dict(backbone=dict(drop_path_rate=0., init_cfg=dict(checkpoint={weights!r})))
train_pipeline = [dict(type='LoadImageFromFile'), {load_ann},
                  dict(type='Resize', scale=(128, 96), keep_ratio=True),
                  dict(type='PackDetInputs')]
test_pipeline = [dict(type='LoadImageFromFile'),
                 dict(type='Resize', scale=(128, 96), keep_ratio=True), {load_ann},
                 dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape',
                                                      'img_shape', 'scale_factor'))]
train_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False,
                        dataset=dict(data_root=data_root, pipeline=train_pipeline))
test_dataloader = dict(num_workers=0, persistent_workers=False,
                       dataset=dict(data_root=data_root, pipeline=test_pipeline))
test_evaluator = dict(ann_file={ann!r})
val_cfg = None
val_dataloader = None
val_evaluator = None
default_hooks = dict(logger=dict(interval=1))
""" + extra


def env():
    out = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')
    out.pop('LOCAL_RANK', None)
    return out


def run_tool(script, *args):
    proc = subprocess.run([sys.executable, osp.join('tools', script), *args], cwd=REPO,
                          env=env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc


def train(config, work_dir, losses, *extra):
    run_tool('train.py', config, '--work-dir', work_dir,
             '--cfg-options', f'custom_hooks.0.out_file={losses}', *extra)
    return [r['loss'] for r in read_losses(losses)]


def load(path):
    from mmengine.logging.history_buffer import HistoryBuffer
    HistoryBuffer()  # registers the statistics methods pickled in the message hub
    return torch.load(path, map_location='cpu', weights_only=False)


def test_cascade_mask_rcnn_trained_beats_untrained(ws, tmp_path):
    extra = f"""
model.update(
    train_cfg=dict(rpn_proposal=dict(max_per_img=100),
                   rcnn=[dict(stage, sampler=dict(stage.sampler, num=32))
                         for stage in _base_.model.train_cfg.rcnn]),
    test_cfg=dict(rpn=dict(max_per_img=50), rcnn=dict(score_thr=0.)))
train_cfg = dict(max_epochs={CASCADE_EPOCHS})
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=2),
    dict(type='MultiStepLR', begin=0, end={CASCADE_EPOCHS}, by_epoch=True,
         milestones=[{CASCADE_EPOCHS}], gamma=0.1)]
default_hooks = dict(checkpoint=dict(interval={CASCADE_EPOCHS}))
"""
    config = write_config(str(tmp_path / 'cascade.py'), 'cascade_mask_rcnn_twins_pcpvt_s_3x',
                          ['twins_mm'],
                          coco_body(ws, ws['weights']['pcpvt_s'], True, extra))
    losses = train(config, str(tmp_path / 'train'), str(tmp_path / 'losses.jsonl'))
    assert len(losses) == CASCADE_EPOCHS * 2
    trained = coco_metrics(config, str(tmp_path / 'train' / f'epoch_{CASCADE_EPOCHS}.pth'),
                           str(tmp_path / 'test'))

    sys.path.insert(0, osp.join(REPO, 'tools'))
    from demo_detection import save_untrained
    untrained = str(tmp_path / 'untrained.pth')
    save_untrained(config, ['randomness.seed=0'], untrained, seed=0)
    untrained = coco_metrics(config, untrained, str(tmp_path / 'test_untrained'))
    for task, margin in CASCADE_MARGIN.items():
        key = f'coco/{task}_mAP_50'
        assert trained[key] >= untrained[key] + margin, (task, trained, untrained)


def coco_metrics(config, checkpoint, work_dir):
    run_tool('test.py', config, checkpoint, '--work-dir', work_dir)
    (result, ) = glob.glob(osp.join(work_dir, '*', '*.json'))
    with open(result) as f:
        return json.load(f)


def falls(losses, window, fraction):
    first = sum(losses[:window]) / window
    last = sum(losses[-window:]) / window
    return last <= (1 - fraction) * first, (first, last)


def check_resume_is_exact(config, straight_dir, straight_losses, middle, final, tmp_path):
    """Resume from the run's middle checkpoint in a fresh work dir: the resumed run logs the
    uninterrupted run's losses from the next iteration on and ends with its weights and
    optimiser state."""
    resumed_dir = str(tmp_path / 'resumed')
    resumed = train(config, resumed_dir, str(tmp_path / 'resumed_losses.jsonl'),
                    '--resume', osp.join(straight_dir, middle))
    done = load(osp.join(straight_dir, middle))['meta']['iter']
    assert 0 < done < len(straight_losses) and len(resumed) == len(straight_losses) - done
    assert resumed == pytest.approx(straight_losses[done:], rel=1e-4)
    a, b = load(osp.join(straight_dir, final)), load(osp.join(resumed_dir, final))
    assert a['meta']['iter'] == b['meta']['iter'] == len(straight_losses)
    for key, value in a['state_dict'].items():
        torch.testing.assert_close(b['state_dict'][key], value, rtol=1e-4, atol=1e-6,
                                   msg=lambda m: f'{key}: {m}')
    exp_avg = [s['exp_avg'] for s in a['optimizer']['state'].values()]
    for x, y in zip(exp_avg, [s['exp_avg'] for s in b['optimizer']['state'].values()]):
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-7)
    assert a['param_schedulers'] == b['param_schedulers']


def test_dino_loss_falls_and_resume_is_exact(ws, tmp_path):
    """DINO cannot learn the demo within CI time: its one-to-one matching with focal loss
    needs thousands of iterations before boxes rise above chance (measured after 12
    iterations: bbox mAP@0.5 0.013 on the validation images). Instead: the training loss falls
    by DINO_FALL over 12 iterations, and a run resumed from its middle checkpoint is the
    uninterrupted run. DINO draws its denoising queries from torch's generator every step,
    which mmengine does not checkpoint; PerIterationSeedHook seeds each iteration from its
    number, so both runs draw the same (without it the resumed losses differed from the
    uninterrupted ones by up to 4 %)."""
    half = DINO_EPOCHS // 2
    extra = f"""
model.update(num_queries=100)
train_cfg = dict(max_epochs={DINO_EPOCHS})
param_scheduler = [dict(type='MultiStepLR', begin=0, end={DINO_EPOCHS}, by_epoch=True,
                        milestones=[{DINO_EPOCHS - 1}], gamma=0.1)]
default_hooks = dict(checkpoint=dict(interval={half}))
"""
    config = write_config(str(tmp_path / 'dino.py'), 'dino_twins_svt_s_12e', ['twins_mm'],
                          coco_body(ws, ws['weights']['svt_s'], False, extra))
    straight_dir = str(tmp_path / 'straight')
    losses = train(config, straight_dir, str(tmp_path / 'losses.jsonl'))
    assert len(losses) == DINO_EPOCHS * 2
    ok, means = falls(losses, 2, DINO_FALL)
    assert ok, means
    check_resume_is_exact(config, straight_dir, losses, f'epoch_{half}.pth',
                          f'epoch_{DINO_EPOCHS}.pth', tmp_path)


def test_mask2former_loss_falls_and_resume_is_exact(ws, tmp_path):
    """Mask2Former cannot learn the demo within CI time: the recipe clips the gradient norm at
    0.01 and trains the backbone at 0.1x the lr, and its semantic output (class scores times
    mask scores) is still a single class after 16 iterations (measured mIoU 1.05 on the
    validation images). Instead: the training loss falls by MASK2FORMER_FALL over 12
    iterations, and a run resumed from its middle checkpoint is the uninterrupted run
    (importance point sampling draws from torch's generator every step: PerIterationSeedHook,
    as for DINO; without it the resumed losses differed by up to 0.16 %)."""
    half = MASK2FORMER_ITERS // 2
    data_root = ws['ade']
    body = f"""
data_root = {data_root!r}
model = dict(data_preprocessor=dict(size=(64, 64)),
             backbone=dict(drop_path_rate=0., init_cfg=dict(checkpoint={ws['weights']['svt_s']!r})))
train_pipeline = [dict(type='LoadImageFromFile'),
                  dict(type='LoadAnnotations', reduce_zero_label=True),
                  dict(type='PackSegInputs')]
train_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False,
                        dataset=dict(data_root=data_root, pipeline=train_pipeline))
train_cfg = dict(max_iters={MASK2FORMER_ITERS})
val_cfg = None
val_dataloader = None
val_evaluator = None
param_scheduler = [dict(type='PolyLR', eta_min=0, power=0.9, begin=0,
                        end={MASK2FORMER_ITERS}, by_epoch=False)]
default_hooks = dict(logger=dict(interval=1),
                     checkpoint=dict(interval={half}, save_best=None))
"""  # noqa: E501
    config = write_config(str(tmp_path / 'mask2former.py'), 'mask2former_twins_svt_s_160k',
                          ['mmdet.models', 'twins_mm'], body)
    straight_dir = str(tmp_path / 'straight')
    losses = train(config, straight_dir, str(tmp_path / 'losses.jsonl'))
    assert len(losses) == MASK2FORMER_ITERS
    ok, means = falls(losses, 4, MASK2FORMER_FALL)
    assert ok, means
    check_resume_is_exact(config, straight_dir, losses, f'iter_{half}.pth',
                          f'iter_{MASK2FORMER_ITERS}.pth', tmp_path)
