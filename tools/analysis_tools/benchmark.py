"""Speed and memory of twins_mm's backbones beside mmseg's and timm's Twins and mmdet's Swin.

Every model sees the same input in the same process; the models take turns (interleaved
rounds) so that a change in machine load hits all of them alike, and each figure is the
median of ``--runs`` rounds after ``--warmup`` rounds. When mmseg imports, its PCPVT / SVT
get the very weights of twins_mm's backbone (mmseg layout -> official layout via
twins_mm.checkpoints). A reference that cannot be built (mmseg without mmcv, no timm, mmdet
without mmcv's compiled ops) is dropped with the reason printed; twins_mm's row never is.

Devices and precision
  --device cpu|cuda  on CUDA each call is timed with CUDA events after a synchronize, and
                     peak memory is torch.cuda.max_memory_allocated (reset per model);
                     TF32 for fp32 matmuls/convolutions as --tf32 (on by default, stated)
  --amp bf16|fp16    torch.autocast for every model; fp16 training steps use a GradScaler
  --compile          twins_mm's own ``compile=`` flag (``--compile-mode reduce-overhead``
                     etc.); the references stay eager, and twins_mm eager is added as a row
  --batch N [N ..]   training (and, unless --infer-batch, inference) batch sizes

Detail table (one per variant and batch, ``--no-detail`` to skip)
  infer ms / img/s   forward pass under torch.inference_mode
  train ms           forward + backward + AdamW step (train mode, drop path as --drop-path;
                     loss = mean of the squared outputs)
  peak MiB           CPU: peak resident memory of one model in a fresh subprocess: peak RSS
                     (VmHWM) over one inference and two training steps minus the RSS after
                     the imports. CUDA: torch.cuda.max_memory_allocated over two training
                     steps minus the memory allocated before the model was put on the GPU.
                     Both hold weights, gradients, AdamW state and activations.
  GFLOP/s            2 x fvcore multiply-adds / inference latency, beside a plain matmul
                     (fp32 on CPU, the autocast dtype on CUDA; skipped without fvcore)
  onnx ms            ONNX Runtime on the dynamic-shape export (CPU only)
  x mmseg            ratio to mmseg's built-in model of the same variant

Ratio tables (always, after all variants): per variant and batch, the time or peak memory
of every model and "ours / X" = twins_mm's figure divided by X's (lower is better).

Examples
  python tools/analysis_tools/benchmark.py --arch svt-s pcpvt-s --swin swin-t
  python tools/analysis_tools/benchmark.py --config configs/fpn_twins_svt_s_80k.py
  python tools/analysis_tools/benchmark.py --preset gpu          # every GPU table
"""
import argparse
import contextlib
import copy
import gc
import importlib
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

START = time.monotonic()
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import twins_mm  # noqa: E402
from twins_mm.checkpoints import mmseg_to_official  # noqa: E402
from twins_mm.models.archs import PCPVT_ARCHS, SVT_ARCHS  # noqa: E402

ARCHS = {f'{fam}-{a[0]}': (cls, a) for fam, cls in (('pcpvt', 'TwinsPCPVT'), ('svt', 'TwinsSVT'))
         for a in ('small', 'base', 'large')}
