"""Images/s of whole models in mmengine's training loop, with three backbones.

Semantic FPN (batch 4, ``configs/fpn_twins_svt_s_80k.py``) and RetinaNet (batch 2,
``configs/retinanet_twins_svt_s_1x.py``), each with
  twins_mm  the config as it is (twins_mm's TwinsSVT small; ``--compile`` sets its flag),
  mmseg     the same config with mmseg 1.2.2's built-in SVT-S (paper hyper-parameters),
  swin-t    the same config with mmdet 3.3.0's Swin-T (neck in_channels 96..768),
all else unchanged (neck, heads, losses, optimizer, drop path 0.2). No pretrained weights.

Data: the project's synthetic ADE20K / COCO (twins_mm.demo_data, written to a temporary
folder) through each config's own training pipeline, so the inputs are what training
sees: 512x512 crops for FPN, images resized to fit 1333x800 for RetinaNet (``--seg-size``
and ``--det-scale`` shrink them for a quick CPU run). The loop is mmengine's
IterBasedTrainLoop run by a real ``Runner`` (hooks included, validation and checkpoints
off). A hook of the lowest priority times every iteration:
  step ms       before_train_iter -> after_train_iter (the model's train_step: data
                preprocessor, forward, losses, backward, optimizer step), synchronised on
                CUDA; median after --warmup iterations
  img/s         batch / step time
  loop img/s    images / wall time of the timed iterations, data loading included
  peak MiB      CUDA: torch.cuda.max_memory_allocated during the run, minus what was
                allocated before it
  ours/X        twins_mm's step time divided by X's (lower is better)
A model that cannot be built (no mmseg, or mmdet without mmcv's compiled ops) is dropped
with the reason printed.

  python tools/analysis_tools/benchmark_train_loop.py --device cuda --amp bf16
  python tools/analysis_tools/benchmark_train_loop.py --seg-size 64 --det-scale 128 96 \\
      --iters 2 --warmup 1                                  # a quick CPU check
"""
import argparse
import copy
import gc
import logging
import os
import statistics
import sys
import tempfile
import time
from typing import Dict, List, Optional

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
for path in (REPO, HERE):
    if path not in sys.path:
        sys.path.insert(0, path)

from benchmark import SWIN, first_line, markdown, mmseg_backbone_cfg  # noqa: E402

TASKS = {
    'fpn': dict(config='configs/fpn_twins_svt_s_80k.py', batch=4, data='ade20k'),
    'retinanet': dict(config='configs/retinanet_twins_svt_s_1x.py', batch=2, data='coco'),
}
BACKBONES = ('twins_mm', 'mmseg', 'swin-t')
TWINS_CHANNELS = [64, 128, 256, 512]  # SVT-S stage widths
SWIN_T_CHANNELS = [96, 192, 384, 768]
AMP_DTYPES = {'bf16': 'bfloat16', 'fp16': 'float16'}


def backbone_cfg(name: str, base: dict, compile_cfg=None) -> dict:
    """The backbone of ``name``, with the drop path of the config's own backbone."""
    drop_path = base.get('drop_path_rate', 0.2)
    if name == 'twins_mm':
        cfg = copy.deepcopy(base)
        cfg['init_cfg'] = None
        if compile_cfg is not None:
            cfg['compile'] = compile_cfg
        return cfg
    if name == 'mmseg':
        cfg = mmseg_backbone_cfg('svt-s', drop_path)
        return dict(cfg, type='mmseg.' + cfg['type'], init_cfg=None)
    if name == 'swin-t':
        return dict(type='mmdet.SwinTransformer', window_size=7, mlp_ratio=4, qkv_bias=True,
                    patch_norm=True, drop_path_rate=drop_path, out_indices=(0, 1, 2, 3),
                    with_cp=False, convert_weights=False, init_cfg=None, **SWIN['swin-t'])
    raise ValueError(f'unknown backbone {name!r}; choose from {BACKBONES}')


def make_data(kind: str, root: str, num: int) -> str:
    if kind == 'ade20k':
        from twins_mm.demo_data.ade20k import make_ade20k
        return make_ade20k(root, num_train=num, num_val=1)
    from twins_mm.demo_data.coco import make_coco
    return make_coco(root, num_train=num, num_val=1)


