"""The detection demo: Twins-SVT-S RetinaNet on demo COCO data, end to end on CPU.

1. writes a small COCO-layout dataset (``twins_mm.demo_data.coco.make_coco``: 96 train /
   24 val images of 160x128, three classes that differ in colour and shape);
2. writes a random "ImageNet" checkpoint in the official Twins layout and points the
   backbone's ``init_cfg`` at it, so the real pretrained-loading code runs;
3. trains ``configs/retinanet_twins_svt_s_1x.py`` with tools/train.py, overriding only the
   data root, epochs (with the warm-up and lr steps scaled to the short run), image scale,
   batch size, checkpointing, that checkpoint and the randomness (``randomness.seed``,
   ``deterministic=True``: head initialisation, shuffling and flips are the same from run
   to run); the train and test processes run with ``--threads`` CPU threads (default 2; a fixed
   number, because the result of a parallel reduction depends on how many threads share it);
4. evaluates the untrained model (backbone from the checkpoint, heads freshly initialised)
   and the trained one with tools/test.py (CocoMetric, bbox; bbox + segm for Mask R-CNN)
   and prints both;
5. writes prediction overlays of the validation images (mmdet's visualizer, ``--show-dir``)
   with the boxes scored at least ``--overlay-score-thr`` (0.5).

    python tools/demo_detection.py [--out demo_out/detection] [--epochs 12] [--seed 0]
"""
import argparse
import glob
import json
import os
import os.path as osp
import subprocess
import sys
import time

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, REPO)
CONFIGS = {
    'retinanet': osp.join(REPO, 'configs', 'retinanet_twins_svt_s_1x.py'),
    'mask_rcnn': osp.join(REPO, 'configs', 'mask_rcnn_twins_svt_s_1x.py'),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', default='demo_out/detection', help='output folder')
    parser.add_argument('--detector', choices=sorted(CONFIGS), default='retinanet')
    # 12 epochs of 80 images at batch 4 = 240 iterations (docs/detection.md: mAP and time)
    parser.add_argument('--epochs', type=int, default=12)
    parser.add_argument('--lr', type=float, default=None,
                        help='AdamW learning rate (default: the config\'s, the official 1e-4)')
    parser.add_argument('--seed', type=int, default=0,
                        help='seeds head init, shuffling and augmentation (mmengine randomness)')
    parser.add_argument('--warmup-iters', type=int, default=20)
    parser.add_argument('--batch-size', type=int, default=4)
    parser.add_argument('--num-train', type=int, default=96)
    parser.add_argument('--num-val', type=int, default=24)
    parser.add_argument('--width', type=int, default=160)
    parser.add_argument('--height', type=int, default=128)
    parser.add_argument('--workers', type=int, default=1, help='dataloader workers')
    parser.add_argument('--train-only', action='store_true',
                        help='train and save the checkpoint; skip the evaluation '
                        'and the overlays')
    parser.add_argument('--threads', type=int, default=2,
                        help='torch CPU threads of the train/test processes; results depend on '
                        'it (summation order), so the documented numbers name it')
    parser.add_argument('--drop-path', type=float, default=None,
                        help="backbone stochastic depth (default: the config's 0.2)")
    parser.add_argument('--nms-iou', type=float, default=0.3,
                        help='test-time NMS IoU threshold, applied across classes (the '
                        'config: 0.5, per class); the demo objects never overlap')
    parser.add_argument('--overlay-score-thr', type=float, default=0.5,
                        help='draw predicted boxes from this score on (mmdet draws from 0.3; '
                        'the mAP counts every box above the config\'s 0.05)')
    return parser.parse_args(argv)


def demo_overrides(data_root: str, checkpoint: str, args) -> list:
    """``--cfg-options`` that shrink the real config to the demo: nothing else changes."""
    from twins_mm.demo_data.coco import coco_cfg_options

    scale = f'({args.width},{args.height})'
    opts = [f'model.backbone.init_cfg.checkpoint={checkpoint}',
            f'randomness.seed={args.seed}', 'randomness.deterministic=True',
            f'train_dataloader.batch_size={args.batch_size}',
            f'train_dataloader.dataset.pipeline.2.scale={scale}',
            f'val_dataloader.dataset.pipeline.1.scale={scale}',
            f'test_dataloader.dataset.pipeline.1.scale={scale}',
            # no validation during training: tools/test.py evaluates the final checkpoint
            f'train_cfg.max_epochs={args.epochs}', f'train_cfg.val_interval={args.epochs + 1}',
            f'param_scheduler.0.end={args.warmup_iters}',
            f'param_scheduler.1.end={args.epochs}',
            # the official steps at 8/12 and 11/12 of the run
            f'param_scheduler.1.milestones=[{round(args.epochs * 8 / 12)},'
            f'{round(args.epochs * 11 / 12)}]',
            f'default_hooks.checkpoint.interval={args.epochs}',
            'default_hooks.logger.interval=10']
    opts += [f'{split}_dataloader.num_workers={args.workers}'
             for split in ('train', 'val', 'test')]
    if args.lr is not None:
        opts.append(f'optim_wrapper.optimizer.lr={args.lr}')
    if args.drop_path is not None:
        opts.append(f'model.backbone.drop_path_rate={args.drop_path}')
    return opts + coco_cfg_options(data_root)


def test_overrides(args) -> list:
    """Test-time NMS for the demo data, whose objects never overlap: boxes that overlap are
    duplicates, whatever their class (the config keeps overlapping boxes of two classes,
    and boxes of one class that overlap by less than IoU 0.5)."""
    nms = 'model.test_cfg.rcnn.nms' if args.detector == 'mask_rcnn' else 'model.test_cfg.nms'
    return [f'{nms}.iou_threshold={args.nms_iou}', f'{nms}.class_agnostic=True']


def run(cmd, log_path: str, threads: int) -> None:
    print('$', ' '.join(cmd), f'  (log: {log_path})', flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    with open(log_path, 'w') as log:
        returncode = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                    env=env).returncode
    if returncode != 0:
        with open(log_path) as f:
            tail = f.read()[-3000:]
        sys.exit(f'{tail}\nerror: command failed with exit code {returncode}; '
                 f'full log: {log_path}')


def save_untrained(config: str, opts: list, path: str, seed: int) -> None:
    """The model as training starts: pretrained backbone, freshly initialised heads."""
    import torch
    from mmengine.config import Config, DictAction
    from mmengine.logging import MMLogger
    from mmengine.registry import init_default_scope

    from mmdet.registry import MODELS

    cfg = Config.fromfile(config)
    parser = argparse.ArgumentParser()
    parser.add_argument('--o', nargs='+', action=DictAction)
    cfg.merge_from_dict(parser.parse_args(['--o', *opts]).o)
    init_default_scope('mmdet')
    # init_weights logs every parameter at INFO: keep the demo's own output short
    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel('WARNING')
    try:
        torch.manual_seed(seed)
        model = MODELS.build(cfg.model)
        model.init_weights()
    finally:
        logger.setLevel(level)
    torch.save({'state_dict': model.state_dict(), 'meta': {}}, path)


def test_coco(config: str, opts: list, checkpoint: str, work_dir: str, threads: int,
              extra=()) -> dict:
    """tools/test.py's CocoMetric results, e.g. {'coco/bbox_mAP': 0.41, ...}. mmdet's
    CocoMetric reports nothing when no box passes the score threshold (typical of an
    untrained RetinaNet, whose classifier starts at p = 0.01): that is an mAP of 0."""
    run([sys.executable, 'tools/test.py', config, checkpoint, '--work-dir', work_dir,
         *extra, '--cfg-options', *opts], work_dir + '.log', threads)
    results = sorted(glob.glob(osp.join(work_dir, '*', '*.json')), key=os.path.getmtime)
    with open(results[-1]) as f:
        metrics = json.load(f)
    if not any(k.startswith('coco/') for k in metrics):
        print(f'note: {checkpoint} detects nothing above the score threshold (mAP 0)')
    return metrics


def save_png_overlays(src: str, dst: str) -> list:
    """mmdet's visualizer keeps the images' .jpg names; the demo hands out PNGs."""
    import cv2
    os.makedirs(dst, exist_ok=True)
    written = []
    for path in sorted(glob.glob(osp.join(src, '*.jpg'))):
        out = osp.join(dst, osp.splitext(osp.basename(path))[0] + '.png')
        cv2.imwrite(out, cv2.imread(path))
        written.append(out)
    return written


def main(argv=None):
    args = parse_args(argv)
    out = osp.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    start = time.time()

    import torch

    from twins_mm.demo_data.coco import make_coco
    from twins_mm.testing import official_state_dict

    config = CONFIGS[args.detector]
    data_root = make_coco(osp.join(out, 'data'), num_train=args.num_train,
                          num_val=args.num_val, seed=0, size=(args.width, args.height))
    pretrained = osp.join(out, 'fake_imagenet_alt_gvt_small.pth')
    torch.save({'model': official_state_dict('TwinsSVT', 'small', seed=0)}, pretrained)
    opts = demo_overrides(data_root, pretrained, args)

    untrained = osp.join(out, 'untrained.pth')
    save_untrained(config, opts, untrained, args.seed)
    train_dir = osp.join(out, 'train')
    run([sys.executable, 'tools/train.py', config, '--work-dir', train_dir,
         '--cfg-options', *opts], osp.join(out, 'train.log'), args.threads)
    trained = osp.join(train_dir, f'epoch_{args.epochs}.pth')
    if args.train_only:
        print(f'trained checkpoint: {trained} ({time.time() - start:.0f} s)')
        return

    opts_test = opts + test_overrides(args)
    before = test_coco(config, opts_test, untrained, osp.join(out, 'test_untrained'), args.threads)
    drawn = osp.join(out, 'test_trained_drawn')
    after = test_coco(config, opts_test + [f'default_hooks.visualization.score_thr='
                                      f'{args.overlay_score_thr}'],
                      trained, osp.join(out, 'test_trained'), args.threads,
                      extra=('--show-dir', drawn))
    overlays = osp.join(out, 'overlays')
    pictures = save_png_overlays(drawn, overlays)

    tasks = ('bbox', 'segm') if args.detector == 'mask_rcnn' else ('bbox', )
    print(f'\nTwins-SVT-S {args.detector} on demo COCO ({args.num_train} train / '
          f'{args.num_val} val images, {args.width}x{args.height}, {args.epochs} epochs)')
    for task in tasks:
        for metric in ('mAP', 'mAP_50'):
            key = f'coco/{task}_{metric}'
            print(f'{task} {metric:7s} untrained: {before.get(key, 0.):.3f}   '
                  f'trained: {after.get(key, 0.):.3f}')
    print(f'overlays: {len(pictures)} PNGs under {overlays} (ground truth left, boxes '
          f'scored {args.overlay_score_thr} or more right)')
    print(f'total time: {time.time() - start:.0f} s')
    if not all(after.get(f'coco/{t}_mAP', 0.) > before.get(f'coco/{t}_mAP', 0.)
               for t in tasks):
        sys.exit('error: training did not improve mAP; see ' + osp.join(out, 'train.log'))


if __name__ == '__main__':
    main()
