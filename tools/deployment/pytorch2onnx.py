"""Export a Twins backbone or a whole segmentation model to ONNX with dynamic H and W.

The dynamo-based exporter (``torch.onnx.export(..., dynamo=True)``) traces with symbolic
height and width. Under export, LSA always pads to whole windows and masks the padding
(no-ops when the map is already whole windows), so one graph serves every input size.
The script checks onnxruntime against PyTorch at sizes that were not seen at export.

  python tools/deployment/pytorch2onnx.py --arch svt-s --out /tmp/svt_s.onnx
  python tools/deployment/pytorch2onnx.py --config configs/fpn_twins_svt_s_80k.py \\
      --checkpoint work_dirs/fpn/iter_80000.pth --out /tmp/fpn_svt_s.onnx
Segmentation models are exported in whole-image mode: the graph maps a normalised
(N, 3, H, W) image to (N, num_classes, H, W) logits (decode head + bilinear resize).
"""
import argparse
import os
import sys
import warnings
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.config import DictAction

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import twins_mm  # noqa: E402

ARCHS = {f'{fam}-{a[0]}': (cls, a) for fam, cls in (('pcpvt', 'TwinsPCPVT'), ('svt', 'TwinsSVT'))
         for a in ('small', 'base', 'large')}
MIN_SIZE = 32  # the backbone's smallest input (twins_mm.models.twins.MIN_INPUT_SIZE)


class IntegerUpsample(nn.Module):
    """mmseg's ``Upsample`` with an integral scale, sized by integer arithmetic.

    mmseg computes ``int(side * float_scale)``, which the exporter must evaluate on a
    concrete size: the graph would keep the example's feature sizes (silently wrong at
    any other input size). ``side * int_scale`` stays symbolic; the values are the same.
    """

    def __init__(self, scale: int, mode: str, align_corners):
        super().__init__()
        self.scale, self.mode, self.align_corners = scale, mode, align_corners

    def forward(self, x):
        size = [side * self.scale for side in x.shape[-2:]]
        return F.interpolate(x, size=size, mode=self.mode, align_corners=self.align_corners)


def make_upsampling_symbolic(model: nn.Module) -> nn.Module:
    from mmseg.models.utils import Upsample
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if (isinstance(child, Upsample) and not child.size
                    and isinstance(child.scale_factor, float)
                    and child.scale_factor.is_integer()):
                setattr(parent, name, IntegerUpsample(int(child.scale_factor), child.mode,
                                                      child.align_corners))
    return model


class WholeImageSegmentor(nn.Module):
    """Backbone -> neck -> decode head -> resize to the input: mmseg's 'whole' inference."""

    def __init__(self, segmentor: nn.Module):
        super().__init__()
        self.segmentor = make_upsampling_symbolic(segmentor)

    def forward(self, x):
        logits = self.segmentor.decode_head(self.segmentor.extract_feat(x))
        return F.interpolate(logits, size=x.shape[2:], mode='bilinear',
                             align_corners=self.segmentor.decode_head.align_corners)


def summarise_mismatch(message: str, shown: int = 3) -> str:
    """mmengine's strict-load error (one line per shape mismatch, then the unexpected and
    missing keys) in one line: a few of each kind and how many there are."""
    mismatches = [line for line in message.splitlines() if line.startswith('size mismatch')]
    parts = []
    if mismatches:
        more = f' (and {len(mismatches) - shown} more)' if len(mismatches) > shown else ''
        parts.append(f'{len(mismatches)} shape mismatches: '
                     + '; '.join(m.replace('size mismatch for ', '') for m in mismatches[:shown])
                     + more)
    for line in message.splitlines():
        for title, name in (('unexpected key in source state_dict: ', 'unexpected keys'),
                            ('missing keys in source state_dict: ', 'missing keys')):
            if line.startswith(title):
                keys = line[len(title):].split(', ')
                more = f', ... ({len(keys)} in all)' if len(keys) > shown else ''
                parts.append(f'{name}: {", ".join(keys[:shown])}{more}')
    return ' | '.join(parts) or ' '.join(message.split())


def build_segmentor(config: str, checkpoint: str = None, cfg_options: dict = None) -> nn.Module:
    from mmengine.config import Config
    from mmengine.registry import MODELS, init_default_scope
    from mmengine.runner import load_checkpoint
    cfg = Config.fromfile(config)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    init_default_scope(cfg.get('default_scope', 'mmseg'))
    cfg.model.pop('pretrained', None)
    cfg.model.backbone.init_cfg = None
    model = MODELS.build(cfg.model)
    if not hasattr(model, 'decode_head'):
        raise SystemExit(f'{config} is not a segmentation model (no decode_head); only '
                         'backbones and mmseg encoder-decoders can be exported here.')
    if checkpoint:
        # strict: a checkpoint of another model must not export random weights silently.
        try:
            load_checkpoint(model, checkpoint, map_location='cpu', strict=True)
        except RuntimeError as error:
            raise SystemExit(f'error: {checkpoint} does not fit the model of {config}: '
                             f'{summarise_mismatch(str(error))}') from None
    return WholeImageSegmentor(model).eval()


