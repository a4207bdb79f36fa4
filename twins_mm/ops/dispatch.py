"""Which implementation of an op runs: the one place that decides.

Every fast path in :mod:`twins_mm.ops` has a plain reference beside it; :func:`select_path`
looks at the input and the calling context and names the path the op takes:

========================  ====================================================================
``Path.GRAPH``            torch.compile / torch.export / ONNX export / jit.trace see the model:
                          the plain, traceable reference code (no custom autograd functions,
                          no data-dependent shapes, no private ops).
``Path.TRAINING``         eager with autograd recording, any device and dtype, with or without
                          autocast: custom autograd functions that save or copy less.
``Path.CPU_INFERENCE``    eager CPU inference in fp32 without autocast: oneDNN kernels that
                          fuse the bias, GELU or residual add into the matrix multiply.
``Path.EAGER``            everything else (CUDA inference, autocast inference, other dtypes):
                          the reference code, which cuBLAS / SDPA already serve well.
========================  ====================================================================
"""
import enum
from typing import Optional

import torch


class Path(enum.Enum):
    GRAPH = 'graph'
    TRAINING = 'training'
    CPU_INFERENCE = 'cpu_inference'
    EAGER = 'eager'


MKLDNN_LINEAR = (getattr(torch.ops.mkldnn, '_linear_pointwise', None)
                 if torch.backends.mkldnn.is_available() else None)


def graph_capture() -> bool:
    """True while torch.compile / torch.export / ONNX export / jit.trace see the model."""
    return (torch.compiler.is_compiling() or torch.compiler.is_exporting()
            or torch.onnx.is_in_onnx_export() or torch.jit.is_tracing())


def exporting() -> bool:
    """True while a graph is exported for other sizes than the traced one (ONNX, export)."""
    return torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export()


def autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype autocast computes ``x``'s matrix products in, or None outside autocast."""
    device = x.device.type
    if x.dtype == torch.float32 and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return None


def select_path(x: torch.Tensor) -> Path:
    # Graph capture first: tracers must not see the eager-only checks after it.
    if graph_capture():
        return Path.GRAPH
    if torch.is_grad_enabled():
        return Path.TRAINING
    if (MKLDNN_LINEAR is not None and x.device.type == 'cpu' and x.dtype == torch.float32
            and autocast_dtype(x) is None):
        return Path.CPU_INFERENCE
    return Path.EAGER
