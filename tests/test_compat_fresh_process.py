"""Checkpoint loading in a fresh process, where no mmengine ``HistoryBuffer`` exists yet.

A Runner-trained checkpoint pickles its message hub's ``HistoryBuffer`` objects together with
their statistics methods, stored as ``getattr(HistoryBuffer, 'mean')`` and so on. mmengine
registers those names only when the first ``HistoryBuffer`` is built, so a process that loads
a checkpoint first (tools/test.py, tools/inference.py) must not depend on that table. The
in-process tests of ``tests/test_compat.py`` cannot see this: pytest has built buffers long
before.
"""
import json
import os
import pickletools
import subprocess
import sys
import zipfile

import pytest
import torch

from tests.test_compat import make_runner

LOAD = r"""
import json, sys
import twins_mm
from mmengine.logging import HistoryBuffer
from mmengine.runner.checkpoint import _load_checkpoint
from twins_mm.compat import UntrustedCheckpointError

registered_before = sorted(HistoryBuffer._statistics_methods)
try:
    ckpt = _load_checkpoint(sys.argv[1], map_location='cpu')
except UntrustedCheckpointError as e:
    print(json.dumps(dict(registered_before=registered_before, refused=str(e))))
    sys.exit(0)
buf = ckpt['message_hub']['log_scalars']['train/loss']
print(json.dumps(dict(registered_before=registered_before, refused=None,
                      buffer=type(buf).__name__, loss=float(buf.current()),
                      mean=float(buf.statistics('mean')), iter=ckpt['meta']['iter'])))
"""


def load_in_fresh_process(path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != 'TWINS_MM_TRUSTED_CHECKPOINTS'}
    proc = subprocess.run([sys.executable, '-c', LOAD, str(path)], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def pickled_getattr_lookups(path) -> set:
    """('module Owner', name) of every ``getattr(Owner, name)`` in the checkpoint's pickle.

    Follows the pushes of the pickle program far enough to pair each REDUCE of the global
    ``getattr`` with its argument tuple; memo references (BINGET) are resolved.
    """
    with zipfile.ZipFile(path) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith('/data.pkl')))
    stack, memo, lookups = [], {}, set()
    for op, arg, _ in pickletools.genops(data):
        if op.name == 'GLOBAL':
            stack.append(('global', arg.replace('__builtin__ ', 'builtins ')))
        elif 'UNICODE' in op.name:
            stack.append(('str', arg))
        elif op.name in ('BINPUT', 'LONG_BINPUT', 'PUT'):
            memo[arg] = stack[-1]
        elif op.name == 'MEMOIZE':
            memo[len(memo)] = stack[-1]
        elif op.name in ('BINGET', 'LONG_BINGET', 'GET'):
            stack.append(memo.get(arg, ('?', None)))
        elif op.name == 'TUPLE2':
            stack[-2:] = [('tuple', tuple(stack[-2:]))]
        elif op.name == 'REDUCE':
            func, args = stack[-2:]
            if func == ('global', 'builtins getattr') and args[0] == 'tuple':
                (kind_o, owner), (kind_n, name) = args[1]
                if kind_o == 'global' and kind_n == 'str':
                    lookups.add((owner, name))
            stack[-2:] = [('?', None)]
        else:
            stack.append(('?', None))
    return lookups


@pytest.fixture(scope='module')
def trained_checkpoint(tmp_path_factory):
    work_dir = tmp_path_factory.mktemp('runner')
    make_runner(work_dir, 2, False).train()
    return work_dir / 'iter_2.pth'


def test_runner_checkpoint_pickles_history_buffer_statistics_via_getattr(trained_checkpoint):
    # What the fresh-process test below relies on: without these lookups it would prove nothing.
    lookups = pickled_getattr_lookups(trained_checkpoint)
    owner = 'mmengine.logging.history_buffer HistoryBuffer'
    assert {(owner, m) for m in ('min', 'max', 'current', 'mean')} <= lookups


def test_fresh_process_loads_runner_checkpoint(trained_checkpoint):
    res = load_in_fresh_process(trained_checkpoint)
    assert res['registered_before'] == []  # no HistoryBuffer was built before the load
    assert res['refused'] is None, res['refused']
    assert res['buffer'] == 'HistoryBuffer' and res['iter'] == 2
    assert res['loss'] > 0 and res['mean'] > 0


class SystemCall:
    """Loading this would run a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f'touch {self.marker}', ))


def test_fresh_process_refuses_disallowed_global(tmp_path):
    marker = tmp_path / 'ran'
    path = tmp_path / 'evil.pth'
    torch.save({'state_dict': {'w': torch.ones(1)}, 'meta': {'x': SystemCall(marker)}}, path)
    res = load_in_fresh_process(path)
    assert res['refused'] is not None, 'os.system in a checkpoint was not refused'
    assert 'system' in res['refused'] and str(path) in res['refused']
    assert not marker.exists()
