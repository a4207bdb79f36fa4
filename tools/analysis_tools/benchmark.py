"""Speed and memory of twins_mm's backbones against mmseg's built-in Twins and mmdet's Swin.

Every model sees the same input in the same process; the models take turns (interleaved
rounds) so that a change in machine load hits all of them alike, and each figure is the
median of ``--runs`` rounds after ``--warmup`` rounds. mmseg's PCPVT / SVT get the very
weights of twins_mm's backbone (mmseg layout -> official layout via twins_mm.checkpoints).

Columns
  infer ms / img/s   forward pass under torch.inference_mode
  train ms           forward + backward + AdamW step (train mode, drop path as --drop-path)
  peak MiB           peak resident memory of one training step, measured in a fresh
                     subprocess per model: peak RSS (VmHWM) over one inference and two
                     training steps minus the RSS after the imports (so it holds weights, gradients, AdamW state, activations)
  GFLOP/s            2 x fvcore multiply-adds / inference latency, beside a plain fp32 matmul
  onnx ms            ONNX Runtime on the dynamic-shape export of tools/deployment/pytorch2onnx
Ratios are against mmseg's built-in model of the same variant (and Swin for the 'vs swin'
line).

Examples
  python tools/analysis_tools/benchmark.py --arch svt-s pcpvt-s --swin swin-t
  python tools/analysis_tools/benchmark.py --config configs/fpn_twins_svt_s_80k.py
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import twins_mm  # noqa: E402
from twins_mm.checkpoints import mmseg_to_official  # noqa: E402
from twins_mm.models.twins import PCPVT_ARCHS, SVT_ARCHS  # noqa: E402

ARCHS = {f'{fam}-{a[0]}': (cls, a) for fam, cls in (('pcpvt', 'TwinsPCPVT'), ('svt', 'TwinsSVT'))
         for a in ('small', 'base', 'large')}
SWIN = {  # mmdet 3.3.0 SwinTransformer settings of Swin-T / S / B (window 7, patch 4)
    'swin-t': dict(embed_dims=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    'swin-s': dict(embed_dims=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    'swin-b': dict(embed_dims=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
}
COLUMNS = ['model', 'params M', 'GFLOPs', 'infer ms', 'img/s', 'x mmseg', 'train ms',
           'x mmseg', 'peak MiB', 'x mmseg', 'GFLOP/s', '% matmul', 'onnx ms', 'x eager']


# ----------------------------------------------------------------------------- models
def build_ours(arch: str, drop_path: float = 0.) -> nn.Module:
    family, name = ARCHS[arch]
    return getattr(twins_mm, family)(name, drop_path_rate=drop_path)


def build_mmseg(arch: str, drop_path: float = 0.) -> nn.Module:
    """mmseg 1.2.2's built-in PCPVT / SVT with the paper's hyper-parameters."""
    from mmseg.models.backbones import PCPVT, SVT
    family, name = ARCHS[arch]
    s = (SVT_ARCHS if family == 'TwinsSVT' else PCPVT_ARCHS)[name]
    common = dict(embed_dims=s['embed_dims'], num_heads=s['num_heads'],
                  mlp_ratios=s['mlp_ratios'], depths=s['depths'], sr_ratios=s['sr_ratios'],
                  qkv_bias=True, drop_path_rate=drop_path, out_indices=(0, 1, 2, 3))
    if family == 'TwinsSVT':
        # mmseg spells the window argument 'windiow_sizes'.
        return SVT(windiow_sizes=s['window_sizes'], norm_after_stage=True, **common)
    return PCPVT(norm_after_stage=False, **common)


def build_swin(name: str, drop_path: float = 0.) -> nn.Module:
    from mmdet.models.backbones import SwinTransformer
    return SwinTransformer(drop_path_rate=drop_path, out_indices=(0, 1, 2, 3), **SWIN[name])


def build_pair(arch: str, drop_path: float = 0., seed: int = 0):
    """(twins_mm backbone, mmseg backbone) holding the same weights."""
    torch.manual_seed(seed)
    theirs = build_mmseg(arch, drop_path)
    theirs.init_weights()
    ours = build_ours(arch, drop_path)
    missing, unexpected = ours.load_state_dict(mmseg_to_official(theirs.state_dict()),
                                               strict=False)
    # mmseg's SVT keeps no weights for nothing we lack; only absent norms may differ.
    if unexpected or any(not k.startswith('norm_list.') for k in missing):
        raise RuntimeError(f'weight mapping failed: missing {missing}, unexpected {unexpected}')
    return ours, theirs


def build_named(name: str, drop_path: float = 0.) -> nn.Module:
    """'<arch>' (twins_mm), 'mmseg:<arch>' or 'swin-t|s|b'; used by the memory workers."""
    if name in SWIN:
        return build_swin(name, drop_path)
    if name.startswith('mmseg:'):
        return build_mmseg(name.split(':', 1)[1], drop_path)
    return build_ours(name, drop_path)


# ----------------------------------------------------------------------------- timing
def interleaved_medians(fns: Dict[str, Callable[[], None]], runs: int,
                        warmup: int, sync: Callable[[], None]) -> Dict[str, float]:
    """Median seconds per call; the functions take turns in every round."""
    times = {k: [] for k in fns}
    for r in range(warmup + runs):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def train_step_fn(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        loss = sum(o.float().square().mean() for o in model(x))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def infer_fn(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    model.eval()

    def run():
        with torch.inference_mode():
            model(x)
    return run


def matmul_gflops(device: str, n: int = 2048, reps: int = 10) -> float:
    """What this machine reaches on one large plain fp32 matrix multiply."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    sync = torch.cuda.synchronize if device.startswith('cuda') else (lambda: None)
    for _ in range(3):
        a @ b
    ts = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        a @ b
        sync()
        ts.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(ts) / 1e9


