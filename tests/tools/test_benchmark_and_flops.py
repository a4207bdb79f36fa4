"""benchmark.py and get_flops.py: they run, print every column, and count what the paper did.

Parameter counts are checked exactly against the official ImageNet logs' n_parameters
(reference section 1.9); FLOPs against the paper's Table 1, which rounds to 0.1 G, so the
fvcore count (1 FLOP = 1 multiply-add, the official convention) must be within 0.05 G.
No timing is asserted: the benchmark only has to produce a number in every cell.
"""
import os
import sys

import pytest
import torch

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


def test_benchmark_prints_every_column(capsys):
    benchmark.main(['--arch', 'svt-s', '--swin', 'swin-t', '--size', '64', '--batch', '1',
                    '--runs', '1', '--warmup', '0', '--threads', '1', '--no-onnx'])
    out = capsys.readouterr().out
    rows = table_rows(out)
    assert rows[0] == benchmark.COLUMNS
    by_name = {r[0].split(' (')[0]: r for r in rows[1:]}
    assert set(by_name) == {'twins_mm svt-s', 'mmseg svt-s', 'mmdet swin-t'}
    onnx_cols = {benchmark.COLUMNS.index('onnx ms'), benchmark.COLUMNS.index('x eager')}
    for name, r in by_name.items():
        for i, cell in enumerate(r[1:], start=1):
            if i not in onnx_cols:
                float(cell)  # every measured cell holds a number
    assert float(by_name['mmseg svt-s'][5]) == 1.0  # ratios are against mmseg
    # Same weights in both Twins models -> the same parameter count and FLOPs.
    assert by_name['twins_mm svt-s'][1] == by_name['mmseg svt-s'][1]
    swin_label = next(r[0] for r in rows[1:] if r[0].startswith('mmdet swin-t'))
    float(swin_label.split('ours/swin:')[1].rstrip(')'))
    matmul = out.split('plain fp32 matmul')[1].split()[0]
    assert float(matmul) > 0


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