ALL_ARCHS = ['svt-s', 'pcpvt-s', 'svt-b', 'pcpvt-b', 'svt-l', 'pcpvt-l']
SWIN = {  # mmdet 3.3.0 SwinTransformer settings of Swin-T / S / B (window 7, patch 4)
    'swin-t': dict(embed_dims=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    'swin-s': dict(embed_dims=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    'swin-b': dict(embed_dims=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
}
AMP_DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16}
COLUMNS = ['model', 'params M', 'GFLOPs', 'infer ms', 'img/s', 'x mmseg', 'train ms',
           'x mmseg', 'peak MiB', 'x mmseg', 'GFLOP/s', '% matmul', 'onnx ms', 'x eager']
RATIO_TABLES = (('infer', 'inference', 'ms per batch'),
                ('train', 'training step (forward, backward, AdamW)', 'ms per batch'),
                ('peak', 'training peak memory', 'MiB'))

# The GPU run (tools/analysis_tools/gpu_benchmark.sh), sections in order of importance. Each
# section overrides these fields of the arguments (unless given on the command line). With
# --budget-s N a section starts only if its estimated seconds (rough, not measured on a GPU)
# still fit in N; the first always runs. The default budget 0 runs every section.
PRESET_DEFAULTS = {
    'gpu': dict(device='cuda', amp='bf16', tf32='on', runs=10, warmup=3, swin=[],
                no_onnx=True, no_flops=True, no_detail=True, budget_s=0.),
}
PRESET_SECTIONS = {
    'gpu': [
        ('bf16 autocast, eager, all six variants, training batch 2/8/32, inference batch 1/8/32',
         dict(arch=ALL_ARCHS, batch=[2, 8, 32], infer_batch=[1, 8, 32], amp='bf16'), 150),
        ('whole models in the mmengine training loop (bf16 AMP)', 'train_loop', 50),
        ('torch.compile(mode="reduce-overhead") of twins_mm SVT-S, bf16, batch 4 and 8',
         dict(arch=['svt-s'], batch=[4, 8], infer_batch=[8], amp='bf16', compile=True,
              compile_mode='reduce-overhead'), 90),
        ('fp32 (TF32 on), eager, all six variants, batch 8',
         dict(arch=ALL_ARCHS, batch=[8], infer_batch=[8], amp=None), 60),
        ('torch.compile(mode="reduce-overhead") of twins_mm PCPVT-S, bf16, batch 4 and 8',
         dict(arch=['pcpvt-s'], batch=[4, 8], infer_batch=[8], amp='bf16', compile=True,
              compile_mode='reduce-overhead'), 90),
    ],
}


def elapsed() -> float:
    return time.monotonic() - START


# ----------------------------------------------------------------------------- models
def build_ours(arch: str, drop_path: float = 0., compile=None) -> nn.Module:
    family, name = ARCHS[arch]
    extra = {} if compile is None else {'compile': compile}
    return getattr(twins_mm, family)(name, drop_path_rate=drop_path, **extra)


def mmseg_backbone_cfg(arch: str, drop_path: float = 0.) -> dict:
    """mmseg 1.2.2's built-in PCPVT / SVT with the paper's hyper-parameters (a config dict)."""
    family, name = ARCHS[arch]
    s = (SVT_ARCHS if family == 'TwinsSVT' else PCPVT_ARCHS)[name]
    cfg = dict(embed_dims=s['embed_dims'], num_heads=s['num_heads'],
               mlp_ratios=s['mlp_ratios'], depths=s['depths'], sr_ratios=s['sr_ratios'],
               qkv_bias=True, drop_path_rate=drop_path, out_indices=(0, 1, 2, 3))
    if family == 'TwinsSVT':
        # mmseg spells the window argument 'windiow_sizes'.
        return dict(type='SVT', windiow_sizes=s['window_sizes'], norm_after_stage=True, **cfg)
    return dict(type='PCPVT', norm_after_stage=False, **cfg)


def mmseg_twins():
    """mmseg's Twins module (``PCPVT``, ``SVT``), also where mmcv has no compiled ops.

    mmseg's package ``__init__`` files import ``mmcv.ops`` (``mmseg.utils`` needs
    ``point_sample``), so with mmcv-lite (a machine where mmcv's ops cannot be built) no
    ``from mmseg.models import ...`` works, although the Twins backbone itself uses only
    ``mmcv.cnn``. Then mmseg's own ``models/backbones/twins.py`` (and ``mit.py``,
    ``utils/embed.py``, ``utils/shape_convert.py``, unmodified) are loaded under empty
    parent packages; the reason is printed.
    """
    try:
        return importlib.import_module('mmseg.models.backbones.twins')
    except ImportError as e:
        if getattr(e, 'name', None) == 'mmseg':  # mmseg itself is not installed
            raise
        reason = first_line(e)
    import types
    import mmseg  # its __init__ checks versions only
    root = os.path.dirname(mmseg.__file__)
    parent = mmseg
    for name in ('mmseg.models', 'mmseg.models.backbones', 'mmseg.models.utils'):
        if name not in sys.modules:
            pkg = types.ModuleType(name)
            pkg.__path__ = [os.path.join(root, *name.split('.')[1:])]
            sys.modules[name] = pkg
        parent = sys.modules[name.rsplit('.', 1)[0]]
        setattr(parent, name.rsplit('.', 1)[1], sys.modules[name])
    utils = sys.modules['mmseg.models.utils']
    embed = importlib.import_module('mmseg.models.utils.embed')
    shapes = importlib.import_module('mmseg.models.utils.shape_convert')
    utils.PatchEmbed = embed.PatchEmbed  # what mit.py takes from the package
    utils.nchw_to_nlc, utils.nlc_to_nchw = shapes.nchw_to_nlc, shapes.nlc_to_nchw
    module = importlib.import_module('mmseg.models.backbones.twins')
    print(f"[mmseg] loaded mmseg's backbones/twins.py alone ({reason})", flush=True)
    return module


def build_mmseg(arch: str, drop_path: float = 0.) -> nn.Module:
    cfg = mmseg_backbone_cfg(arch, drop_path)
    return getattr(mmseg_twins(), cfg.pop('type'))(**cfg)


def timm_name(arch: str) -> str:
    family, name = ARCHS[arch]
    return f"twins_{'svt' if family == 'TwinsSVT' else 'pcpvt'}_{name}"


class TimmForwardFeatures(nn.Module):
    """A timm classifier reduced to ``forward_features`` (all stages, no head)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.forward_features(x)


def build_timm(arch: str, drop_path: float = 0.) -> nn.Module:
    """timm's Twins as a feature extractor: its four stage maps, as twins_mm returns them."""
    import timm
    try:
        return timm.create_model(timm_name(arch), pretrained=False, features_only=True,
                                 drop_path_rate=drop_path)
    except Exception as e:  # noqa: BLE001  (a timm without features_only for Twins)
        print(f'[timm] features_only failed ({first_line(e)}); using forward_features')
        return TimmForwardFeatures(timm.create_model(timm_name(arch), pretrained=False,
                                                     drop_path_rate=drop_path))


def build_swin(name: str, drop_path: float = 0.) -> nn.Module:
    from mmdet.models.backbones import SwinTransformer
    return SwinTransformer(drop_path_rate=drop_path, out_indices=(0, 1, 2, 3), **SWIN[name])


def build_pair(arch: str, drop_path: float = 0., seed: int = 0, compile=None):
    """(twins_mm backbone, mmseg backbone) holding the same weights."""
    torch.manual_seed(seed)
    theirs = build_mmseg(arch, drop_path)
    theirs.init_weights()
    ours = build_ours(arch, drop_path, compile)
    missing, unexpected = ours.load_state_dict(mmseg_to_official(theirs.state_dict()),
                                               strict=False)
    # mmseg's SVT keeps no weights for nothing we lack; only absent norms may differ.
    if unexpected or any(not k.startswith('norm_list.') for k in missing):
        raise RuntimeError(f'weight mapping failed: missing {missing}, unexpected {unexpected}')
    return ours, theirs


def build_named(name: str, drop_path: float = 0., compile=None) -> nn.Module:
    """A model by name (used by the CPU memory workers).

    '<arch>' twins_mm, 'mmseg:<arch>', 'timm:<arch>', 'swin-t|s|b' (mmdet), or
    'factory:<module>.<function>': any importable ``function(drop_path) -> nn.Module``.
    """
    if name in SWIN:
        return build_swin(name, drop_path)
    kind, _, rest = name.partition(':')
    if kind == 'mmseg':
        return build_mmseg(rest, drop_path)
    if kind == 'timm':
        return build_timm(rest, drop_path)
    if kind == 'factory':
        module, _, fn = rest.rpartition('.')
        return getattr(importlib.import_module(module), fn)(drop_path)
    return build_ours(name, drop_path, compile)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f'{type(exc).__name__}: {text[0] if text else ""}'


def try_build(label: str, build: Callable[[], nn.Module], dropped: Dict[str, str]):
    """A reference model, or None with the reason recorded and printed."""
    try:
        return build()
    except Exception as e:  # noqa: BLE001  (any failure of an optional library drops it)
        dropped[label] = first_line(e)
        print(f'[dropped] {label}: {dropped[label]}', flush=True)
        return None


def compile_arg(args):
    """twins_mm's ``compile=``: None (eager), True, or the torch.compile kwargs asked for."""
    if not args.compile:
        return None
    kwargs = {k: v for k, v in (('mode', args.compile_mode), ('backend', args.compile_backend))
              if v}
    return kwargs or True


# ----------------------------------------------------------------------------- timing
class Timer:
    """Seconds of one call: perf_counter on CPU; CUDA events around it on a GPU."""

    def __init__(self, device: str):
        self.cuda = device.startswith('cuda')

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def __call__(self, fn: Callable[[], None]) -> float:
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


def interleaved_medians(fns: Dict[str, Callable[[], None]], runs: int, warmup: int,
                        timer: Callable[[Callable[[], None]], float],
                        first: Optional[Dict[str, float]] = None) -> Dict[str, float]:
    """Median seconds per call; the functions take turns in every round.

    ``first`` (if given) receives the time of each function's first call (compilation).
    """
    times = {k: [] for k in fns}
    for r in range(warmup + runs):
        for name, fn in fns.items():
            t = timer(fn)
            if r == 0 and first is not None:
                first[name] = t
            if r >= warmup:
                times[name].append(t)
    return {k: statistics.median(v) for k, v in times.items()}


def autocast(device: str, amp: Optional[str]):
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.split(':')[0], dtype=AMP_DTYPES[amp])


def output_loss(out) -> torch.Tensor:
    """Mean of squares of every output (a tensor, or a list / tuple of them), in fp32."""
    outs = [out] if torch.is_tensor(out) else list(out)
    return sum(o.float().square().mean() for o in outs)


def train_step_fn(model: nn.Module, x: torch.Tensor, amp: Optional[str] = None,
                  mark_step: bool = False) -> Callable[[], None]:
    """forward (under autocast) + backward + AdamW; fp16 with a GradScaler."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    device = x.device.type
    scaler = torch.amp.GradScaler(device) if amp == 'fp16' else None

    def step():
        if mark_step:  # CUDA graphs (reduce-overhead): a new iteration starts here
            torch.compiler.cudagraph_mark_step_begin()
        with autocast(device, amp):
            loss = output_loss(model(x))
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        opt.zero_grad(set_to_none=True)
    return step


def infer_fn(model: nn.Module, x: torch.Tensor, amp: Optional[str] = None,
             mark_step: bool = False) -> Callable[[], None]:
    model.eval()

    def run():
        if mark_step:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.inference_mode(), autocast(x.device.type, amp):
            model(x)
    return run


def matmul_gflops(device: str, dtype: torch.dtype = torch.float32, reps: int = 10) -> float:
    """What this machine reaches on one large plain matrix multiply in ``dtype``."""
    n = 8192 if device.startswith('cuda') else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    timer = Timer(device)
    for _ in range(3):
        a @ b
    return 2 * n ** 3 / statistics.median(timer(lambda: a @ b) for _ in range(reps)) / 1e9


def fvcore_macs(model: nn.Module, x: torch.Tensor) -> float:
    """Multiply-adds by fvcore's convention (the official Twins FLOPs), see get_flops.py."""
    from get_flops import count_macs
    return count_macs(model, x)


# ----------------------------------------------------------------------------- memory
def tensor_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size()
               for t in (*model.parameters(), *model.buffers()))