def fvcore_macs(model: nn.Module, x: torch.Tensor) -> float:
    """Multiply-adds by fvcore's convention (the official Twins FLOPs), see get_flops.py."""
    from get_flops import count_macs
    return count_macs(model, x)


def peak_memory(name: str, args) -> dict:
    """Peak training (and inference) RSS of one model in a fresh subprocess, in MiB."""
    cmd = [sys.executable, os.path.abspath(__file__), '--memory-worker', name,
           '--batch', str(args.batch), '--size', *map(str, args.size),
           '--threads', str(args.threads), '--drop-path', str(args.drop_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f'memory worker for {name} failed:\n{out.stderr[-2000:]}')
    return json.loads(out.stdout.strip().splitlines()[-1])


def _proc_status_mib(field: str) -> float:
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field + ':'):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f'/proc/self/status has no {field}')


def memory_worker(name: str, args):
    # Peak RSS from VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork + exec, so a
    # worker started by a large parent would report the parent's size.
    base = _proc_status_mib('VmRSS')
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')  # resets VmHWM to the current RSS
    torch.manual_seed(0)
    model = build_named(name, args.drop_path)
    x = torch.randn(args.batch, 3, *args.size)
    infer_fn(model, x)()
    infer_peak = _proc_status_mib('VmHWM') - base
    step = train_step_fn(model, x)
    for _ in range(2):
        step()
    print(json.dumps(dict(infer=infer_peak, train=_proc_status_mib('VmHWM') - base)))


# ----------------------------------------------------------------------------- ONNX
def onnx_latency(model: nn.Module, x: torch.Tensor, args, eager_runs: Callable) -> tuple:
    """(ORT ms, eager ms) measured interleaved; the export has dynamic H and W."""
    import onnxruntime as ort
    sys.path.insert(0, os.path.join(REPO, 'tools', 'deployment'))
    from pytorch2onnx import export_onnx
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, 'backbone.onnx')
        # Traced at another size than timed: the graph is the dynamic-shape one.
        export_onnx(model.eval(), torch.randn(2, 3, 96, 128), path)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = args.threads
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sess = ort.InferenceSession(path, opts, providers=['CPUExecutionProvider'])
        feed = {sess.get_inputs()[0].name: x.cpu().numpy()}
        med = interleaved_medians({'onnx': lambda: sess.run(None, feed), 'eager': eager_runs},
                                  args.runs, args.warmup, lambda: None)
    return med['onnx'] * 1e3, med['eager'] * 1e3


# ----------------------------------------------------------------------------- table
def fmt(v, digits=1):
    if v is None:
        return '-'
    return f'{v:.{digits}f}' if isinstance(v, float) else str(v)


def print_table(rows: List[dict], title: str):
    widths = [max(len(c), *(len(fmt(r.get(i))) for r in rows)) for i, c in enumerate(COLUMNS)]
    print(title)
    print('| ' + ' | '.join(c.ljust(w) for c, w in zip(COLUMNS, widths)) + ' |')
    print('|' + '|'.join('-' * (w + 2) for w in widths) + '|')
    for r in rows:
        print('| ' + ' | '.join(fmt(r.get(i)).ljust(w) for i, w in enumerate(widths)) + ' |')


def ratio(a, b):
    return None if a is None or b is None else f'{a / b:.2f}'


