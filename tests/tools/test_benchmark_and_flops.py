"""benchmark.py and get_flops.py: the numbers they print are the right ones.

Parameter counts are checked exactly against the official ImageNet logs' n_parameters
(reference section 1.9); FLOPs against the paper's Table 1, which rounds to 0.1 G, so the
fvcore count (1 FLOP = 1 multiply-add, the official convention) must be within 0.05 G.

The benchmark is checked on models whose cost is known by construction, never against a
speed target: a model that sleeps three times as long as another must come out about 3x
slower (sleep is not slowed by machine load the way arithmetic is; the bounds are loose),
a model that holds a known extra buffer through backward must peak higher by about that
buffer, and every printed ratio must be the quotient of the printed figures it names.
"""
import os
import re
import subprocess
import sys
import time
import types

import pytest
import torch
import torch.nn as nn

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, 'tools', 'analysis_tools'))

import benchmark  # noqa: E402
import get_flops  # noqa: E402

# Official ImageNet logs, n_parameters (reference section 1.9).
OFFICIAL_PARAMS = {'pcpvt-s': 24_106_216, 'pcpvt-b': 43_828_456, 'pcpvt-l': 60_989_672,
                   'svt-s': 24_060_776, 'svt-b': 56_070_952, 'svt-l': 99_271_400}


def table_rows(text):
    """Markdown table lines -> list of cell lists (header first, separator dropped)."""
    rows = [[c.strip() for c in line.strip().strip('|').split('|')]
            for line in text.splitlines() if line.startswith('|')]
    return [r for r in rows if not set(''.join(r)) <= {'-'}]


def ratio_table(text, title):
    """The ratio table whose title starts with ``title``: (header, rows as dicts)."""
    block = text.split('\n' + title, 1)[1].split('\n\n', 1)[0]
    rows = table_rows(block)
    return rows[0], [dict(zip(rows[0], r)) for r in rows[1:]]


def check_ratio_columns(header, rows):
    """Every 'ours/X' cell equals twins_mm / X of the same row (within printed rounding)."""
    checked = 0
    for row in rows:
        for col in header:
            if not col.startswith('ours/') or row[col] == '-':
                continue
            ours, other = float(row['twins_mm']), float(row[col[len('ours/'):]])
            # the figures are rounded to 0.01 (or 0.1 above 100), the ratio to 0.01
            bound = 0.006 + (ours / other) * (0.05 / ours + 0.05 / other)
            assert abs(float(row[col]) - ours / other) <= bound, (col, row)
            checked += 1
    return checked


# ----------------------------------------------------------------------------- models of
# known cost (module-level so that the memory worker can build them: 'factory:...')
class KnownCost(nn.Module):
    """A small convolution followed by ``cost`` (a sleep, a GPU spin, a held buffer)."""

    def __init__(self, cost=None):
        super().__init__()
        self.cost = cost
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return y if self.cost is None else self.cost(y)


class _Hold(torch.autograd.Function):
    """Identity on x that keeps ``buf`` alive until backward (as a saved activation)."""

    @staticmethod
    def forward(ctx, x, buf):
        ctx.save_for_backward(buf)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def sleep_for(seconds):
    """Cost by construction: sleeping is not slowed by machine load as arithmetic is."""
    def cost(y):
        time.sleep(seconds)
        return y
    return cost


def hold_mib(mib):
    """``mib`` MiB of float32 kept through backward."""
    def cost(y):
        return _Hold.apply(y, torch.ones(mib * 2 ** 18, device=y.device))
    return cost


def ballast_0(drop_path=0.):
    return KnownCost()


def ballast_256(drop_path=0.):
    return KnownCost(hold_mib(256))


def tiny_args(*extra):
    return benchmark.parse_args(['--size', '32', '--batch', '1', '--runs', '3',
                                 '--warmup', '1', '--threads', '1', '--no-onnx',
                                 '--no-memory', '--no-flops', '--swin', *extra])


