"""Weights in timm's safetensors files, and files that are not checkpoints at all.

timm publishes the Twins ImageNet weights as ``model.safetensors`` in the official key layout
(classification head included). torch 2.13's ``torch.load`` happens to read such files, older
torch does not, so every test here also runs with that support blocked: the file must be read
by the safetensors library. A file that is no readable checkpoint must get an error that names
the file and says what is wrong with it, through ``init_cfg`` and through
``tools/convert_checkpoint.py``.
"""
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import twins_mm
from twins_mm.checkpoints import CheckpointLayoutError, load_pretrained
from twins_mm.testing import official_state_dict

ROOT = Path(__file__).resolve().parents[1]
CONVERT = ROOT / 'tools' / 'convert_checkpoint.py'

# Runs tools/convert_checkpoint.py with torch.load unable to read safetensors files, as on a
# torch that predates that support. argv: src dst.
CONVERT_WITHOUT_TORCH_SAFETENSORS = r"""
import os, runpy, sys, torch
real_load = torch.load
def load(f, *args, **kwargs):
    if isinstance(f, (str, os.PathLike)):
        with open(f, 'rb') as h:
            if h.read(9)[8:9] == b'{':
                raise RuntimeError('torch.load was asked to read a safetensors file')
    return real_load(f, *args, **kwargs)
torch.load = load
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
"""


def timm_safetensors(path, family='TwinsSVT', arch='small'):
    """A file as timm writes it: official keys, head and final norm included."""
    sd = official_state_dict(family, arch)
    save_file(dict(sd), str(path), metadata={'format': 'pt'})
    return sd


@pytest.fixture
def no_torch_safetensors(monkeypatch):
    """torch.load refuses safetensors files (torch < 2.13 cannot read them)."""
    real_load = torch.load
    calls = []

    def load(f, *args, **kwargs):
        calls.append(f)
        with open(f, 'rb') as h:
            if h.read(9)[8:9] == b'{':
                raise RuntimeError('torch.load was asked to read a safetensors file')
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, 'load', load)
    return calls


def assert_holds(model, sd):
    state = model.state_dict()
    for key, value in sd.items():
        if key.startswith(('head.', 'norm.')):
            assert key not in state
            continue
        torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize('family', ['TwinsSVT', 'TwinsPCPVT'])
@pytest.mark.parametrize('name', ['model.safetensors', 'weights.bin'])
def test_timm_safetensors_through_init_cfg(tmp_path, no_torch_safetensors, family, name):
    """The file loads through init_cfg, by content (a safetensors file need not be named so)."""
    path = tmp_path / name
    sd = timm_safetensors(path, family)
    model = getattr(twins_mm, family)('small', init_cfg=dict(type='Pretrained',
                                                             checkpoint=str(path)))
    model.init_weights()
    assert_holds(model, sd)
    assert no_torch_safetensors == []  # read by the safetensors library, not torch.load


def test_safetensors_variant_mismatch_is_named(tmp_path, no_torch_safetensors):
    path = tmp_path / 'model.safetensors'
    timm_safetensors(path, 'TwinsSVT', 'base')
    with pytest.raises(CheckpointLayoutError, match=r'model is TwinsSVT-small.*TwinsSVT-base'):
        load_pretrained(twins_mm.TwinsSVT('small'), str(path))


def test_safetensors_url_is_downloaded_then_read(tmp_path, monkeypatch, no_torch_safetensors):
    """https://huggingface.co/timm/.../model.safetensors: fetched into torch's hub cache."""
    src = tmp_path / 'served.safetensors'
    sd = timm_safetensors(src)
    fetched = []

    def download(url, dst, *args, **kwargs):
        fetched.append(url)
        Path(dst).write_bytes(src.read_bytes())

    monkeypatch.setattr(torch.hub, 'download_url_to_file', download)
    monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(tmp_path / 'hub'))
    url = 'https://huggingface.co/timm/twins_svt_small.in1k/resolve/main/model.safetensors'
    model = twins_mm.TwinsSVT('small')
    load_pretrained(model, url)
    assert fetched == [url]
    assert_holds(model, sd)
    load_pretrained(twins_mm.TwinsSVT('small'), url)  # cached: not fetched again
    assert fetched == [url]