def bench_arch(arch: str, args, peak: float) -> List[dict]:
    device = args.device
    ours, theirs = build_pair(arch, args.drop_path)
    models = {f'twins_mm {arch}': ours, f'mmseg {arch}': theirs}
    swin = args.swin if arch.startswith('svt') or args.swin_for_all else []
    for s in swin:
        torch.manual_seed(0)
        models[f'mmdet {s}'] = build_swin(s, args.drop_path)
    for m in models.values():
        m.to(device)
    x = torch.randn(args.batch, 3, *args.size, device=device)
    sync = torch.cuda.synchronize if device.startswith('cuda') else (lambda: None)

    infer = interleaved_medians({k: infer_fn(m, x) for k, m in models.items()},
                                args.runs, args.warmup, sync)
    train = {}
    if not args.no_train:
        train = interleaved_medians({k: train_step_fn(m, x) for k, m in models.items()},
                                    max(1, args.runs // 2), 1, sync)
    rows = []
    for name, m in models.items():
        m.eval()
        macs = fvcore_macs(m, x[:1].cpu() if device == 'cpu' else x[:1]) * args.batch
        rows.append({0: name, 1: round(sum(p.numel() for p in m.parameters()) / 1e6, 2),
                     2: round(macs / 1e9, 2), 3: infer[name] * 1e3,
                     4: args.batch / infer[name], 10: 2 * macs / infer[name] / 1e9})
        rows[-1][11] = round(100 * rows[-1][10] / peak, 1)
        if train:
            rows[-1][6] = train[name] * 1e3
    if not args.no_memory and device == 'cpu':
        mem_names = {f'twins_mm {arch}': arch, f'mmseg {arch}': f'mmseg:{arch}',
                     **{f'mmdet {s}': s for s in swin}}
        for r in rows:
            r[8] = peak_memory(mem_names[r[0]], args)['train']
    if not args.no_onnx and device == 'cpu':
        rows[0][12], eager = onnx_latency(ours, x, args, infer_fn(ours, x))
        rows[0][13] = ratio(rows[0][12], eager)
    ref = rows[1]
    for r in rows:
        for col in (3, 6, 8):
            r[col + (2 if col == 3 else 1)] = ratio(r.get(col), ref.get(col))
    for r in rows[2:]:
        r[0] = f'{r[0]} (ours/swin: {ratio(rows[0][3], r[3])})'
    return rows


def bench_config(path: str, args, peak: float) -> List[dict]:
    """Inference latency of a full model (tensor mode: backbone, neck and heads)."""
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    cfg = Config.fromfile(path)
    init_default_scope(cfg.get('default_scope', 'mmseg'))
    from mmengine.registry import MODELS
    cfg.model.pop('pretrained', None)
    if 'init_cfg' in cfg.model.get('backbone', {}):
        cfg.model.backbone.init_cfg = None
    model = MODELS.build(cfg.model).to(args.device).eval()
    x = torch.randn(args.batch, 3, *args.size, device=args.device)
    sync = torch.cuda.synchronize if args.device.startswith('cuda') else (lambda: None)

    def run():
        with torch.inference_mode():
            model(x, mode='tensor')
    med = interleaved_medians({'m': run}, args.runs, args.warmup, sync)['m']
    from get_flops import count_macs
    macs = count_macs(model, x[:1], mode='tensor') * args.batch
    row = {0: os.path.basename(path), 1: round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
           2: round(macs / 1e9, 2), 3: med * 1e3, 4: args.batch / med,
           10: 2 * macs / med / 1e9}
    row[11] = round(100 * row[10] / peak, 1)
    return [row]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--arch', nargs='+', default=['svt-s'], choices=sorted(ARCHS),
                   help='backbone variants (each against mmseg built-in, same weights)')
    p.add_argument('--config', help='a full model config instead of --arch (inference only)')
    p.add_argument('--swin', nargs='*', default=['swin-t'], choices=sorted(SWIN),
                   help='mmdet Swin backbones to put beside the SVT variants')
    p.add_argument('--swin-for-all', action='store_true', help='also beside PCPVT')
    p.add_argument('--device', default='cpu')
    p.add_argument('--batch', type=int, default=2)
    p.add_argument('--size', type=int, nargs='+', default=[512], help='H [W]')
    p.add_argument('--threads', type=int, default=os.cpu_count())
    p.add_argument('--runs', type=int, default=10, help='timed rounds (median)')
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--drop-path', type=float, default=0.2,
                   help='stochastic depth for the training step (0.2 as the configs)')
    p.add_argument('--no-train', action='store_true')
    p.add_argument('--no-memory', action='store_true')
    p.add_argument('--no-onnx', action='store_true')
    p.add_argument('--memory-worker', help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if len(args.size) == 1:
        args.size = args.size * 2
    if len(args.size) != 2 or min(args.size) < 32:
        p.error(f'--size takes H or H W, each at least 32; got {args.size}')
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        p.error('--device cuda was asked for but torch sees no GPU; use --device cpu.')
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    if args.memory_worker:
        return memory_worker(args.memory_worker, args)
    peak = matmul_gflops(args.device)
    print(f'device {args.device}, threads {args.threads}, batch {args.batch}, size '
          f'{args.size[0]}x{args.size[1]}, fp32, median of {args.runs} interleaved runs; '
          f'plain fp32 matmul {peak:.1f} GFLOP/s')
    if args.config:
        print_table(bench_config(args.config, args, peak), f'config {args.config}')
        return
    for arch in args.arch:
        print_table(bench_arch(arch, args, peak), f'\n{arch}')


if __name__ == '__main__':
    main()