@pytest.mark.parametrize('key,family,arch', get_flops.VARIANTS)
def test_imagenet_params_and_flops_match_paper(key, family, arch):
    model = get_flops.TwinsClassifier(family, arch)
    assert get_flops.count_params(model) == OFFICIAL_PARAMS[key]
    gflops = get_flops.count_macs(model, torch.randn(1, 3, 224, 224)) / 1e9
    paper_params, paper_gflops = get_flops.PAPER['imagenet'][key]
    assert abs(gflops - paper_gflops) <= 0.05 + 1e-9, (key, gflops, paper_gflops)
    # The paper truncates parameters after 0.1 M (60.99 M -> 60.9, 24.06 M -> 24).
    assert 0 <= OFFICIAL_PARAMS[key] / 1e6 - paper_params < 0.1


def test_sdpa_counted_as_two_matmuls():
    """One GSA at sr=1: q k^T and attn v are 2 * N^2 * C multiply-adds on top of the linears."""
    from twins_mm.models.twins import GlobalSubsampledAttention
    attn = GlobalSubsampledAttention(dim=32, num_heads=4, sr_ratio=1)
    n, c = 6 * 5, 32
    linears = n * c * c + n * c * 2 * c + n * c * c  # q, kv, proj
    assert get_flops.count_macs(attn, torch.randn(1, 6, 5, c)) == linears + 2 * n * n * c


def test_get_flops_prints_every_table(capsys):
    get_flops.main(['--only', 'backbone', 'fpn', '--arch', 'svt-s', '--size', '64'])
    out = capsys.readouterr().out
    rows = table_rows(out)
    header = ['model', 'params M', 'paper M', 'diff', 'GFLOPs', 'paper G', 'diff']
    assert [r for r in rows if r[0] == 'model'] == [header, header]
    backbone, fpn = [r for r in rows if r[0] == 'svt-s']
    assert float(backbone[1]) == pytest.approx(23.548672, abs=0.005)  # reference 1.9
    assert float(backbone[4]) > 0
    # FPN at 512x512: the paper's 28.3 M counts the unused ImageNet head (reference 1.9).
    assert abs(float(fpn[1]) - 28.3) < 0.1 and fpn[3] != '-' and fpn[6] != '-'


def test_benchmark_pair_holds_the_same_weights():
    ours, theirs = benchmark.build_pair('pcpvt-s')
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        for a, b in zip(ours.eval()(x), theirs.eval()(x)):
            # official LayerNorm eps 1e-6 vs mmseg's 1e-5 (see test_parity_mmseg)
            torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def test_benchmark_rejects_bad_size():
    with pytest.raises(SystemExit):
        benchmark.parse_args(['--size', '16'])