# Opset 23 exports attention as one ONNX Attention node (ONNX Runtime runs it ~1.2x faster
# than opset 18's MatMul + Softmax chain); 18 serves runtimes without opset 23.
DEFAULT_OPSET = 23


def export_onnx(model: nn.Module, example: torch.Tensor, path: str, opset: int = DEFAULT_OPSET):
    """Writes ``path``; batch, height and width are dynamic."""
    from torch.export import Dim
    # DYNAMIC rather than named Dims: the window arithmetic yields guards that hold for
    # every size (e.g. H <= 7 * ceil(H / 7)) but that the symbolic solver cannot prove;
    # named Dims turn those into hard errors, DYNAMIC keeps them as checks.
    dims = {0: Dim.DYNAMIC, 2: Dim.DYNAMIC, 3: Dim.DYNAMIC}
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        program = torch.onnx.export(model.eval(), (example, ), dynamo=True,
                                    dynamic_shapes=(dims, ),
                                    input_names=['image'], opset_version=opset,
                                    verbose=False)
    program.save(path)
    return path


def check_onnx(model: nn.Module, path: str, sizes: Sequence[Sequence[int]], batch: int = 1,
               atol: float = 1e-4) -> float:
    """Largest |onnxruntime - PyTorch| over ``sizes``; raises if above ``atol``."""
    import onnxruntime as ort
    sess = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    worst = 0.
    for h, w in sizes:
        x = torch.randn(batch, 3, h, w)
        with torch.inference_mode():
            ref = model(x)
        ref = ref if isinstance(ref, (tuple, list)) else (ref, )
        outs = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
        if len(outs) != len(ref):
            raise AssertionError(f'{len(outs)} ONNX outputs, {len(ref)} PyTorch outputs')
        for o, r in zip(outs, ref):
            if tuple(o.shape) != tuple(r.shape):
                raise AssertionError(f'{h}x{w}: ONNX shape {o.shape} != PyTorch {tuple(r.shape)}')
            worst = max(worst, float((torch.from_numpy(o) - r).abs().max()))
        if worst > atol:
            raise AssertionError(f'{h}x{w}: onnxruntime differs from PyTorch by {worst:.2e} '
                                 f'> {atol:.0e}')
    return worst


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument('--arch', choices=sorted(ARCHS), help='a twins_mm backbone')
    src.add_argument('--config', help='an mmseg segmentation config (whole-image mode)')
    p.add_argument('--checkpoint', help='weights (backbone: any layout twins_mm loads)')
    p.add_argument('--cfg-options', nargs='+', action=DictAction, default={},
                   help='override config entries, key=value (mmengine syntax)')
    p.add_argument('--out', required=True, help='output .onnx file')
    p.add_argument('--shape', type=int, nargs=2, default=[224, 288],
                   help='H W of the example input used for tracing')
    p.add_argument('--check-sizes', type=int, nargs='+', default=[448, 224, 200, 260],
                   help='pairs H W checked against PyTorch after export (the defaults: one size '
                   'whose every stage is whole 7x7 windows, one that needs padding)')
    p.add_argument('--opset', type=int, default=DEFAULT_OPSET,
                   help='ONNX opset: 23 (attention as one Attention node), or 18 for '
                   'runtimes that lack opset 23')
    args = p.parse_args(argv)
    if len(args.check_sizes) % 2:
        p.error('--check-sizes takes pairs: H1 W1 H2 W2 ...')
    if min(args.shape + args.check_sizes) < MIN_SIZE:
        p.error(f'sizes must be at least {MIN_SIZE}')
    if args.checkpoint and not os.path.isfile(args.checkpoint):
        p.error(f'--checkpoint {args.checkpoint} does not exist')
    if args.config and not os.path.isfile(args.config):
        p.error(f'--config {args.config} does not exist')
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        p.error(f'--out {args.out}: the folder {out_dir} does not exist; create it first')
    return args


def main(argv=None):
    from twins_mm.checkpoints import CheckpointLayoutError, UnreadableCheckpointError
    args = parse_args(argv)
    try:
        if args.config:
            model = build_segmentor(args.config, args.checkpoint, args.cfg_options)
        else:
            family, arch = ARCHS[args.arch]
            init = dict(type='Pretrained', checkpoint=args.checkpoint) if args.checkpoint else None
            model = getattr(twins_mm, family)(arch, init_cfg=init).eval()
            if args.checkpoint:
                model.init_weights()
    except (CheckpointLayoutError, UnreadableCheckpointError) as error:
        raise SystemExit(f'error: {error}') from None
    export_onnx(model, torch.randn(2, 3, *args.shape), args.out, args.opset)
    sizes = list(zip(args.check_sizes[::2], args.check_sizes[1::2]))
    try:
        worst = check_onnx(model, args.out, sizes)
    except AssertionError as error:
        raise SystemExit(f'error: {args.out} was written but does not compute what the '
                         f'PyTorch model computes: {error}') from None
    print(f'wrote {args.out}; onnxruntime matches PyTorch within {worst:.1e} at '
          f'{", ".join(f"{h}x{w}" for h, w in sizes)}')


if __name__ == '__main__':
    main()
