"""benchmark.py's CUDA path, on known work: a GPU spin of known length, a known allocation.

Marked ``cuda``: skipped with the reason where torch sees no GPU (tests/conftest.py), the
bf16 case also where the GPU has no native bf16. The TF32 switches the tool turns on are
restored after each test (tests/conftest.py). Run on a GPU machine with
``python3 -m pytest -m cuda tests/tools/test_benchmark_cuda.py``.
No speed target is asserted: only that the tool measures what was put there.
"""
import os
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, 'tools', 'analysis_tools'))

import benchmark  # noqa: E402
from tests.gpu.common import skip_without_native_bf16  # noqa: E402
from tests.tools.test_benchmark_and_flops import (KnownCost, check_ratio_columns,  # noqa: E402
                                                  hold_mib, ratio_table)

pytestmark = pytest.mark.cuda


def spin(cycles: int):
    """``cycles`` of GPU busy-wait (torch.cuda._sleep): GPU time, not host time."""
    def cost(y):
        torch.cuda._sleep(cycles)
        return y
    return cost


def test_cuda_event_timing_sees_a_known_gpu_slowdown():
    """CUDA events must time the GPU work, not the (asynchronous) launch: a model spinning
    3x as many GPU cycles comes out near 3x, in inference and in the training step."""
    args = benchmark.parse_args(['--device', 'cuda', '--size', '32', '--batch', '2',
                                 '--runs', '5', '--warmup', '2', '--no-memory'])
    models = {'twins_mm s': KnownCost(spin(30_000_000)).cuda(),
              'timm s': KnownCost(spin(10_000_000)).cuda()}
    values = benchmark.measure(models, args)
    text = benchmark.ratio_tables([dict(variant='s', values=values, columns={
        'twins_mm s': 'twins_mm', 'timm s': 'timm'})])
    for title in ('inference', 'training step'):
        header, rows = ratio_table(text, title)
        assert check_ratio_columns(header, rows) == 1
        assert 2.4 < float(rows[0]['ours/timm']) < 3.4, rows


def test_cuda_peak_memory_counts_a_known_allocation_and_not_other_models():
    """256 MiB held through backward shows as ~256 MiB more; a 1 GiB tensor of another
    model already on the GPU does not count."""
    x = torch.randn(2, 3, 32, 32, device='cuda')
    other = torch.empty(2 ** 28, device='cuda')  # noqa: F841  (1 GiB, kept alive)
    small = benchmark.cuda_peak_mib(KnownCost().cuda(), x)
    big = benchmark.cuda_peak_mib(KnownCost(hold_mib(256)).cuda(), x)
    assert small < 64, small
    assert abs(big - small - 256) < 16, (small, big)


def test_bf16_and_reduce_overhead_compile_run_on_the_real_backbone(capsys):
    """The preset's settings on a small input: bf16 autocast, twins_mm compiled with CUDA
    graphs beside its eager self; every ratio is the quotient of its columns."""
    skip_without_native_bf16()
    benchmark.main(['--device', 'cuda', '--arch', 'svt-s', '--size', '64', '--batch', '2',
                    '--runs', '3', '--warmup', '3', '--amp', 'bf16', '--compile',
                    '--compile-mode', 'reduce-overhead', '--no-detail', '--no-timm'])
    out = capsys.readouterr().out
    assert 'bf16 autocast' in out and 'TF32 for fp32 matmul/conv on' in out
    for title in ('inference', 'training step', 'training peak memory'):
        header, rows = ratio_table(out, title)
        assert 'twins_mm eager' in header and check_ratio_columns(header, rows) >= 1