def set_pipeline_sizes(pipeline: List[dict], args, task: str):
    """--seg-size / --det-scale into the training pipeline (the configs' own otherwise)."""
    for t in pipeline:
        if task == 'fpn' and args.seg_size:
            s = args.seg_size
            if t['type'] == 'RandomResize':
                t['scale'] = (4 * s, s)  # ADE20K's (2048, 512), scaled down
            elif t['type'] == 'RandomCrop':
                t['crop_size'] = (s, s)
        if task == 'retinanet' and args.det_scale and t['type'] == 'Resize':
            t['scale'] = tuple(args.det_scale)


def loop_cfg(task: str, backbone: str, args, data_root: str, work_dir: str):
    """The task's config with ``backbone``, demo data, and a short iteration-based loop."""
    from mmengine.config import Config
    spec = TASKS[task]
    cfg = Config.fromfile(os.path.join(REPO, spec['config']))
    compile_cfg = None
    if args.compile:
        compile_cfg = {k: v for k, v in (('mode', args.compile_mode),
                                         ('backend', args.compile_backend)) if v} or True
    cfg.model.backbone = backbone_cfg(backbone, cfg.model.backbone.to_dict(), compile_cfg)
    if backbone == 'swin-t':
        cfg.model.neck.in_channels = SWIN_T_CHANNELS
    cfg.model.pop('pretrained', None)
    if task == 'fpn' and args.seg_size:
        cfg.model.data_preprocessor.size = (args.seg_size, args.seg_size)
    dl = cfg.train_dataloader
    dl.batch_size = args.batch or spec['batch']
    dl.num_workers = args.workers
    dl.persistent_workers = args.workers > 0
    dl.dataset.data_root = data_root
    set_pipeline_sizes(dl.dataset.pipeline, args, task)
    total = args.warmup + args.iters
    cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=total, val_interval=total + 1)
    for split in ('val', 'test'):
        for key in (f'{split}_cfg', f'{split}_dataloader', f'{split}_evaluator'):
            cfg[key] = None
    cfg.param_scheduler = None  # the learning rate does not change the cost of a step
    cfg.default_hooks.checkpoint = None
    cfg.default_hooks.logger = dict(type='LoggerHook', interval=10 ** 6)
    cfg.default_hooks.pop('visualization', None)  # not an mmengine default: pop, not None
    if args.amp:
        cfg.optim_wrapper.type = 'AmpOptimWrapper'
        cfg.optim_wrapper.dtype = AMP_DTYPES[args.amp]
    cfg.work_dir = work_dir
    # A name of its own: mmengine keeps one Visualizer (and its log folder) per name.
    cfg.experiment_name = f'loop_{task}_{backbone}_{os.getpid()}_{time.monotonic_ns()}'
    cfg.visualizer.name = cfg.experiment_name  # the configs name it 'visualizer'
    cfg.launcher = 'none'
    cfg.log_level = 'WARNING'
    cfg.randomness = dict(seed=0)
    return cfg


class IterClock:
    """Times each training iteration (registered at the lowest priority, so it brackets
    the model's train_step most tightly)."""

    priority = 'LOWEST'

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.steps: List[float] = []
        self.ends: List[float] = []
        self._t0 = 0.

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        self._t0 = self._now()

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        t = self._now()
        self.steps.append(t - self._t0)
        self.ends.append(t)


def clock_hook(cuda: bool):
    """IterClock as an mmengine Hook (mmengine imported only when a loop runs)."""
    from mmengine.hooks import Hook

    class _Clock(IterClock, Hook):
        pass
    return _Clock(cuda)


def run_loop(task: str, backbone: str, args, data_root: str) -> dict:
    try:  # mmseg's and mmdet's model packages import mmcv.ops; say so, not a later KeyError
        import mmcv.ops  # noqa: F401
    except ImportError as e:
        raise RuntimeError(f"whole models need mmcv's compiled ops ({first_line(e)})") from e
    from mmengine.runner import Runner
    cuda = args.device == 'cuda'
    with tempfile.TemporaryDirectory() as work_dir:
        cfg = loop_cfg(task, backbone, args, data_root, work_dir)
        if cuda:
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        runner = Runner.from_cfg(cfg)
        clock = clock_hook(cuda)
        runner.register_hook(clock, priority='LOWEST')
        runner.train()
        peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20 if cuda else None
        batch = cfg.train_dataloader.batch_size
        del runner
    w = args.warmup
    step = statistics.median(clock.steps[w:])
    wall = clock.ends[-1] - clock.ends[w - 1]
    return dict(step=step, img_s=batch / step, loop_img_s=batch * (len(clock.ends) - w) / wall,
                peak=peak, batch=batch)