def test_peak_memory_is_the_workers_own():
    """The worker's peak must not inherit the parent's RSS (ru_maxrss survives fork + exec).

    The parent holds a 2 GiB buffer; a small model's worker (weights, gradients and AdamW
    state ~380 MiB, plus activations) must report far less, and a larger input must report
    more than a smaller one.
    """
    ballast = torch.ones(2 * 2 ** 30 // 4)  # noqa: F841  (kept alive on purpose)
    args = benchmark.parse_args(['--arch', 'svt-s', '--batch', '1', '--threads', '1',
                                 '--size', '64'])
    small = benchmark.peak_memory('svt-s', args)
    args.size = [192, 192]
    large = benchmark.peak_memory('svt-s', args)
    for peak in (small, large):
        assert 0 < peak['infer'] < peak['train'] < 1024, peak
    assert large['train'] > small['train'] + 20, (small, large)


# ----------------------------------------------------------------------------- benchmark
def test_ratio_tables_report_a_known_slowdown_and_their_quotients(capsys):
    """twins_mm's place taken by a model that sleeps 0.6 s, beside one that sleeps 0.2 s and
    one that does not: each printed ratio is the quotient of its printed columns, and the
    extra time over the sleepless model is 3x as large (what a loaded machine adds to
    every call cancels out of that difference; the bounds are loose)."""
    args = tiny_args()
    models = {'twins_mm x': KnownCost(sleep_for(0.6)), 'timm x': KnownCost(sleep_for(0.2)),
              'mmseg x': KnownCost()}
    values = benchmark.measure(models, args)
    entry = dict(variant='x', values=values, columns={
        'twins_mm x': 'twins_mm', 'timm x': 'timm', 'mmseg x': 'mmseg'})
    text = benchmark.ratio_tables([entry])
    for title in ('inference', 'training step'):
        header, rows = ratio_table(text, title)
        assert header == ['variant', 'batch', 'twins_mm', 'timm', 'mmseg', 'ours/timm',
                          'ours/mmseg']
        assert check_ratio_columns(header, rows) == 2
        ours, slow, zero = (float(rows[0][c]) for c in ('twins_mm', 'timm', 'mmseg'))
        assert ours >= 600 and slow >= 200  # ms: a sleep is a lower bound
        assert 2.0 < (ours - zero) / (slow - zero) < 4.5, rows  # nominal 3.0
        assert float(rows[0]['ours/timm']) > 1.5


def test_interleaved_medians_take_the_median_of_the_timed_rounds():
    calls = []
    seconds = iter([9., 1., 5., 3.])  # round 0 is the warm-up: median of 1, 5, 3 is 3
    first = {}
    med = benchmark.interleaved_medians({'a': lambda: calls.append(1)}, runs=3, warmup=1,
                                        timer=lambda fn: (fn(), next(seconds))[1],
                                        first=first)
    assert med == {'a': 3.} and first == {'a': 9.} and len(calls) == 4


def test_peak_memory_counts_a_known_extra_allocation():
    """A model holding 256 MiB more through backward peaks about 256 MiB higher (CPU
    worker: VmHWM in a fresh process)."""
    args = benchmark.parse_args(['--batch', '1', '--threads', '1', '--size', '32'])
    name = 'factory:tests.tools.test_benchmark_and_flops.'
    small = benchmark.peak_memory(name + 'ballast_0', args)
    big = benchmark.peak_memory(name + 'ballast_256', args)
    assert 0.85 * 256 < big['train'] - small['train'] < 1.15 * 256, (small, big)


def test_ratio_columns_of_the_cli_are_the_quotients(capsys):
    """The real models, through the command line: the ratio cells of every table are
    twins_mm / mmseg of the same row, and the detail table's 'x mmseg' agrees."""
    benchmark.main(['--arch', 'svt-s', '--swin', '--no-timm', '--size', '64', '--batch', '1',
                    '--runs', '1', '--warmup', '0', '--threads', '1', '--no-onnx'])
    out = capsys.readouterr().out
    rows = table_rows(out.split('\ninference')[0])
    assert rows[0] == benchmark.COLUMNS
    by_name = {r[0]: r for r in rows[1:]}
    assert set(by_name) == {'twins_mm svt-s', 'mmseg svt-s'}
    ours, ref = by_name['twins_mm svt-s'], by_name['mmseg svt-s']
    cols = benchmark.COLUMNS
    for value, x in (('infer ms', 5), ('train ms', 7), ('peak MiB', 9)):
        i = cols.index(value)
        assert float(ref[x]) == 1.0
        assert float(ours[x]) == pytest.approx(float(ours[i]) / float(ref[i]), abs=0.011)
    # same weights -> same parameter count; GFLOP/s = 2 x GFLOPs / seconds
    assert ours[1] == ref[1]
    gflops, ms = float(ours[2]), float(ours[3])  # printed to 0.1
    assert float(ours[10]) == pytest.approx(2 * gflops / (ms / 1e3),
                                            rel=0.05 / gflops + 0.05 / ms + 0.01)
    for title in ('inference', 'training step', 'training peak memory'):
        header, table = ratio_table(out, title)
        assert header == ['variant', 'batch', 'twins_mm', 'mmseg', 'ours/mmseg']
        assert check_ratio_columns(header, table) == 1
    assert float(ratio_table(out, 'inference')[1][0]['twins_mm']) == pytest.approx(
        float(ours[3]), abs=0.06)


def test_autocast_reaches_the_model_and_fp16_trains_with_a_scaler():
    """--amp bf16 / fp16 on CPU: the convolutions run in that dtype in both paths, the
    parameters stay fp32 and the training step changes them."""
    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.seen = []

        def forward(self, x):
            y = self.conv(x)
            self.seen.append(y.dtype)
            return y

    x = torch.randn(2, 3, 16, 16)
    for amp, dtype in (('bf16', torch.bfloat16), ('fp16', torch.float16)):
        m = Probe()
        before = m.conv.weight.detach().clone()
        benchmark.infer_fn(m, x, amp)()
        step = benchmark.train_step_fn(m, x, amp)
        step()
        step()
        assert m.seen == [dtype] * 3 and m.conv.weight.dtype == torch.float32
        assert not torch.equal(before, m.conv.weight) and torch.isfinite(m.conv.weight).all()
    m = Probe()
    benchmark.infer_fn(m, x, None)()
    assert m.seen == [torch.float32]


def test_cli_bf16_on_cpu_states_the_precision(capsys):
    benchmark.main(['--arch', 'pcpvt-s', '--amp', 'bf16', '--size', '32', '--batch', '1',
                    '--runs', '1', '--warmup', '0', '--threads', '1', '--no-onnx',
                    '--no-memory', '--no-detail', '--no-timm'])
    out = capsys.readouterr().out
    assert 'bf16 autocast' in out.splitlines()[0]
    header, rows = ratio_table(out, 'training step')
    assert [r['variant'] for r in rows] == ['pcpvt-s'] and check_ratio_columns(header, rows)


def test_compile_flag_compiles_ours_and_adds_eager(capsys):
    """--compile sets twins_mm's compile= flag (backend eager here: dynamo without
    inductor's minutes of C++ builds); the references stay eager; twins_mm eager with the
    same weights is a column."""
    args = tiny_args('--compile', '--compile-backend', 'eager', '--no-mmseg', '--no-timm')
    models, names, columns = benchmark.build_models('svt-s', args, {})
    assert list(columns.values()) == ['twins_mm', 'twins_mm eager']
    ours, eager = models.values()
    assert ours.compile_cfg == {'backend': 'eager'} and eager.compile_cfg is None
    for a, b in zip(ours.state_dict().values(), eager.state_dict().values()):
        assert torch.equal(a, b)
    values = benchmark.measure(models, args)
    assert ours._compiled_forward is not None and eager._compiled_forward is None
    assert set(values) == {('infer', 1), ('train', 1)}
    text = benchmark.ratio_tables([dict(variant='svt-s', columns=columns, values=values)])
    header, rows = ratio_table(text, 'training step')
    assert header[-1] == 'ours/twins_mm eager' and check_ratio_columns(header, rows) == 1


def test_compile_mode_needs_compile():
    with pytest.raises(SystemExit):
        benchmark.parse_args(['--compile-mode', 'reduce-overhead'])
    args = benchmark.parse_args(['--compile', '--compile-mode', 'reduce-overhead'])
    assert benchmark.compile_arg(args) == {'mode': 'reduce-overhead'}
    assert benchmark.compile_arg(benchmark.parse_args(['--compile'])) is True


def test_several_batch_sizes_give_one_row_each():
    args = benchmark.parse_args(['--batch', '2', '3', '--infer-batch', '1', '4'])
    assert args.batch == [2, 3] and args.infer_batch == [1, 4]
    assert benchmark.parse_args(['--batch', '2', '8']).infer_batch == [2, 8]
    args = tiny_args('--batch', '1', '2', '--infer-batch', '3')
    values = benchmark.measure({'twins_mm a': KnownCost(), 'mmseg a': KnownCost()}, args)
    assert set(values) == {('infer', 3), ('train', 1), ('train', 2)}
    text = benchmark.ratio_tables([dict(variant='a', values=values, columns={
        'twins_mm a': 'twins_mm', 'mmseg a': 'mmseg'})])
    assert [r['batch'] for r in ratio_table(text, 'training step')[1]] == ['1', '2']
    assert [r['batch'] for r in ratio_table(text, 'inference')[1]] == ['3']


def test_timm_column_uses_timms_twins_and_is_dropped_without_timm(monkeypatch, capsys):
    """With timm: its twins_<family>_<size> as a four-map feature extractor, as a 'timm'
    column; without: the column is dropped with the reason, twins_mm still measured."""
    made = []

    def create_model(name, pretrained, features_only, drop_path_rate):
        made.append((name, pretrained, features_only, drop_path_rate))
        return KnownCost()
    monkeypatch.setitem(sys.modules, 'timm', types.SimpleNamespace(create_model=create_model))
    args = tiny_args('--no-mmseg', '--drop-path', '0.1')
    models, _, columns = benchmark.build_models('pcpvt-b', args, {})
    assert list(columns.values()) == ['twins_mm', 'timm']
    assert made == [('twins_pcpvt_base', False, True, 0.1)]

    monkeypatch.setitem(sys.modules, 'timm', None)  # import timm -> ImportError
    dropped = {}
    models, _, columns = benchmark.build_models('svt-s', args, dropped)
    assert list(columns.values()) == ['twins_mm'] and 'timm svt-s' in dropped
    assert '[dropped] timm svt-s' in capsys.readouterr().out


def test_mmseg_backbone_loads_without_mmcv_ops():
    """Where mmcv has no compiled ops (mmcv-lite, the GPU machine), mmseg's package cannot
    be imported; mmseg's twins.py is then loaded alone and holds the same weights as ours.
    Simulated by hiding mmcv._ext in a fresh process."""
    code = f"""
import importlib.abc, sys
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == 'mmcv._ext':
            raise ModuleNotFoundError("No module named 'mmcv._ext'", name=name)
sys.meta_path.insert(0, Hide())
sys.path.insert(0, {os.path.join(REPO, 'tools', 'analysis_tools')!r})
import torch, benchmark
try:
    import mmseg.models
except ImportError as e:
    print('package import fails:', e.name)
ours, theirs = benchmark.build_pair('svt-s')
x = torch.randn(1, 3, 64, 64)
with torch.inference_mode():
    err = max((a - b).abs().max().item() for a, b in zip(ours.eval()(x), theirs.eval()(x)))
print('module', type(theirs).__module__, 'err', err)
"""
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                         cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert 'package import fails: mmcv._ext' in out.stdout
    assert "[mmseg] loaded mmseg's backbones/twins.py alone" in out.stdout
    err = float(re.search(r'module mmseg.models.backbones.twins err (\S+)', out.stdout)[1])
    assert err < 1e-4  # LayerNorm eps 1e-6 vs 1e-5, as test_benchmark_pair_holds_...


def test_gpu_preset_runs_its_sections_within_the_budget(capsys):
    """--preset gpu on CPU (explicit flags win over the preset): the first section runs
    at the preset's batch sizes, the rest are skipped by name once the budget is spent."""
    benchmark.main(['--preset', 'gpu', '--device', 'cpu', '--arch', 'svt-s', '--size', '32',
                    '--runs', '1', '--warmup', '0', '--threads', '1', '--no-memory',
                    '--budget-s', '1', '--no-timm', '--amp', 'fp32'])  # CPU bf16 is slow
    out = capsys.readouterr().out
    header_line = next(line for line in out.splitlines() if line.startswith('device '))
    assert 'device cpu' in header_line and ', fp32,' in header_line
    assert 'autocast' not in header_line
    header, rows = ratio_table(out, 'training step')
    assert [(r['variant'], r['batch']) for r in rows] == [('svt-s', '2'), ('svt-s', '8'),
                                                          ('svt-s', '32')]
    assert [r['batch'] for r in ratio_table(out, 'inference')[1]] == ['1', '8', '32']
    # ours/mmseg at each of the three batch sizes, in both tables
    assert check_ratio_columns(header, rows) == 3
    assert check_ratio_columns(*ratio_table(out, 'inference')) == 3
    skipped = re.findall(r'## \[skipped\] (.*?):', out)
    assert len(skipped) == len(benchmark.PRESET_SECTIONS['gpu']) - 1, out
