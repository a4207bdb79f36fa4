"""``torch.compile`` of the backbone's forward, with a workaround for a torch 2.13 bug.

Inductor lowers a view whose strides are symbolic (a permuted ``(B, H, W, C)`` map once H
and W are dynamic, as multi-scale training makes them) by ordering its strides with plain
sympy comparisons, without the shape environment (``torch/_inductor/graph.py``,
``GraphLowering.run_node`` -> ``ir.get_stride_order(strides)``). A comparison such as
``16*((s0//4)) < 16`` has no truth value there, and compilation fails with
``InductorError: TypeError: cannot determine truth value of Relational``. The same
comparison through the shape environment (what inductor's other callers pass) is decided
and guarded. Minimal reproduction without twins_mm: docs/compile.md.

:func:`compile_forward` retries exactly that stride ordering with the graph's shape
environment while the compiled forward runs, and changes nothing else.
"""
import contextlib
import functools
from typing import Callable

import torch


@contextlib.contextmanager
def symbolic_stride_order():
    from torch._inductor import ir
    from torch._inductor.virtualized import V

    original = ir.get_stride_order

    @functools.wraps(original)
    def get_stride_order(seq, shape_env=None):
        if shape_env is not None:
            return original(seq, shape_env)
        try:
            return original(seq)
        except TypeError:  # a symbolic comparison sympy alone cannot decide
            return original(seq, V.graph.sizevars.shape_env)

    ir.get_stride_order = get_stride_order
    try:
        yield
    finally:
        ir.get_stride_order = original


def compile_forward(forward: Callable, **compile_kwargs) -> Callable:
    """``torch.compile(forward, **compile_kwargs)``, compiled under the workaround above."""
    compiled = torch.compile(forward, **compile_kwargs)

    @functools.wraps(forward)
    def run(*args, **kwargs):
        with symbolic_stride_order():
            return compiled(*args, **kwargs)

    return run