def cuda_peak_mib(model: nn.Module, x: torch.Tensor, amp: Optional[str] = None,
                  mark_step: bool = False) -> float:
    """Peak allocated over two training steps, minus what was allocated before them other
    than this model's weights: its weights, gradients, AdamW state and activations, in MiB
    (the other models on the GPU do not count)."""
    gc.collect()
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated() - tensor_bytes(model)
    torch.cuda.reset_peak_memory_stats()
    step = train_step_fn(model, x, amp, mark_step)
    step()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del step  # the AdamW state goes with it
    model.zero_grad(set_to_none=True)
    return peak / 2 ** 20


def peak_memory(name: str, args, batch: Optional[int] = None) -> dict:
    """Peak training (and inference) RSS of one model in a fresh subprocess, in MiB."""
    cmd = [sys.executable, os.path.abspath(__file__), '--memory-worker', name,
           '--batch', str(batch or args.batch[0]), '--size', *map(str, args.size),
           '--threads', str(args.threads), '--drop-path', str(args.drop_path)]
    if args.amp:
        cmd += ['--amp', args.amp]
    if args.compile:
        cmd += ['--compile'] + (['--compile-mode', args.compile_mode] if args.compile_mode else [])
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
    model = build_named(name, args.drop_path, compile_arg(args))
    x = torch.randn(args.batch[0], 3, *args.size)
    infer_fn(model, x, args.amp)()
    infer_peak = _proc_status_mib('VmHWM') - base
    step = train_step_fn(model, x, args.amp)
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
                                  args.runs, args.warmup, Timer('cpu'))
    return med['onnx'] * 1e3, med['eager'] * 1e3


