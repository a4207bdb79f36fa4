import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import twins_mm
from twins_mm import compat
from twins_mm.checkpoints import (CheckpointLayoutError, convert_to_twins_mm, detect_layout,
                                  load_pretrained)
from twins_mm.testing import official_state_dict

from tests.helpers import VARIANTS, build_backbone

ROOT = Path(__file__).resolve().parents[1]


class Payload:
    """An arbitrary pickled object: unpickling it calls os.getcwd."""

    def __reduce__(self):
        return (os.getcwd, ())


def test_factory_matches_reference_key_counts():
    # Reference section 2.1: PCPVT-S 304 keys, SVT-S 290 (300 / 286 without head and norm).
    assert len(official_state_dict('TwinsPCPVT', 'small')) == 304
    assert len(official_state_dict('TwinsSVT', 'small')) == 290
    sd = official_state_dict('TwinsPCPVT', 'small')
    assert sd['blocks.0.0.attn.sr.weight'].shape == (64, 64, 8, 8)
    assert sd['blocks.3.1.attn.kv.weight'].shape == (1024, 512)
    assert 'blocks.3.1.attn.sr.weight' not in sd
    assert official_state_dict('TwinsSVT', 'small')['blocks.0.0.attn.qkv.weight'].shape == (192, 64)


def copy_tensor_by_tensor(model, sd):
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in sd.items():
            if key.startswith(('head.', 'norm.')):
                continue
            params[key].copy_(value)
    return model


# Every variant as a raw state dict; the 'model' / 'state_dict' containers on two of them.
@pytest.mark.parametrize('family,arch,wrapper', [(f, a, None) for f, a in VARIANTS] + [
    ('TwinsPCPVT', 'small', 'model'), ('TwinsSVT', 'small', 'state_dict')])