def test_convert_tool_reads_safetensors_without_torch_support(tmp_path):
    src = tmp_path / 'model.safetensors'
    sd = timm_safetensors(src)
    dst = tmp_path / 'converted.pth'
    proc = subprocess.run([sys.executable, '-c', CONVERT_WITHOUT_TORCH_SAFETENSORS, str(CONVERT),
                           str(src), str(dst)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = torch.load(dst)
    assert out['meta']['source_layout'] == 'official'
    assert sorted(out['meta']['dropped']) == ['head.bias', 'head.weight', 'norm.bias',
                                              'norm.weight']
    model = twins_mm.TwinsSVT('small')
    load_pretrained(model, str(dst))
    assert_holds(model, sd)


# --- files that are no readable checkpoint ------------------------------------------------

def truncated_zip(tmp_path):
    whole = tmp_path / 'whole.pth'
    torch.save(official_state_dict('TwinsPCPVT', 'small'), whole)
    data = whole.read_bytes()
    path = tmp_path / 'truncated.pth'
    path.write_bytes(data[:len(data) // 2])
    assert not zipfile.is_zipfile(path)
    return path


def truncated_safetensors(tmp_path):
    whole = tmp_path / 'whole.safetensors'
    timm_safetensors(whole)
    data = whole.read_bytes()
    path = tmp_path / 'truncated.safetensors'
    path.write_bytes(data[:len(data) // 2])
    return path


def empty_file(tmp_path):
    path = tmp_path / 'empty.pth'
    path.write_bytes(b'')
    return path


def text_file(tmp_path):
    path = tmp_path / 'notes.pth'
    path.write_text('epoch 12: loss 0.31\n')
    return path


def lfs_pointer(tmp_path):
    path = tmp_path / 'alt_gvt_small.pth'
    path.write_text('version https://git-lfs.github.com/spec/v1\n'
                    'oid sha256:4d7a2f0c\nsize 96000000\n')
    return path


# (file maker, what the error must say about it)
BAD_FILES = [
    (truncated_zip, r'truncated or damaged'),
    (truncated_safetensors, r'not a readable safetensors file'),
    (empty_file, r'empty \(0 bytes\)'),
    (text_file, r'not a checkpoint'),
    (lfs_pointer, r'Git LFS pointer'),
]


@pytest.mark.parametrize('make,problem', BAD_FILES, ids=[m.__name__ for m, _ in BAD_FILES])
def test_unreadable_file_through_init_cfg_is_named(tmp_path, make, problem):
    path = make(tmp_path)
    model = twins_mm.TwinsPCPVT('small', init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    with pytest.raises(CheckpointLayoutError) as err:
        model.init_weights()
    assert str(path) in str(err.value)
    assert err.match(problem)


@pytest.mark.parametrize('make,problem', BAD_FILES + [(lambda p: p / 'absent.pth', 'does not exist')],
                         ids=[m.__name__ for m, _ in BAD_FILES] + ['missing'])
def test_unreadable_file_through_convert_tool_is_named(tmp_path, make, problem):
    import re
    path = make(tmp_path)
    proc = subprocess.run([sys.executable, str(CONVERT), str(path), str(tmp_path / 'out.pth')],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert str(path) in last and re.search(problem, last), last
    assert not (tmp_path / 'out.pth').exists()


def test_missing_file_through_init_cfg_is_named(tmp_path):
    path = tmp_path / 'absent.pth'
    model = twins_mm.TwinsSVT('small', init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    with pytest.raises(FileNotFoundError, match=str(path)):
        model.init_weights()
