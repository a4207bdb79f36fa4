"""The GPU tier's skip decisions and the restoring of process-wide torch flags, checked on
any machine (no GPU needed): each decision is given the facts of a machine as arguments.

A CPU-built mmcv imports on a GPU machine and fails only when its ops meet a CUDA tensor;
torch emulates bf16 on GPUs older than Ampere. Those tests must be skipped there, with a
reason that names what is missing, instead of failing.
"""
import pytest
import torch

from tests.conftest import CUDA_SKIP_REASON
from tests.gpu.common import bf16_skip_reason, mmcv_cuda_ops_skip_reason, probe_mmcv_cuda_ops
from tests.helpers import global_torch_flags, restore_global_torch_flags


def test_no_gpu_is_the_tiers_common_reason():
    assert mmcv_cuda_ops_skip_reason(False, '12.1', None) == CUDA_SKIP_REASON
    assert bf16_skip_reason(False, None) == CUDA_SKIP_REASON


def test_cpu_built_mmcv_on_a_gpu_machine():
    reason = mmcv_cuda_ops_skip_reason(True, 'not available', None, mmcv_version='2.1.0')
    assert reason is not None
    assert 'mmcv 2.1.0 was built without CUDA ops' in reason
    assert "get_compiling_cuda_version() = 'not available'" in reason


def test_mmcv_ops_that_fail_on_a_cuda_tensor():
    error = RuntimeError('nms_impl: implementation for device cuda:0 not found.')
    reason = mmcv_cuda_ops_skip_reason(True, '12.1', error, mmcv_version='2.1.0')
    assert reason is not None
    assert 'CUDA 12.1' in reason and 'mmcv.ops.nms raised RuntimeError' in reason
    assert 'implementation for device cuda:0 not found' in reason


def test_mmcv_ops_that_do_not_import():
    reason = mmcv_cuda_ops_skip_reason(True, None, ImportError('libcudart.so.12: cannot open'))
    assert reason is not None
    assert 'mmcv.ops does not import (ImportError: libcudart.so.12' in reason


def test_mmcv_with_working_cuda_ops_runs():
    assert mmcv_cuda_ops_skip_reason(True, '12.1', None, mmcv_version='2.1.0') is None


@pytest.mark.parametrize('capability,runs', [((7, 0), False), ((7, 5), False), ((8, 0), True),
                                             ((8, 9), True), ((9, 0), True)])
def test_bf16_needs_compute_capability_8(capability, runs):
    reason = bf16_skip_reason(True, capability)
    if runs:
        assert reason is None
    else:
        assert reason is not None and f'compute capability {capability}' in reason
        assert 'no native bfloat16' in reason


def test_probe_of_this_machine():
    """A torch without CUDA cannot have an mmcv with CUDA ops: the probe must say so."""
    cuda, compiled, error, version = probe_mmcv_cuda_ops()
    assert cuda == torch.cuda.is_available()
    if torch.version.cuda is None:
        assert not cuda
        assert compiled == 'not available', (compiled, error)
        assert error is None and version != '?'
        assert mmcv_cuda_ops_skip_reason(cuda, compiled, error, version) == CUDA_SKIP_REASON


def test_global_torch_flags_are_restored():
    """What tools/analysis_tools/benchmark.py and the CUDA parity tests set in-process (the
    legacy TF32 switches, the matmul precision, the thread count) and the rest of the saved
    state, all changed, come back exactly, and the legacy switches read as before."""
    b = torch.backends
    saved = global_torch_flags()
    legacy = (b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32, torch.get_float32_matmul_precision())
    torch.set_float32_matmul_precision('medium')
    b.cuda.matmul.allow_tf32 = not legacy[0]
    b.cudnn.allow_tf32 = not legacy[1]
    b.cudnn.benchmark = not saved['cudnn_benchmark']
    b.cudnn.deterministic = not saved['cudnn_deterministic']
    torch.use_deterministic_algorithms(not saved['deterministic_algorithms'][0], warn_only=True)
    torch.set_num_threads(1 if saved['num_threads'] != 1 else 2)
    changed = global_torch_flags()
    assert all(changed[k] != saved[k] for k in saved), (changed, saved)
    restore_global_torch_flags(saved)
    assert global_torch_flags() == saved
    assert (b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32,
            torch.get_float32_matmul_precision()) == legacy
