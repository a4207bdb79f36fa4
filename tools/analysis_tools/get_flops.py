"""Parameters and FLOPs of Twins backbones and full models beside the paper's figures.

Convention (the official Twins numbers, "Fix FLOPs use fvcore"): fvcore's counter, where
one FLOP is one multiply-add of a conv / linear / matmul (plus fvcore's norm and upsample
handlers); elementwise ops and softmax are free. fvcore does not know fused attention, so
``scaled_dot_product_attention`` is counted as the two matmuls it replaces (q k^T and
attn v), as the official explicit-attention code is. Sizes follow the paper (reference
section 6): 224x224 classification form (backbone + final LayerNorm + 1000-way head),
512x512 ADE20K models, 800x600 COCO models (the repository's configs).

  python tools/analysis_tools/get_flops.py                  # all tables
  python tools/analysis_tools/get_flops.py --only backbone --size 512
"""
import argparse
import logging
import os
import sys
from typing import Optional

import torch
import torch.nn as nn

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import twins_mm  # noqa: E402

VARIANTS = [('pcpvt-s', 'TwinsPCPVT', 'small'), ('pcpvt-b', 'TwinsPCPVT', 'base'),
            ('pcpvt-l', 'TwinsPCPVT', 'large'), ('svt-s', 'TwinsSVT', 'small'),
            ('svt-b', 'TwinsSVT', 'base'), ('svt-l', 'TwinsSVT', 'large')]
CONFIG_NAMES = {'pcpvt-s': 'pcpvt_s', 'pcpvt-b': 'pcpvt_b', 'pcpvt-l': 'pcpvt_l',
                'svt-s': 'svt_s', 'svt-b': 'svt_b', 'svt-l': 'svt_l'}
# Paper figures (reference section 6): (params M, GFLOPs); None where the paper has none.
PAPER = {
    'imagenet': {'pcpvt-s': (24.1, 3.8), 'pcpvt-b': (43.8, 6.7), 'pcpvt-l': (60.9, 9.8),
                 'svt-s': (24.0, 2.9), 'svt-b': (56.0, 8.6), 'svt-l': (99.2, 15.1)},
    'fpn': {'pcpvt-s': (28.4, 40), 'pcpvt-b': (48.1, 55), 'pcpvt-l': (65.3, 71),
            'svt-s': (28.3, 37), 'svt-b': (60.4, 67), 'svt-l': (103.7, 102)},
    'upernet': {'pcpvt-s': (54.6, 234), 'pcpvt-b': (74.3, 250), 'pcpvt-l': (91.5, 269),
                'svt-s': (54.4, 228), 'svt-b': (88.5, 261), 'svt-l': (133, 297)},
    'retinanet': {'pcpvt-s': (34.4, 118), 'pcpvt-b': (54.1, 151), 'pcpvt-l': (71.2, None),
                  'svt-s': (34.3, 104), 'svt-b': (67.0, None), 'svt-l': (110.9, None)},
    'mask_rcnn': {'pcpvt-s': (44.3, 178), 'pcpvt-b': (64.0, 211), 'pcpvt-l': (81.2, None),
                  'svt-s': (44.0, 164), 'svt-b': (76.3, 224), 'svt-l': (119.7, None)},
    'backbone512': {'pcpvt-s': (None, 23.1), 'svt-s': (None, 17.3)},
}
# The official README's (lower) ImageNet FLOPs, printed as a second reference.
README_IMAGENET_GFLOPS = {'pcpvt-s': 3.7, 'pcpvt-b': 6.4, 'pcpvt-l': 9.5,
                          'svt-s': 2.8, 'svt-b': 8.3, 'svt-l': 14.8}
TASKS = {  # task -> (config pattern, input H, W)
    'fpn': ('fpn_twins_{}_80k.py', 512, 512),
    'upernet': ('upernet_twins_{}_160k.py', 512, 512),
    'retinanet': ('retinanet_twins_{}_1x.py', 600, 800),
    'mask_rcnn': ('mask_rcnn_twins_{}_1x.py', 600, 800),
}