def input_desc(task: str, args) -> str:
    if task == 'fpn':
        s = args.seg_size or 512
        return f'{s}x{s} crops'
    w, h = args.det_scale or (1333, 800)
    return f'fit {w}x{h}'


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--task', nargs='+', default=list(TASKS), choices=list(TASKS))
    p.add_argument('--backbone', nargs='+', default=list(BACKBONES), choices=BACKBONES)
    p.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    p.add_argument('--amp', choices=sorted(AMP_DTYPES),
                   help="mmengine's AmpOptimWrapper with this dtype (CUDA only)")
    p.add_argument('--compile', action='store_true', help="twins_mm's compile= flag")
    p.add_argument('--compile-mode')
    p.add_argument('--compile-backend')
    p.add_argument('--iters', type=int, default=None, help='timed iterations (cuda 20, cpu 3)')
    p.add_argument('--warmup', type=int, default=None, help='untimed first iterations '
                                                            '(cuda 5, cpu 1)')
    p.add_argument('--batch', type=int, help="images per iteration (the configs': 4 / 2)")
    p.add_argument('--workers', type=int, default=None,
                   help='dataloader workers (cuda 4, cpu 0)')
    p.add_argument('--seg-size', type=int, help='FPN crop side (512 in the config)')
    p.add_argument('--det-scale', type=int, nargs=2, metavar=('W', 'H'),
                   help='RetinaNet resize scale (1333 800 in the config)')
    p.add_argument('--num-images', type=int, default=16, help='demo images per dataset')
    args = p.parse_args(argv)
    cuda = args.device == 'cuda'
    args.iters = args.iters if args.iters is not None else (20 if cuda else 3)
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    args.workers = args.workers if args.workers is not None else (4 if cuda else 0)
    if args.iters < 1 or args.warmup < 1:
        p.error('--iters and --warmup must be at least 1')
    if cuda and not torch.cuda.is_available():
        p.error('--device cuda was asked for but torch sees no GPU')
    if args.amp and not cuda:
        p.error("--amp needs --device cuda (mmengine's AmpOptimWrapper runs on GPUs)")
    return args


def main(argv=None) -> Dict[str, Dict[str, Optional[dict]]]:
    args = parse_args(argv)
    if args.device == 'cpu':
        # Runner.from_cfg picks the GPU whenever one is visible.
        os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')
    logging.getLogger('mmengine').setLevel(logging.WARNING)
    print(f'whole-model training loop: device {args.device}'
          + (f' ({torch.cuda.get_device_name()})' if args.device == 'cuda' else '')
          + f', {args.amp or "fp32"}, twins_mm {"compiled" if args.compile else "eager"}, '
          f'{args.iters} timed iterations after {args.warmup}, {args.workers} workers',
          flush=True)
    results: Dict[str, Dict[str, Optional[dict]]] = {}
    rows = []
    with tempfile.TemporaryDirectory() as data_dir:
        for task in args.task:
            spec = TASKS[task]
            root = make_data(spec['data'], os.path.join(data_dir, task), args.num_images)
            results[task] = {}
            for backbone in args.backbone:
                t0 = time.monotonic()
                try:
                    res = run_loop(task, backbone, args, root)
                except Exception as e:  # noqa: BLE001  (a library that cannot build it)
                    print(f'[dropped] {task} {backbone}: {first_line(e)}', flush=True)
                    res = None
                results[task][backbone] = res
                if res is not None:
                    print(f'  {task} {backbone}: {res["img_s"]:.2f} img/s '
                          f'({time.monotonic() - t0:.0f} s)', flush=True)
            ours = results[task].get('twins_mm')
            for backbone, res in results[task].items():
                if res is None:
                    continue
                rows.append([task, backbone, str(res['batch']), input_desc(task, args),
                             f'{res["step"] * 1e3:.1f}', f'{res["img_s"]:.2f}',
                             f'{res["loop_img_s"]:.2f}',
                             '-' if res['peak'] is None else f'{res["peak"]:.0f}',
                             '-' if ours is None else f'{ours["step"] / res["step"]:.2f}'])
    header = ['model', 'backbone', 'batch', 'input', 'step ms', 'img/s', 'loop img/s',
              'peak MiB', 'ours/X']
    print('\nwhole models, mmengine training iterations (ours/X: step time, lower is better)')
    print(markdown(header, rows))
    return results


if __name__ == '__main__':
    main()
