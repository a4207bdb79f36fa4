"""Our tools speak first: no known upstream deprecation noise before their own message.

mmengine 0.10 reloads ``pkg_resources`` to resolve the ``mmdet::`` / ``mmseg::`` bases of our
configs, and every reload warns ``pkg_resources is deprecated as an API``; without a filter
``tools/train.py`` printed five such warnings (with their source lines) before its one-line
error. The filter lives in the tools only: ``import twins_mm`` leaves the user's warning
filters alone.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(args, cwd):
    """The tool as a user runs it: output as it appears on the terminal (merged, unbuffered),
    no warning options from this process."""
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONWARNINGS'}
    env['PYTHONUNBUFFERED'] = '1'
    return subprocess.run([sys.executable, *[str(a) for a in args]], cwd=cwd, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=600)


@pytest.mark.parametrize('tool,args,message', [
    ('train.py', ['configs/retinanet_twins_pcpvt_s_1x.py'], 'annotations'),
    ('test.py', ['configs/fpn_twins_svt_s_80k.py', 'absent.pth'], 'absent.pth'),
    ('convert_checkpoint.py', ['absent.pth', 'out.pth'], 'absent.pth'),
    ('inference.py', ['configs/fpn_twins_svt_s_80k.py', 'absent.pth', 'x.png', '--out', 'o.png'],
     'absent.pth'),
])
def test_first_line_is_our_own_error(tmp_path, tool, args, message):
    # cwd without data/coco or data/ade: the configs' data roots are missing
    args = [ROOT / a if a.startswith('configs/') else a for a in args]
    proc = run([ROOT / 'tools' / tool, *args], cwd=tmp_path)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert proc.returncode != 0
    assert lines and lines[0].startswith('error:') and message in lines[0], proc.stdout[-3000:]
    assert 'Warning' not in proc.stdout and 'pkg_resources' not in proc.stdout, proc.stdout


def test_import_twins_mm_leaves_warning_filters_alone(tmp_path):
    # torch, numpy, sympy, ... add filters of their own when imported: import them first.
    script = ('import warnings\n'
              'import torch, numpy, mmengine.runner, mmcv.ops, mmseg.apis, mmdet.apis\n'
              'before = list(warnings.filters)\n'
              'import twins_mm, twins_mm.launch, twins_mm.checkpoints\n'
              'assert list(warnings.filters) == before, set(warnings.filters) - set(before)\n'
              'from twins_mm.launch import silence_upstream_deprecation_noise\n'
              'silence_upstream_deprecation_noise()\n'
              'assert list(warnings.filters) != before\n')
    proc = run(['-c', script], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:]


def test_users_own_code_still_sees_the_warning(tmp_path):
    """Only our tools filter: a user's script reading the same config still gets it."""
    config = ROOT / 'configs' / 'retinanet_twins_pcpvt_s_1x.py'
    script = ('import warnings, twins_mm\n'
              'from mmengine.config import Config\n'
              'with warnings.catch_warnings(record=True) as caught:\n'
              '    warnings.simplefilter("default")\n'
              f'    Config.fromfile({str(config)!r})\n'
              'assert any("pkg_resources" in str(w.message) for w in caught), caught\n')
    proc = run(['-c', script], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:]