def test_official_layout_loads_exactly(tmp_path, family, arch, wrapper):
    sd = official_state_dict(family, arch)
    path = tmp_path / 'official.pth'
    torch.save({wrapper: sd} if wrapper else sd, path)
    loaded = build_backbone(family, arch, init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    loaded.init_weights()
    reference = copy_tensor_by_tensor(build_backbone(family, arch), sd)
    with torch.no_grad():
        # norm_list is the only part not in the file: give both models the same values.
        for a, b in zip(loaded.norm_list.parameters(), reference.norm_list.parameters()):
            b.copy_(a)
        x = torch.randn(1, 3, 64, 96)
        for a, b in zip(loaded.eval()(x), reference.eval()(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    state, info = convert_to_twins_mm(torch.load(path))
    model_keys = set(loaded.state_dict())
    assert set(state) - model_keys == set()
    missing = model_keys - set(state)
    assert all(k.startswith('norm_list.') for k in missing)
    assert bool(missing) == (family == 'TwinsSVT')
    assert sorted(info['dropped']) == ['head.bias', 'head.weight', 'norm.bias', 'norm.weight']
    assert info['arch'] == arch and info['family'] == family


def test_stage_norms_reported_once_as_new(tmp_path):
    torch.save(official_state_dict('TwinsSVT', 'small'), tmp_path / 'a.pth')
    info = load_pretrained(twins_mm.TwinsSVT('small'), str(tmp_path / 'a.pth'))
    assert info['newly_initialised'] == [f'norm_list.{i}' for i in range(4)]
    info = load_pretrained(twins_mm.TwinsPCPVT('small'),
                           official_state_dict('TwinsPCPVT', 'small'))
    assert info['newly_initialised'] == []


def test_detector_checkpoint_with_backbone_prefix_and_module():
    sd = official_state_dict('TwinsSVT', 'small', num_classes=0, with_stage_norms=True)
    wrapped = {'state_dict': {**{f'module.backbone.{k}': v for k, v in sd.items()},
                              'module.neck.conv.weight': torch.zeros(1)},
               'meta': {'epoch': 3}}
    model = twins_mm.TwinsSVT('small')
    info = load_pretrained(model, wrapped)
    assert info['newly_initialised'] == []
    torch.testing.assert_close(model.norm_list[2].weight, sd['norm_list.2.weight'])


def test_wrong_variant_is_named(tmp_path):
    with pytest.raises(CheckpointLayoutError,
                       match=r'model is TwinsSVT-small.*holds TwinsSVT-base'):
        load_pretrained(twins_mm.TwinsSVT('small'), official_state_dict('TwinsSVT', 'base'))
    with pytest.raises(CheckpointLayoutError, match=r'model is TwinsPCPVT-small.*TwinsSVT-small'):
        load_pretrained(twins_mm.TwinsPCPVT('small'), official_state_dict('TwinsSVT', 'small'))


def test_shape_mismatch_and_unknown_layout_are_named():
    sd = official_state_dict('TwinsPCPVT', 'small')
    sd['blocks.1.0.mlp.fc1.weight'] = torch.zeros(7, 128)
    with pytest.raises(CheckpointLayoutError,
                       match=r'blocks\.1\.0\.mlp\.fc1\.weight: model \(1024, 128\), checkpoint \(7, 128\)'):
        load_pretrained(twins_mm.TwinsPCPVT('small'), sd)
    with pytest.raises(CheckpointLayoutError, match='Unknown checkpoint layout.*conv1.weight'):
        load_pretrained(twins_mm.TwinsPCPVT('small'), {'conv1.weight': torch.zeros(1)})
    with pytest.raises(CheckpointLayoutError, match='mmpretrain'):
        detect_layout({'stages.0.0.attn.q.weight': torch.zeros(1)})
    incomplete = official_state_dict('TwinsPCPVT', 'small')
    del incomplete['blocks.2.3.attn.q.bias']
    with pytest.raises(CheckpointLayoutError, match=r'missing keys: blocks\.2\.3\.attn\.q\.bias'):
        load_pretrained(twins_mm.TwinsPCPVT('small'), incomplete)


def test_missing_file_is_clear():
    model = twins_mm.TwinsPCPVT('small', init_cfg=dict(type='Pretrained',
                                                       checkpoint='/nonexistent/x.pth'))
    with pytest.raises(FileNotFoundError, match='/nonexistent/x.pth'):
        model.init_weights()


def test_convert_checkpoint_tool_roundtrip(tmp_path):
    src = tmp_path / 'alt_gvt_small.pth'
    torch.save({'model': official_state_dict('TwinsSVT', 'small')}, src)
    dst = tmp_path / 'converted.pth'
    subprocess.run([sys.executable, str(ROOT / 'tools' / 'convert_checkpoint.py'), str(src),
                    str(dst)], check=True, capture_output=True, text=True)
    out = torch.load(dst)
    assert not any(k.startswith(('head.', 'norm.')) for k in out['state_dict'])
    model = twins_mm.TwinsSVT('small')
    info = load_pretrained(model, str(dst))
    assert info['layout'] == 'official' and info['dropped'] == []
    bad = subprocess.run([sys.executable, str(ROOT / 'tools' / 'convert_checkpoint.py'),
                          str(tmp_path / 'missing.pth'), str(dst)], capture_output=True, text=True)
    assert bad.returncode != 0 and 'missing.pth' in bad.stderr
    assert 'Traceback' not in bad.stderr


def official_to_mmseg_release(sd, family):
    """mmseg's ``twins2mmseg`` renames, written from the reference table (section 2.2).

    Like the released mmseg pretrain files, ``head.*`` is dropped and ``norm.*`` kept.
    """
    out = {}
    for key, value in sd.items():
        if key.startswith('head.'):
            continue
        parts = key.split('.')
        if key.startswith('patch_embeds.'):
            new = key.replace('.proj.', '.projection.')
        elif key.startswith('pos_block.'):
            new = f'position_encodings.{parts[1]}.proj.{parts[-1]}'
        elif key.startswith('blocks.'):
            i, j = int(parts[1]), int(parts[2])
            lsa = family == 'TwinsSVT' and j % 2 == 0
            rest = '.'.join(parts[3:])
            prefix = f'layers.{i}.{j}'
            if rest.startswith('attn.q.'):
                kind = parts[-1]
                out[f'{prefix}.attn.attn.in_proj_{kind}'] = torch.cat(
                    [value, sd[f'blocks.{i}.{j}.attn.kv.{kind}']])
                continue
            if rest.startswith('attn.kv.'):
                continue
            if rest.startswith('attn.proj.') and not lsa:
                rest = rest.replace('attn.proj.', 'attn.attn.out_proj.')
            rest = rest.replace('mlp.fc1.', 'ffn.layers.0.0.').replace('mlp.fc2.', 'ffn.layers.1.')
            new = f'{prefix}.{rest}'
        else:
            new = key
        out[new] = value
    return out


@pytest.mark.parametrize('family', ['TwinsPCPVT', 'TwinsSVT'])
def test_mmseg_release_layout_equals_official(tmp_path, family):
    sd = official_state_dict(family, 'small')
    path = tmp_path / 'mmseg_pretrain.pth'
    torch.save({'state_dict': official_to_mmseg_release(sd, family)}, path)
    from_mmseg, from_official = build_backbone(family, 'small'), build_backbone(family, 'small')
    info = load_pretrained(from_mmseg, str(path))
    load_pretrained(from_official, sd)
    assert info['layout'] == 'mmseg'
    assert sorted(info['dropped']) == ['norm.bias', 'norm.weight']
    official = from_official.state_dict()
    for key, value in from_mmseg.state_dict().items():
        if not key.startswith('norm_list.'):
            assert torch.equal(value, official[key]), key


def test_pretrained_without_checkpoint_is_clear():
    model = twins_mm.TwinsSVT('small', init_cfg=dict(type='Pretrained', checkpoint=None))
    with pytest.raises(ValueError, match='needs a checkpoint path or URL'):
        model.init_weights()


# ----------------------------------------------------------------------------- prefix,
# legacy files, non-dict files, URLs
def test_init_cfg_prefix_takes_that_sub_tree(tmp_path):
    """``init_cfg=dict(..., prefix='student.')`` loads the keys under that prefix only (e.g.
    one of two models saved in one file); a prefix that matches nothing is named."""
    teacher = official_state_dict('TwinsSVT', 'small', num_classes=0, seed=1)
    student = official_state_dict('TwinsSVT', 'small', num_classes=0, seed=2)
    path = str(tmp_path / 'distill.pth')
    torch.save({'state_dict': {**{f'teacher.{k}': v for k, v in teacher.items()},
                               **{f'student.{k}': v for k, v in student.items()}}}, path)
    model = twins_mm.TwinsSVT('small', init_cfg=dict(type='Pretrained', checkpoint=path,
                                                     prefix='student.'))
    model.init_weights()
    for key, value in student.items():
        assert torch.equal(model.state_dict()[key], value), key
    missing = twins_mm.TwinsSVT('small', init_cfg=dict(type='Pretrained', checkpoint=path,
                                                       prefix='ema.'))
    with pytest.raises(CheckpointLayoutError, match="No key of the checkpoint starts with 'ema.'"):
        missing.init_weights()


def test_legacy_non_zip_checkpoint_loads(tmp_path):
    """torch.save(..., _use_new_zipfile_serialization=False) (torch < 1.6 files, and some
    released checkpoints) is a plain pickle stream; it loads like the zip format."""
    sd = official_state_dict('TwinsPCPVT', 'small', seed=5)
    path = tmp_path / 'legacy.pth'
    torch.save({'model': sd}, path, _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(path) and path.read_bytes()[:1] == b'\x80'
    model = twins_mm.TwinsPCPVT('small', init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    model.init_weights()
    for key, value in model.state_dict().items():
        assert torch.equal(value, sd[key]), key


@pytest.mark.parametrize('content,kind', [([torch.zeros(2)], 'list'), (torch.zeros(2), 'Tensor'),
                                          ((1, 2), 'tuple')])
def test_checkpoint_that_is_not_a_dict_is_named(tmp_path, content, kind):
    path = tmp_path / 'odd.pth'
    torch.save(content, path)
    model = twins_mm.TwinsSVT('small', init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    with pytest.raises(CheckpointLayoutError, match=f'Expected a checkpoint dict .* got {kind}'):
        model.init_weights()


# The URL every SVT-S config's init_cfg names (configs/*_twins_svt_s_*.py); the first test
# checks that the configs still name it.
SVT_S_URL = ('https://download.openmmlab.com/mmsegmentation/v0.5/pretrain/twins/'
             'alt_gvt_small_20220308-7e1c3695.pth')


@pytest.fixture
def hub_dir(tmp_path, monkeypatch):
    """torch's hub cache in tmp_path: a URL whose file is already there is not downloaded,
    so the real URL code path runs without network."""
    monkeypatch.setattr(torch.hub, '_hub_dir', str(tmp_path / 'hub'))
    folder = tmp_path / 'hub' / 'checkpoints'
    folder.mkdir(parents=True)

    def no_download(url, *args, **kwargs):
        raise AssertionError(f'tried to download {url}')

    monkeypatch.setattr(torch.hub, 'download_url_to_file', no_download)
    return folder


def test_pth_url_of_the_configs_loads_through_the_hub_cache(hub_dir):
    """The backbone of a real config, built and initialised as a runner does: its https
    .pth init_cfg is read through mmengine's URL loader from torch's hub cache."""
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmdet.registry import MODELS
    cfg = Config.fromfile(str(ROOT / 'configs' / 'retinanet_twins_svt_s_1x.py'))
    assert cfg.model.backbone.init_cfg.checkpoint == SVT_S_URL
    sd = official_state_dict('TwinsSVT', 'small', seed=4)
    torch.save({'model': sd}, hub_dir / 'alt_gvt_small_20220308-7e1c3695.pth')
    init_default_scope('mmdet')
    model = MODELS.build(cfg.model.backbone)
    model.init_weights()
    for key, value in model.state_dict().items():
        if not key.startswith('norm_list.'):
            assert torch.equal(value, sd[key]), key


def test_pth_url_with_a_pickled_object_is_refused(hub_dir, monkeypatch):
    """A downloaded file is unpickled as safely as a local one: torch.hub's loader unpickles
    everything unless told otherwise, so an arbitrary object in a file behind a URL would
    run its code."""
    monkeypatch.delenv(compat.TRUST_ENV, raising=False)
    torch.save({'model': official_state_dict('TwinsSVT', 'small'), 'meta': Payload()},
               hub_dir / 'alt_gvt_small_20220308-7e1c3695.pth')
    model = twins_mm.TwinsSVT('small', init_cfg=dict(type='Pretrained', checkpoint=SVT_S_URL))
    with pytest.raises(compat.UntrustedCheckpointError, match='getcwd') as err:
        model.init_weights()
    cached = str(hub_dir / 'alt_gvt_small_20220308-7e1c3695.pth')
    assert SVT_S_URL in str(err.value) and f'trust the downloaded copy {cached}' in str(err.value)
    with compat.trust_checkpoint(cached):  # the opt-in the message names
        model.init_weights()


def test_legacy_file_with_a_pickled_object_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv(compat.TRUST_ENV, raising=False)
    path = tmp_path / 'legacy_evil.pth'
    torch.save({'model': official_state_dict('TwinsSVT', 'small'), 'meta': Payload()}, path,
               _use_new_zipfile_serialization=False)
    model = twins_mm.TwinsSVT('small', init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    with pytest.raises(compat.UntrustedCheckpointError, match=str(path)):
        model.init_weights()