def _sdpa_macs(inputs, outputs):
    """q k^T and attn v: 2 * (..., Lq, d) x (..., Lk) multiply-adds."""
    from fvcore.nn.jit_handles import get_shape
    q, k = get_shape(inputs[0]), get_shape(inputs[1])
    batch = 1
    for d in q[:-2]:
        batch *= d
    return batch * q[-2] * k[-2] * q[-1] * 2


class _Wrap(nn.Module):
    """Gives fvcore a forward that takes one tensor (tensor mode of a full model)."""

    def __init__(self, model: nn.Module, mode: Optional[str], data_samples=None):
        super().__init__()
        self.model, self.mode, self.data_samples = model, mode, data_samples

    def forward(self, x):
        if self.mode is None:
            return self.model(x)
        return self.model(x, self.data_samples, mode=self.mode)


def detection_samples(h: int, w: int):
    """Image metas that two-stage detectors need to turn RPN outputs into proposals."""
    from mmdet.structures import DetDataSample
    meta = dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w),
                batch_input_shape=(h, w), scale_factor=(1., 1.))
    return [DetDataSample(metainfo=meta)]


def count_macs(model: nn.Module, x: torch.Tensor, mode: Optional[str] = None,
               data_samples=None) -> float:
    """fvcore multiply-adds for one forward of ``model`` on ``x``."""
    from fvcore.nn import FlopCountAnalysis
    logging.getLogger('fvcore').setLevel(logging.ERROR)
    was_training = model.training
    model.eval()
    analysis = FlopCountAnalysis(_Wrap(model, mode, data_samples), (x, ))
    analysis.set_op_handle('aten::scaled_dot_product_attention', _sdpa_macs)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    with torch.no_grad():
        total = analysis.total()
    model.train(was_training)
    return float(total)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class TwinsClassifier(nn.Module):
    """The ImageNet form: backbone (no stage norms) + final LayerNorm + pool + head."""

    def __init__(self, family: str, arch: str, num_classes: int = 1000):
        super().__init__()
        self.backbone = getattr(twins_mm, family)(arch, out_indices=(3, ),
                                                  norm_after_stage=False)
        dims = self.backbone.embed_dims[-1]
        self.norm = nn.LayerNorm(dims, eps=1e-6)
        self.head = nn.Linear(dims, num_classes)

    def forward(self, x):
        feat = self.backbone(x)[-1].mean((2, 3))
        return self.head(self.norm(feat))


def build_config_model(path: str) -> nn.Module:
    from mmengine.config import Config
    from mmengine.registry import MODELS, init_default_scope
    cfg = Config.fromfile(path)
    init_default_scope(cfg.get('default_scope', 'mmseg'))
    cfg.model.pop('pretrained', None)
    cfg.model.backbone.init_cfg = None
    if cfg.model.get('data_preprocessor') is not None:
        cfg.model.data_preprocessor = None  # tensors go straight in
    return MODELS.build(cfg.model).eval()


def row(name, params, gflops, paper, digits):
    p_params, p_flops = paper if paper else (None, None)
    d_flops = None if p_flops is None else gflops - p_flops
    d_params = None if p_params is None else params - p_params
    return [name, f'{params:.2f}', '-' if p_params is None else p_params,
            '-' if d_params is None else f'{d_params:+.2f}', f'{gflops:.{digits}f}',
            '-' if p_flops is None else p_flops, '-' if d_flops is None else f'{d_flops:+.2f}']


def print_table(title, rows, note=''):
    cols = ['model', 'params M', 'paper M', 'diff', 'GFLOPs', 'paper G', 'diff']
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    print(f'\n{title}{note}')
    print('| ' + ' | '.join(c.ljust(w) for c, w in zip(cols, widths)) + ' |')
    print('|' + '|'.join('-' * (w + 2) for w in widths) + '|')
    for r in rows:
        print('| ' + ' | '.join(c.ljust(w) for c, w in zip(r, widths)) + ' |')