# ----------------------------------------------------------------------------- tables
def fmt(v, digits=1):
    if v is None:
        return '-'
    return f'{v:.{digits}f}' if isinstance(v, float) else str(v)


def fmt_value(v: Optional[float]) -> str:
    """Times and MiB: 2 decimals below 100 (GPU milliseconds), 1 above."""
    if v is None:
        return '-'
    return f'{v:.2f}' if abs(v) < 100 else f'{v:.1f}'


def markdown(header: List[str], rows: List[List[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(header)]
    lines = ['| ' + ' | '.join(h.ljust(w) for h, w in zip(header, widths)) + ' |',
             '|' + '|'.join('-' * (w + 2) for w in widths) + '|']
    lines += ['| ' + ' | '.join(c.ljust(w) for c, w in zip(r, widths)) + ' |' for r in rows]
    return '\n'.join(lines)


def print_table(rows: List[dict], title: str):
    print(title)
    print(markdown(COLUMNS, [[fmt(r.get(i)) for i in range(len(COLUMNS))] for r in rows]))


def ratio(a, b):
    return None if a is None or b is None else f'{a / b:.2f}'


def ratio_tables(results: List[dict]) -> str:
    """The ratio tables: every model's figure and ours / each other model, per variant and
    batch. ``results``: dicts with 'variant', 'columns' ({label: column}, twins_mm first)
    and 'values' ({(kind, batch): {label: seconds or MiB}})."""
    out = []
    for kind, title, unit in RATIO_TABLES:
        others = []
        for res in results:
            others += [c for c in list(res['columns'].values())[1:] if c not in others]
        header = (['variant', 'batch', 'twins_mm'] + others
                  + [f'ours/{c}' for c in others])
        rows = []
        scale = 1. if kind == 'peak' else 1e3
        for res in results:
            for (k, batch), vals in res['values'].items():
                if k != kind:
                    continue
                by_col = {c: vals.get(label) for label, c in res['columns'].items()}
                ours = by_col['twins_mm']
                rows.append(
                    [res['variant'], str(batch)]
                    + [fmt_value(None if by_col.get(c) is None else by_col[c] * scale)
                       for c in ['twins_mm'] + others]
                    + [ratio(ours, by_col.get(c)) or '-' for c in others])
        if rows:
            out.append(f'\n{title}, {unit} (ours/X = twins_mm / X; lower is better)\n'
                       + markdown(header, rows))
    return '\n'.join(out)


# ----------------------------------------------------------------------------- measuring
def measure(models: Dict[str, nn.Module], args,
            worker_names: Optional[Dict[str, str]] = None) -> Dict[tuple, Dict[str, float]]:
    """{(kind, batch): {label: value}} for kind 'infer' / 'train' (seconds, medians of the
    interleaved rounds) and 'peak' (MiB), at every batch of --infer-batch / --batch.

    CPU peak memory runs ``worker_names[label]`` in a subprocess (models without a name
    get none); CUDA peak memory is measured in this process, model by model.
    """
    device, amp = args.device, args.amp
    timer = Timer(device)
    mark = bool(args.compile) and device.startswith('cuda')
    values: Dict[tuple, Dict[str, float]] = {}
    first: Dict[str, float] = {}
    for b in args.infer_batch:
        x = torch.randn(b, 3, *args.size, device=device)
        fns = {k: infer_fn(m, x, amp, mark) for k, m in models.items()}
        values[('infer', b)] = interleaved_medians(fns, args.runs, args.warmup, timer, first)
        report_first('inference', b, first, args)
    if args.no_train:
        return values
    for b in args.batch:
        x = torch.randn(b, 3, *args.size, device=device)
        if not args.no_memory:
            if device.startswith('cuda'):
                values[('peak', b)] = {k: cuda_peak_mib(m, x, amp, mark)
                                       for k, m in models.items()}
            elif device == 'cpu' and worker_names is not None:
                values[('peak', b)] = {k: peak_memory(worker_names[k], args, b)['train']
                                       for k in models if k in worker_names}
        fns = {k: train_step_fn(m, x, amp, mark) for k, m in models.items()}
        # CPU default: half the rounds and one warm-up (a CPU step is slow); on a GPU, or
        # compiled (CUDA graphs are recorded in the first calls), the full warm-up.
        warmup = (args.warmup if device.startswith('cuda') or args.compile
                  else max(1, args.warmup // 2))
        values[('train', b)] = interleaved_medians(
            fns, args.train_runs or max(1, args.runs // 2), warmup, timer, first)
        report_first('training', b, first, args)
        del fns
    return values


def report_first(what: str, batch: int, first: Dict[str, float], args):
    if args.compile:
        print(f'  first {what} call at batch {batch} (compiles): ' + ', '.join(
            f'{k} {v:.1f} s' for k, v in first.items()), flush=True)
    first.clear()


def build_models(arch: str, args, dropped: Dict[str, str]):
    """Ordered {label: model} (twins_mm first), {label: memory-worker name} and
    {label: column name of the ratio tables}."""
    dp, comp = args.drop_path, compile_arg(args)
    ours = f'twins_mm {arch}'
    models, names, columns = {}, {}, {}

    def add(label, column, model, worker=None):
        models[label], columns[label] = model, column
        if worker:
            names[label] = worker

    pair = None
    if not args.no_mmseg:
        pair = try_build(f'mmseg {arch}', lambda: build_pair(arch, dp, compile=comp), dropped)
    if pair is None:
        torch.manual_seed(0)
        pair = build_ours(arch, dp, comp), None
    add(ours, 'twins_mm', pair[0], arch)
    if comp:
        eager = build_ours(arch, dp)
        eager.load_state_dict(pair[0].state_dict())
        add(f'twins_mm eager {arch}', 'twins_mm eager', eager)
    if pair[1] is not None:
        add(f'mmseg {arch}', 'mmseg', pair[1], f'mmseg:{arch}')
    if not args.no_timm:
        torch.manual_seed(0)
        m = try_build(f'timm {arch}', lambda: build_timm(arch, dp), dropped)
        if m is not None:
            add(f'timm {arch}', 'timm', m, f'timm:{arch}')
    for s in (args.swin if arch.startswith('svt') or args.swin_for_all else []):
        torch.manual_seed(0)
        m = try_build(f'mmdet {s}', lambda: build_swin(s, dp), dropped)
        if m is not None:
            add(f'mmdet {s}', s, m, s)
    return models, names, columns


def bench_arch(arch: str, args, peak: float, dropped: Dict[str, str]):
    """(detail rows per batch, ratio-table entry) of one variant."""
    models, names, columns = build_models(arch, args, dropped)
    for m in models.values():
        m.to(args.device)
    values = measure(models, args, names)
    entry = dict(variant=arch, columns=columns, values=values)
    if args.no_detail:
        return {}, entry
    details = {}
    for b in sorted(set(args.batch) | set(args.infer_batch)):
        details[b] = detail_rows(models, values, b, args, peak)
    return details, entry


def detail_rows(models, values, batch, args, peak) -> List[dict]:
    device = args.device
    infer = values.get(('infer', batch), {})
    train = values.get(('train', batch), {})
    mem = values.get(('peak', batch), {})
    x = torch.randn(1, 3, *args.size, device=device)
    rows = []
    for i, (name, m) in enumerate(models.items()):
        row = {0: name, 1: round(sum(p.numel() for p in m.parameters()) / 1e6, 2),
               3: None if name not in infer else infer[name] * 1e3,
               6: None if name not in train else train[name] * 1e3, 8: mem.get(name)}
        if row[3] is not None:
            row[4] = batch / infer[name]
        if not args.no_flops and name in infer and not (args.compile and i == 0):
            try:
                m.eval()
                macs = fvcore_macs(m, x) * batch
            except ImportError as e:
                print(f'[no GFLOPs] {first_line(e)}')
                args.no_flops = True
            else:
                row[2] = round(macs / 1e9, 2)
                row[10] = 2 * macs / infer[name] / 1e9
                row[11] = round(100 * row[10] / peak, 1)
        rows.append(row)
    ours = next(iter(models))
    if not args.no_onnx and device == 'cpu' and not args.compile and not args.amp:
        xb = torch.randn(batch, 3, *args.size)
        rows[0][12], eager = onnx_latency(models[ours], xb, args, infer_fn(models[ours], xb))
        rows[0][13] = ratio(rows[0][12], eager)
    ref = next((r for r in rows if r[0].startswith('mmseg ')), {})
    for r in rows:
        for col in (3, 6, 8):
            r[col + (2 if col == 3 else 1)] = ratio(r.get(col), ref.get(col))
    for r in rows:
        if r[0].startswith('mmdet '):
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
    batch = args.infer_batch[0]
    x = torch.randn(batch, 3, *args.size, device=args.device)

    def run():
        with torch.inference_mode(), autocast(args.device, args.amp):
            model(x, mode='tensor')
    med = interleaved_medians({'m': run}, args.runs, args.warmup, Timer(args.device))['m']
    row = {0: os.path.basename(path),
           1: round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
           3: med * 1e3, 4: batch / med}
    if not args.no_flops:
        from get_flops import count_macs
        macs = count_macs(model, x[:1], mode='tensor') * batch
        row.update({2: round(macs / 1e9, 2), 10: 2 * macs / med / 1e9})
        row[11] = round(100 * row[10] / peak, 1)
    return [row]


# ----------------------------------------------------------------------------- run
def describe(args, peak: float) -> str:
    prec = f'{args.amp} autocast' + (' + GradScaler for training' if args.amp == 'fp16'
                                     else '') if args.amp else 'fp32'
    parts = [f'device {args.device}']
    if args.device.startswith('cuda'):
        parts.append(f'{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}), TF32 for '
                     f'fp32 matmul/conv {"on" if args.tf32 == "on" else "off"}')
    else:
        parts.append(f'threads {args.threads}')
    parts += [f'torch {torch.__version__}', f'commit {git_commit()}', prec,
              f'train batch {" ".join(map(str, args.batch))}',
              f'infer batch {" ".join(map(str, args.infer_batch))}',
              f'size {args.size[0]}x{args.size[1]}',
              f'median of {args.runs} interleaved runs',
              'twins_mm ' + (f'torch.compile({args.compile_mode or "default"}), other models '
                             'eager' if args.compile else 'eager'),
              f'plain {args.amp if args.amp and args.device == "cuda" else "fp32"} '
              f'matmul {peak:.1f} GFLOP/s']
    return ', '.join(parts)


def versions() -> str:
    out = []
    for mod in ('mmengine', 'mmcv', 'mmseg', 'mmdet', 'timm'):
        try:
            out.append(f'{mod} {importlib.import_module(mod).__version__}')
        except Exception as e:  # noqa: BLE001
            out.append(f'{mod} - ({first_line(e)})')
    return 'versions: ' + ', '.join(out)


def git_commit() -> str:
    try:
        sha = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=REPO, check=True,
                             capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'],
                               cwd=REPO, capture_output=True, text=True).stdout.strip()
        return sha + ('+uncommitted changes' if dirty else '')
    except (OSError, subprocess.CalledProcessError):
        return 'unknown'


def run_benchmark(args) -> str:
    """One table set (all --arch at all batches); returns the ratio tables' text."""
    if args.device.startswith('cuda'):
        torch.backends.cuda.matmul.allow_tf32 = args.tf32 == 'on'
        torch.backends.cudnn.allow_tf32 = args.tf32 == 'on'
    # The reference matmul is in the autocast dtype on a GPU; on a CPU always fp32 (a CPU
    # without AMX multiplies bf16 on a slow fallback path: 0.3 GFLOP/s here).
    mm_dtype = (AMP_DTYPES.get(args.amp, torch.float32) if args.device.startswith('cuda')
                else torch.float32)
    peak = matmul_gflops(args.device, mm_dtype)
    print(describe(args, peak), flush=True)
    if not args.preset:
        print(versions(), flush=True)
    if args.config:
        print_table(bench_config(args.config, args, peak), f'config {args.config}')
        return ''
    dropped: Dict[str, str] = {}
    results = []
    for i, arch in enumerate(args.arch):
        if i and args.budget_s and elapsed() > args.budget_s:
            print(f'[skipped] {arch}: the {args.budget_s:.0f} s budget is spent '
                  f'({elapsed():.0f} s)', flush=True)
            continue
        t0 = time.monotonic()
        details, entry = bench_arch(arch, args, peak, dropped)
        for b, rows in details.items():
            print_table(rows, f'\n{arch}, batch {b}')
        results.append(entry)
        print(f'({arch}: {time.monotonic() - t0:.0f} s)', flush=True)
        if args.device.startswith('cuda'):
            gc.collect()
            torch.cuda.empty_cache()
    text = ratio_tables(results)
    print(text)
    if dropped:
        print('dropped columns: ' + '; '.join(f'{k}: {v}' for k, v in dropped.items()))
    return text


def run_preset(args, explicit: set):
    """The sections of --preset in order, each only if it fits the remaining budget."""
    budget = f'budget {args.budget_s:.0f} s' if args.budget_s else 'no time budget'
    print(f'preset {args.preset}: {budget}; {versions()}', flush=True)
    for i, (title, overrides, estimate) in enumerate(PRESET_SECTIONS[args.preset]):
        left = args.budget_s - elapsed()
        if i and args.budget_s and estimate > left:
            print(f'\n## [skipped] {title}: needs ~{estimate} s, {left:.0f} s of the budget '
                  f'left', flush=True)
            continue
        print(f'\n## {title} (at {elapsed():.0f} s)', flush=True)
        if overrides == 'train_loop':
            from benchmark_train_loop import main as loop_main
            loop_argv = ['--device', args.device, '--iters', '10', '--warmup', '3']
            if args.amp:
                loop_argv += ['--amp', args.amp]
            try:
                loop_main(loop_argv)
            except Exception as e:  # noqa: BLE001  (the backbone tables still come)
                print(f'[failed] whole-model loop: {first_line(e)}')
            continue
        section = copy.copy(args)
        for k, v in overrides.items():
            if k not in explicit:
                setattr(section, k, v)
        section.budget_s = args.budget_s  # variants past the budget are skipped too
        run_benchmark(section)
        if args.device.startswith('cuda'):
            torch._dynamo.reset()
    print(f'\npreset {args.preset} done in {elapsed():.0f} s')


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--preset', choices=sorted(PRESET_SECTIONS),
                   help='a fixed run: "gpu" = every GPU table on one GPU (bf16 all six '
                        'variants, whole-model loop, torch.compile, fp32), sections in order of '
                        'importance, within --budget-s if given (explicit flags win)')
    p.add_argument('--arch', nargs='+', default=['svt-s'], choices=sorted(ARCHS),
                   help='backbone variants')
    p.add_argument('--config', help='a full model config instead of --arch (inference only)')
    p.add_argument('--swin', nargs='*', default=['swin-t'], choices=sorted(SWIN),
                   help='mmdet Swin backbones to put beside the SVT variants')
    p.add_argument('--swin-for-all', action='store_true', help='also beside PCPVT')
    p.add_argument('--no-mmseg', action='store_true', help="leave out mmseg's PCPVT/SVT")
    p.add_argument('--no-timm', action='store_true', help="leave out timm's Twins")
    p.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    p.add_argument('--amp', choices=['fp32'] + sorted(AMP_DTYPES),
                   help='torch.autocast dtype for every model (fp16 trains with a GradScaler; '
                        'fp32: no autocast, e.g. to override a preset)')
    p.add_argument('--tf32', choices=['on', 'off'], default='on',
                   help='TF32 for fp32 matmuls and convolutions on CUDA')
    p.add_argument('--compile', action='store_true',
                   help="twins_mm's compile= flag (torch.compile of its forward); twins_mm "
                        'eager is added as a reference row')
    p.add_argument('--compile-mode', help='torch.compile mode, e.g. reduce-overhead')
    p.add_argument('--compile-backend', help='torch.compile backend (default inductor; '
                                             'aot_eager checks the graph without inductor)')
    p.add_argument('--batch', type=int, nargs='+', default=[2],
                   help='training batch sizes (and inference ones unless --infer-batch)')
    p.add_argument('--infer-batch', type=int, nargs='+', help='inference batch sizes')
    p.add_argument('--size', type=int, nargs='+', default=[512], help='H [W]')
    p.add_argument('--threads', type=int, default=os.cpu_count())
    p.add_argument('--runs', type=int, default=10, help='timed rounds (median)')
    p.add_argument('--train-runs', type=int, help='timed training rounds (default runs // 2)')
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--drop-path', type=float, default=0.2,
                   help='stochastic depth for the training step (0.2 as the configs)')
    p.add_argument('--budget-s', type=float, default=0.,
                   help='skip variants (and preset sections) once this many seconds are '
                        'spent (0: no limit)')
    p.add_argument('--no-train', action='store_true')
    p.add_argument('--no-memory', action='store_true')
    p.add_argument('--no-onnx', action='store_true')
    p.add_argument('--no-flops', action='store_true')
    p.add_argument('--no-detail', action='store_true', help='ratio tables only')
    p.add_argument('--memory-worker', help=argparse.SUPPRESS)
    return p


def explicit_keys(parser: argparse.ArgumentParser, argv) -> set:
    """The destinations given on the command line (not defaults)."""
    quiet = copy.deepcopy(parser)
    for action in quiet._actions:
        action.default = argparse.SUPPRESS
    return set(vars(quiet.parse_args(argv)))


def parse_args(argv=None):
    p = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    explicit = explicit_keys(p, argv)
    if args.preset:
        for k, v in PRESET_DEFAULTS[args.preset].items():
            if k not in explicit:
                setattr(args, k, v)
    args.explicit = explicit
    if len(args.size) == 1:
        args.size = args.size * 2
    if len(args.size) != 2 or min(args.size) < 32:
        p.error(f'--size takes H or H W, each at least 32; got {args.size}')
    if args.amp == 'fp32':
        args.amp = None
    if args.infer_batch is None:
        args.infer_batch = list(args.batch)
    if min(args.batch + args.infer_batch) < 1:
        p.error('batch sizes must be at least 1')
    if (args.compile_mode or args.compile_backend) and not args.compile:
        p.error('--compile-mode / --compile-backend need --compile')
    if args.device == 'cuda' and not torch.cuda.is_available():
        p.error('--device cuda was asked for but torch sees no GPU; use --device cpu.')
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    if args.memory_worker:
        return memory_worker(args.memory_worker, args)
    if args.preset:
        return run_preset(args, args.explicit)
    return run_benchmark(args)


if __name__ == '__main__':
    main()
