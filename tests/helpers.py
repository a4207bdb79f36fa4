import contextlib

import torch

import twins_mm

VARIANTS = [('TwinsPCPVT', 'small'), ('TwinsPCPVT', 'base'), ('TwinsPCPVT', 'large'),
            ('TwinsSVT', 'small'), ('TwinsSVT', 'base'), ('TwinsSVT', 'large')]


def build_backbone(family, arch, **kwargs):
    return getattr(twins_mm, family)(arch=arch, **kwargs)


def shallow_arch(family, arch, depth=None):
    """The variant's hyper-parameters (widths, heads, MLP ratios, sub-sampling, windows) with
    every stage ``depth`` blocks deep (default: 1 for PCPVT, 2 for SVT, whose blocks alternate
    LSA and GSA). The blocks of a stage run the same code, so depth adds no code path."""
    from twins_mm.models.archs import PCPVT_ARCHS, SVT_ARCHS
    svt = family == 'TwinsSVT'
    arch = dict((SVT_ARCHS if svt else PCPVT_ARCHS)[arch])
    arch['depths'] = [depth or (2 if svt else 1)] * len(arch['depths'])
    return arch


def perturb_norms_and_biases(model, std=0.02):
    """Non-trivial norms and biases everywhere (initialisation leaves them 1 and 0, which
    hides a swapped or dropped affine term): biases ~ N(0, std), other 1-D weights ~ U(0.8,
    1.2)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith('bias'):
                p.normal_(0, std)
            elif p.dim() == 1:
                p.uniform_(0.8, 1.2)
    return model


@contextlib.contextmanager
def metafiles_read_once():
    """mmengine re-reads every metafile of mmdet / mmseg (about 50 YAML files, 0.7 s) each
    time it resolves a ``pkg::`` base; inside this context each file is read once (they do
    not change)."""
    from mmengine.config import utils
    original = utils.load
    cache = {}

    def load_once(path, *args, **kwargs):
        if not (isinstance(path, str) and path.endswith(('.yml', '.yaml'))):
            return original(path, *args, **kwargs)
        if path not in cache:
            cache[path] = original(path, *args, **kwargs)
        return cache[path]

    utils.load = load_once
    try:
        yield
    finally:
        utils.load = original


# --- Process-wide torch settings that a test may change ------------------------------------
# The TF32 switches, cuDNN's autotuner and determinism, deterministic algorithms and the
# number of CPU threads outlive the test that sets them (tools/analysis_tools/benchmark.py sets
# TF32 and the thread count in-process). tests/conftest.py saves them before every test and
# restores them after it.

# torch >= 2.9 keeps the TF32 / matmul-precision state per backend and operator (the
# ``fp32_precision`` attributes) and, beside it, the legacy switches (``allow_tf32``,
# ``set_float32_matmul_precision``), which write both; reading a legacy switch raises when
# the two disagree. Both are saved (a legacy one as None where it cannot be read) and
# restored legacy first, so that the legacy writes leave the per-operator values as saved.
_PRECISION_PARENTS = ('', 'cudnn', 'mkldnn')  # set before their operators
_PRECISION_LEAVES = ('cuda.matmul', 'cudnn.conv', 'cudnn.rnn', 'mkldnn.matmul', 'mkldnn.conv',
                     'mkldnn.rnn')
_LEGACY = {
    'float32_matmul_precision': (torch.get_float32_matmul_precision,
                                 torch.set_float32_matmul_precision),
    'cudnn.allow_tf32': (lambda: torch.backends.cudnn.allow_tf32,
                         lambda v: setattr(torch.backends.cudnn, 'allow_tf32', v)),
    'cuda.matmul.allow_tf32': (lambda: torch.backends.cuda.matmul.allow_tf32,
                               lambda v: setattr(torch.backends.cuda.matmul, 'allow_tf32', v)),
}


def _backend(path):
    obj = torch.backends
    for part in filter(None, path.split('.')):
        obj = getattr(obj, part)
    return obj


def _per_operator_precision() -> bool:
    return hasattr(torch.backends.cudnn, 'conv') and \
        hasattr(torch.backends.cudnn.conv, 'fp32_precision')


def _read_legacy(get):
    try:
        return get()
    except RuntimeError:  # the legacy and per-operator settings disagree
        return None


def global_torch_flags() -> dict:
    b = torch.backends
    flags = dict(
        legacy_precision={name: _read_legacy(get) for name, (get, _) in _LEGACY.items()},
        cudnn_benchmark=b.cudnn.benchmark,
        cudnn_deterministic=b.cudnn.deterministic,
        deterministic_algorithms=(torch.are_deterministic_algorithms_enabled(),
                                  torch.is_deterministic_algorithms_warn_only_enabled()),
        num_threads=torch.get_num_threads(),
    )
    if _per_operator_precision():
        flags['fp32_precision'] = {path: _backend(path).fp32_precision
                                   for path in _PRECISION_PARENTS + _PRECISION_LEAVES}
    return flags


def restore_global_torch_flags(saved: dict) -> None:
    """Sets every flag of ``global_torch_flags()`` back."""
    b = torch.backends
    for name, (_, set_) in _LEGACY.items():
        if saved['legacy_precision'][name] is not None:
            set_(saved['legacy_precision'][name])
    for path in _PRECISION_PARENTS + _PRECISION_LEAVES if 'fp32_precision' in saved else ():
        _backend(path).fp32_precision = saved['fp32_precision'][path]  # parents first
    b.cudnn.benchmark = saved['cudnn_benchmark']
    b.cudnn.deterministic = saved['cudnn_deterministic']
    enabled, warn_only = saved['deterministic_algorithms']
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
    if torch.get_num_threads() != saved['num_threads']:
        torch.set_num_threads(saved['num_threads'])