def imagenet_rows(variants):
    rows = []
    for key, family, arch in variants:
        model = TwinsClassifier(family, arch)
        macs = count_macs(model, torch.randn(1, 3, 224, 224))
        r = row(key, count_params(model) / 1e6, macs / 1e9, PAPER['imagenet'][key], 2)
        r[5] = f'{r[5]} ({README_IMAGENET_GFLOPS[key]})'
        rows.append(r)
    return rows


def backbone_rows(variants, h, w):
    rows = []
    for key, family, arch in variants:
        model = getattr(twins_mm, family)(arch)
        macs = count_macs(model, torch.randn(1, 3, h, w))
        paper = PAPER['backbone512'].get(key) if (h, w) == (512, 512) else None
        rows.append(row(key, count_params(model) / 1e6, macs / 1e9, paper, 2))
    return rows


def task_rows(task, variants, config_dir, official_params=True):
    pattern, h, w = TASKS[task]
    rows = []
    for key, _, _ in variants:
        path = os.path.join(config_dir, pattern.format(CONFIG_NAMES[key]))
        if not os.path.exists(path):
            rows.append([key, f'(no config {os.path.relpath(path, REPO)})', '-', '-', '-',
                         '-', '-'])
            continue
        model = build_config_model(path)
        # The official dense models keep the unused ImageNet head and final norm, and the
        # paper's parameter counts include them (reference section 1.9).
        c3 = model.backbone.embed_dims[-1]
        unused = (1000 * c3 + 1000 + 2 * c3) if official_params else 0
        samples = detection_samples(h, w) if task == 'mask_rcnn' else None
        macs = count_macs(model, torch.randn(1, 3, h, w), mode='tensor', data_samples=samples)
        rows.append(row(key, (count_params(model) + unused) / 1e6, macs / 1e9,
                        PAPER[task][key], 1))
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--only', nargs='+', default=['imagenet', 'backbone', *TASKS],
                   choices=['imagenet', 'backbone', *TASKS])
    p.add_argument('--arch', nargs='+', default=[v[0] for v in VARIANTS],
                   choices=[v[0] for v in VARIANTS])
    p.add_argument('--size', type=int, nargs='+', default=[512],
                   help='H [W] for the backbone-only table')
    p.add_argument('--own-params', action='store_true',
                   help='dense models: count only the parameters twins_mm builds')
    p.add_argument('--config-dir', default=os.path.join(REPO, 'configs'))
    args = p.parse_args(argv)
    if len(args.size) == 1:
        args.size = args.size * 2
    if len(args.size) != 2 or min(args.size) < 32:
        p.error(f'--size takes H or H W, each at least 32; got {args.size}')
    return args


def main(argv=None):
    args = parse_args(argv)
    variants = [v for v in VARIANTS if v[0] in args.arch]
    print('fvcore convention: 1 FLOP = 1 multiply-add (conv, linear, matmul, attention '
          'matmuls, norms); paper figures from Chu et al. 2021 (diff = ours - paper)')
    if 'imagenet' in args.only:
        print_table('ImageNet form, 224x224 (paper Table 1)', imagenet_rows(variants),
                    '; paper G in brackets: the official README')
    if 'backbone' in args.only:
        h, w = args.size
        print_table(f'backbone alone, {h}x{w}', backbone_rows(variants, h, w))
    for task in TASKS:
        if task in args.only:
            _, h, w = TASKS[task]
            print_table(f'{task} at {h}x{w} (H x W)',
                        task_rows(task, variants, args.config_dir, not args.own_params),
                        '' if args.own_params else '; params M include the unused ImageNet '
                        'head + final norm of the official models, as the paper counts them')


if __name__ == '__main__':
    main()
