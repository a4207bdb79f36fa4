"""Safe checkpoint loading for mmengine 0.10.7 under torch >= 2.6.

torch >= 2.6 unpickles checkpoints with ``weights_only=True``. mmengine 0.10.7 checkpoints
hold a few non-tensor objects (``HistoryBuffer`` in the message hub, numpy arrays and
scalars in ``meta``), so ``resume`` and ``load_from`` fail. Instead of switching
``weights_only`` off (which would run arbitrary pickled code), the known-safe types are
allow-listed, and mmengine's checkpoint loaders are wrapped so that any other pickled
object is refused with a message that names it and says how to opt in for a trusted file.
Files behind ``http(s)://`` URLs (what the configs' ``init_cfg`` name) get the same
treatment: mmengine reads them with ``torch.hub.load_state_dict_from_url``, which would
unpickle everything (its ``weights_only`` defaults to False). Importing ``twins_mm``
installs this.
"""
import argparse
import functools
import inspect
import os
import os.path as osp
import pickle
import re
from typing import List, Set
from urllib.parse import urlparse

import numpy as np
import torch
import mmengine.runner.checkpoint as mmengine_checkpoint
from mmengine.logging.history_buffer import HistoryBuffer
from mmengine.runner.checkpoint import CheckpointLoader

TRUST_ENV = 'TWINS_MM_TRUSTED_CHECKPOINTS'
_trusted_paths: Set[str] = set()
_installed = False


class UntrustedCheckpointError(pickle.UnpicklingError):
    """A checkpoint holds a pickled object outside the allow-list."""


def _numpy_globals() -> list:
    try:  # numpy >= 2
        from numpy._core import multiarray
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray
    safe = [multiarray._reconstruct, multiarray.scalar, np.ndarray, np.dtype]
    # numpy >= 1.25 pickles dtypes through their classes (np.dtypes.Float64DType, ...).
    dtypes = getattr(np, 'dtypes', None)
    if dtypes is not None:
        safe += [getattr(dtypes, name) for name in dir(dtypes)
                 if name.endswith('DType') and isinstance(getattr(dtypes, name), type)]
    return safe


def _history_buffer_getattr(obj, name):
    """Stands in for ``builtins.getattr`` while unpickling.

    Pickle stores ``HistoryBuffer``'s statistics methods (``HistoryBuffer.min``, ...) as
    ``getattr(HistoryBuffer, 'min')``. A real ``getattr`` would let a file reach any
    attribute of any object, so only those lookups are answered.
    """
    # mmengine fills _statistics_methods only when the first HistoryBuffer is created.
    if obj is HistoryBuffer and name in ({'min', 'max', 'current', 'mean'}
                                         | set(HistoryBuffer._statistics_methods)):
        return getattr(HistoryBuffer, name)
    owner = getattr(obj, '__qualname__', type(obj).__qualname__)
    raise pickle.UnpicklingError(
        f'Unsupported global: GLOBAL {getattr(obj, "__module__", "?")}.{owner}.{name} '
        f'(reached through getattr)')


def safe_globals() -> list:
    """The objects, beyond torch's own, that may appear in an mmengine checkpoint.

    ``argparse.Namespace`` is what the official Twins / DeiT ``main.py`` stores as ``args``;
    restoring it only sets attributes.
    """
    return [HistoryBuffer, argparse.Namespace, (_history_buffer_getattr, 'builtins.getattr')
            ] + _numpy_globals()


class TrustedCheckpoint:
    """The opt-in made by :func:`trust_checkpoint`; :meth:`revoke` (or leaving the ``with``
    block) withdraws it, unless the file was already trusted before."""

    def __init__(self, path: str):
        self.path = osp.realpath(osp.expanduser(path))
        self._added = self.path not in _trusted_paths
        _trusted_paths.add(self.path)

    def revoke(self) -> None:
        if self._added:
            _trusted_paths.discard(self.path)
            self._added = False

    def __enter__(self) -> 'TrustedCheckpoint':
        return self

    def __exit__(self, *exc) -> None:
        self.revoke()


def trust_checkpoint(path: str) -> TrustedCheckpoint:
    """Opt in to full unpickling of one checkpoint file that you trust.

    The trust lasts for the process, or only for a ``with`` block::

        with trust_checkpoint('my.pth'):
            ...  # loads of my.pth may unpickle any object
    """
    return TrustedCheckpoint(path)


