"""``torch.compile`` of the backbone's forward (the ``compile=`` flag of the backbones).

Nothing here changes torch: the flag compiles with plain ``torch.compile``, as a user's own
``torch.compile(model)`` or mmengine's ``Runner(compile=...)`` does. What makes every route
work with changing input sizes is in the model code: while Dynamo traces it
(:func:`twins_mm.ops.dispatch.graph_capture`), each op takes its traceable reference, and the
channels-last map a convolution reads, and the query heads of global attention, are
contiguous copies instead of permuted views (``twins_mm.models.twins._nchw`` and
``_split_heads``; docs/compile.md says why).
"""
from typing import Callable

import torch


def compile_forward(forward: Callable, **compile_kwargs) -> Callable:
    """``torch.compile(forward, **compile_kwargs)``."""
    return torch.compile(forward, **compile_kwargs)
