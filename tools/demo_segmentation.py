"""The segmentation demo: Twins-SVT-S Semantic FPN on demo ADE20K data, end to end on CPU.

1. writes a small ADE20K-layout dataset (tools/make_demo_data.py's generator);
2. writes a random "ImageNet" checkpoint in the official Twins layout and points the
   backbone's ``init_cfg`` at it, so the real pretrained-loading code runs;
3. trains ``configs/fpn_twins_svt_s_80k.py`` with tools/train.py, overriding only the
   data root, iterations, image sizes, batch size, that checkpoint and the randomness
   (``randomness.seed``, ``deterministic=True``); the train and test processes run with
   ``--threads`` CPU threads (default 2; a fixed number, because the result of a parallel
   reduction depends on how many threads share it);
4. evaluates the untrained model (backbone from the checkpoint, heads freshly initialised)
   and the trained one with tools/test.py (IoUMetric) and prints both mIoU values;
5. writes prediction overlays of the validation images (mmseg's visualizer, ``--show-dir``).

    python tools/demo_segmentation.py [--out demo_out/segmentation] [--iters 400] [--seed 0]
"""
import argparse
import glob
import json
import logging
import os
import os.path as osp
import subprocess
import sys
import time

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, REPO)
CONFIG = osp.join(REPO, 'configs', 'fpn_twins_svt_s_80k.py')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', default='demo_out/segmentation', help='output folder')
    parser.add_argument('--iters', type=int, default=400, help='training iterations')
    parser.add_argument('--batch-size', type=int, default=4)
    parser.add_argument('--size', type=int, default=128, help='image side and crop size')
    parser.add_argument('--num-train', type=int, default=64)
    parser.add_argument('--num-val', type=int, default=16)
    parser.add_argument('--workers', type=int, default=2, help='dataloader workers')
    parser.add_argument('--seed', type=int, default=0,
                        help='seeds head init, shuffling and augmentation (mmengine randomness)')
    parser.add_argument('--train-only', action='store_true',
                        help='train and save the checkpoint; skip the evaluation '
                        'and the overlays')
    parser.add_argument('--threads', type=int, default=2,
                        help='torch CPU threads of the train/test processes; results depend on '
                        'it (summation order), so the documented numbers name it')
    return parser.parse_args(argv)


def reproducible_overrides(seed: int) -> list:
    """A fixed seed and deterministic kernels: the same weights from run to run."""
    return [f'randomness.seed={seed}', 'randomness.deterministic=True']


def demo_overrides(data_root: str, checkpoint: str, iters: int, size: int, batch: int,
                   workers: int) -> list:
    """``--cfg-options`` that shrink the real config to the demo: nothing else changes."""
    scale = f'({4 * size},{size})'  # ADE20K's (2048, 512) test scale, scaled down
    opts = [f'model.backbone.init_cfg.checkpoint={checkpoint}',
            f'model.data_preprocessor.size=({size},{size})',
            f'train_dataloader.batch_size={batch}',
            f'train_dataloader.dataset.pipeline.2.scale={scale}',
            f'train_dataloader.dataset.pipeline.3.crop_size=({size},{size})',
            f'train_cfg.max_iters={iters}', f'train_cfg.val_interval={iters}',
            f'param_scheduler.0.end={iters}',
            f'default_hooks.checkpoint.interval={iters}',
            f'default_hooks.logger.interval={max(1, iters // 20)}']
    for split in ('train', 'val', 'test'):
        opts += [f'{split}_dataloader.dataset.data_root={data_root}',
                 f'{split}_dataloader.num_workers={workers}']
    for split in ('val', 'test'):
        opts.append(f'{split}_dataloader.dataset.pipeline.1.scale={scale}')
    return opts


def run(cmd, log_path: str, threads: int) -> None:
    print('$', ' '.join(cmd), f'  (log: {log_path})', flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    with open(log_path, 'w') as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    if proc.returncode != 0:
        with open(log_path) as f:
            tail = f.read()[-3000:]
        sys.exit(f'{tail}\nerror: command failed with exit code {proc.returncode}; '
                 f'full log: {log_path}')


def save_untrained(opts: list, path: str) -> None:
    """The model as training starts: pretrained backbone, freshly initialised heads."""
    import torch
    from mmengine.config import Config, DictAction
    from mmengine.logging import MMLogger
    from mmengine.registry import init_default_scope

    import twins_mm  # noqa: F401
    from mmseg.registry import MODELS

    cfg = Config.fromfile(CONFIG)
    parser = argparse.ArgumentParser()
    parser.add_argument('--o', nargs='+', action=DictAction)
    cfg.merge_from_dict(parser.parse_args(['--o', *opts]).o)
    init_default_scope('mmseg')
    MMLogger.get_current_instance().setLevel(logging.WARNING)  # per-parameter init report
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.init_weights()
    torch.save({'state_dict': model.state_dict(), 'meta': {}}, path)


def test_miou(opts: list, checkpoint: str, work_dir: str, threads: int, extra=()) -> float:
    run([sys.executable, 'tools/test.py', CONFIG, checkpoint, '--work-dir', work_dir,
         *extra, '--cfg-options', *opts], work_dir + '.log', threads)
    results = sorted(glob.glob(osp.join(work_dir, '*', '*.json')), key=os.path.getmtime)
    with open(results[-1]) as f:
        return float(json.load(f)['mIoU'])


def main(argv=None):
    args = parse_args(argv)
    out = osp.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    start = time.time()

    import torch

    from twins_mm.demo_data.ade20k import make_ade20k
    from twins_mm.testing import official_state_dict

    data_root = make_ade20k(osp.join(out, 'data'), num_train=args.num_train,
                            num_val=args.num_val, size=args.size, seed=0)
    pretrained = osp.join(out, 'fake_imagenet_alt_gvt_small.pth')
    torch.save({'model': official_state_dict('TwinsSVT', 'small', seed=0)}, pretrained)
    opts = demo_overrides(data_root, pretrained, args.iters, args.size, args.batch_size,
                          args.workers) + reproducible_overrides(args.seed)

    untrained = osp.join(out, 'untrained.pth')
    save_untrained(opts, untrained)
    train_dir = osp.join(out, 'train')
    run([sys.executable, 'tools/train.py', CONFIG, '--work-dir', train_dir,
         '--cfg-options', *opts], osp.join(out, 'train.log'), args.threads)
    trained = osp.join(train_dir, f'iter_{args.iters}.pth')
    if args.train_only:
        print(f'trained checkpoint: {trained} ({time.time() - start:.0f} s)')
        return

    miou_untrained = test_miou(opts, untrained, osp.join(out, 'test_untrained'), args.threads)
    overlays = osp.join(out, 'overlays')
    miou_trained = test_miou(opts, trained, osp.join(out, 'test_trained'), args.threads,
                             extra=('--show-dir', overlays))
    pictures = sorted(glob.glob(osp.join(overlays, '**', '*.png'), recursive=True))

    print(f'\nTwins-SVT-S Semantic FPN on demo ADE20K ({args.num_train} train / '
          f'{args.num_val} val images, {args.size} px, {args.iters} iterations)')
    print(f'mIoU untrained: {miou_untrained:.2f}')
    print(f'mIoU trained:   {miou_trained:.2f}')
    print(f'overlays: {len(pictures)} PNGs under {overlays}')
    print(f'total time: {time.time() - start:.0f} s')
    if not miou_trained > miou_untrained:
        sys.exit('error: training did not improve mIoU; see ' + osp.join(out, 'train.log'))


if __name__ == '__main__':
    main()