def trusted_paths() -> Set[str]:
    """The files trusted through :func:`trust_checkpoint` (not the environment variable)."""
    return set(_trusted_paths)


def _downloaded_copy(url: str) -> str:
    """Where torch.hub (and so mmengine) keeps the file of an http(s) URL."""
    return osp.join(torch.hub.get_dir(), 'checkpoints', osp.basename(urlparse(url).path))


def _local_path(filename: str) -> str:
    if urlparse(filename).scheme in ('http', 'https'):
        return _downloaded_copy(filename)
    return osp.expanduser(filename)


def _is_trusted(filename: str) -> bool:
    if not isinstance(filename, str):
        return False
    if '://' in filename:
        if urlparse(filename).scheme not in ('http', 'https'):
            return False
        filename = _downloaded_copy(filename)
    real = osp.realpath(osp.expanduser(filename))
    env = [p for p in os.environ.get(TRUST_ENV, '').split(os.pathsep) if p]
    trusted = _trusted_paths | {osp.realpath(osp.expanduser(p)) for p in env}
    return any(real == t or real.startswith(t.rstrip(os.sep) + os.sep) for t in trusted)


def _unsupported_globals(filename: str, error: Exception) -> List[str]:
    names = re.findall(r'GLOBAL ([\w.]+)', str(error))
    if not names and isinstance(filename, str) and osp.isfile(filename):
        try:
            allowed = {g[1] if isinstance(g, tuple) else f'{g.__module__}.{g.__qualname__}'
                       for g in safe_globals()}
            names = [n for n in torch.serialization.get_unsafe_globals_in_checkpoint(filename)
                     if n not in allowed]
        except Exception:  # not a zip checkpoint: keep the message without names
            pass
    return sorted(set(names))


def _refusal(filename: str, error: Exception) -> UntrustedCheckpointError:
    names = _unsupported_globals(filename, error) or ['<unknown>']
    where = ''
    if urlparse(filename).scheme in ('http', 'https'):
        where = f' (for a URL, trust the downloaded copy {_downloaded_copy(filename)})'
    return UntrustedCheckpointError(
        f'Refused to load {filename}: it contains pickled object(s) {", ".join(names)} that '
        f'are not on twins_mm\'s allow-list of safe checkpoint types (tensors, mmengine '
        f'HistoryBuffer, numpy arrays/scalars). Unpickling them could run arbitrary code. '
        f'If you trust this file, either allow-list the class with '
        f'torch.serialization.add_safe_globals([...]) before loading, or opt in for this '
        f'file with twins_mm.compat.trust_checkpoint(path) or the environment variable '
        f'{TRUST_ENV}=/path/to/file (files or folders, separated by "{os.pathsep}"){where}.')


def _guard(loader):

    @functools.wraps(loader)
    def safe_loader(filename, map_location=None, *args, **kwargs):
        try:
            return loader(filename, map_location, *args, **kwargs)
        except pickle.UnpicklingError as error:
            if isinstance(error, UntrustedCheckpointError):
                raise
            if _is_trusted(filename):
                return torch.load(_local_path(filename), map_location=map_location,
                                  weights_only=False)
            raise _refusal(filename, error) from None

    safe_loader.__twins_mm_guarded__ = True
    return safe_loader


def _weights_only_load_url(load_url):
    """``load_url`` (torch.hub's ``load_state_dict_from_url``) with ``weights_only=True``."""

    @functools.wraps(load_url)
    def safe_load_url(url, *args, **kwargs):
        kwargs['weights_only'] = True
        return load_url(url, *args, **kwargs)

    safe_load_url.__twins_mm_guarded__ = True
    return safe_load_url


def install() -> None:
    """Allow-lists the safe globals and guards every mmengine checkpoint scheme."""
    global _installed
    if _installed:
        return
    torch.serialization.add_safe_globals(safe_globals())
    # mmengine's http(s), modelzoo:// and open-mmlab:// loaders all download through this one
    # module-level function (mmengine.runner.checkpoint.load_url).
    load_url = mmengine_checkpoint.load_url
    if not getattr(load_url, '__twins_mm_guarded__', False) and \
            'weights_only' in inspect.signature(load_url).parameters:
        mmengine_checkpoint.load_url = _weights_only_load_url(load_url)
    for prefix, loader in list(CheckpointLoader._schemes.items()):
        if not getattr(loader, '__twins_mm_guarded__', False):
            CheckpointLoader.register_scheme(prefix, _guard(loader), force=True)
    _installed = True
