"""The backbones build from plain config files under mmdet's and mmseg's default scopes.

Each case runs in a fresh interpreter in which nothing but the config's ``custom_imports``
imports twins_mm, so a registration that only works after a manual import would fail.
"""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

DET_CFG = """
_base_ = ['mmdet::_base_/models/retinanet_r50_fpn.py']
custom_imports = dict(imports=['twins_mm'], allow_failed_imports=False)
default_scope = 'mmdet'
model = dict(
    backbone=dict(_delete_=True, type='{type}', arch='small'),
    neck=dict(in_channels={channels}))
"""
SEG_CFG = """
_base_ = ['mmseg::_base_/models/fpn_r50.py']
custom_imports = dict(imports=['twins_mm'], allow_failed_imports=False)
default_scope = 'mmseg'
norm_cfg = dict(type='BN', requires_grad=True)
model = dict(
    pretrained=None,
    data_preprocessor=dict(size=(64, 64)),
    backbone=dict(_delete_=True, type='{type}', arch='small'),
    neck=dict(in_channels={channels}),
    decode_head=dict(norm_cfg=norm_cfg))
"""
RUN = """
import json, sys, torch
from mmengine.config import Config
from mmengine.registry import init_default_scope
cfg = Config.fromfile(sys.argv[1])
init_default_scope(cfg.default_scope)
if cfg.default_scope == 'mmdet':
    from mmdet.registry import MODELS
else:
    from mmseg.registry import MODELS
model = MODELS.build(cfg.model).eval()
with torch.no_grad():
    out = model._forward(torch.randn(1, 3, 64, 64))
flat = out if isinstance(out, torch.Tensor) else [t for level in out for t in level]
flat = flat if isinstance(flat, list) else [flat]
print(json.dumps(dict(backbone=type(model.backbone).__module__ + '.' + type(model.backbone).__name__,
                      shapes=[list(t.shape) for t in flat])))
"""

CHANNELS = {'TwinsPCPVT': [64, 128, 320, 512], 'TwinsSVT': [64, 128, 256, 512]}


def run_config(tmp_path, text):
    cfg = tmp_path / 'cfg.py'
    cfg.write_text(textwrap.dedent(text))
    proc = subprocess.run([sys.executable, '-c', RUN, str(cfg)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize('type_name', ['TwinsPCPVT', 'twins_mm.TwinsSVT'])
def test_retinanet_under_mmdet_scope(tmp_path, type_name):
    family = type_name.split('.')[-1]
    res = run_config(tmp_path, DET_CFG.format(type=type_name, channels=CHANNELS[family]))
    assert res['backbone'] == f'twins_mm.models.twins.{family}'
    # 5 levels x (cls, reg); cls: 9 anchors x 80 classes; P3 of a 64 px input is 8x8
    assert res['shapes'][0] == [1, 720, 8, 8] and len(res['shapes']) == 10


@pytest.mark.parametrize('type_name', ['TwinsSVT', 'TwinsPCPVT'])
def test_encoder_decoder_under_mmseg_scope(tmp_path, type_name):
    res = run_config(tmp_path, SEG_CFG.format(type=type_name, channels=CHANNELS[type_name]))
    assert res['backbone'] == f'twins_mm.models.twins.{type_name}'
    assert res['shapes'] == [[1, 19, 16, 16]]


def test_mmseg_own_pcpvt_is_untouched(tmp_path):
    text = SEG_CFG.format(type='PCPVT', channels=CHANNELS['TwinsPCPVT']).replace(
        "arch='small'", "embed_dims=[64, 128, 320, 512], num_heads=[1, 2, 5, 8], "
        "mlp_ratios=[8, 8, 4, 4], qkv_bias=True, depths=[3, 4, 6, 3], sr_ratios=[8, 4, 2, 1]")
    res = run_config(tmp_path, text)
    assert res['backbone'] == 'mmseg.models.backbones.twins.PCPVT'
    assert res['shapes'] == [[1, 19, 16, 16]]


def test_registered_in_each_scope_without_shadowing():
    import mmdet.models  # noqa: F401  (fills the registries)
    import mmseg.models  # noqa: F401

    import twins_mm  # noqa: F401
    from mmdet.registry import MODELS as DET
    from mmseg.registry import MODELS as SEG

    from twins_mm.registry import MODELS as OURS
    for reg in (DET, SEG, OURS):
        assert reg.module_dict['TwinsSVT'] is twins_mm.TwinsSVT
        assert reg.module_dict['TwinsPCPVT'] is twins_mm.TwinsPCPVT
    assert SEG.module_dict['PCPVT'].__module__.startswith('mmseg.')
    assert 'PCPVT' not in DET.module_dict and 'PCPVT' not in OURS.module_dict


# ----------------------------------------------------------------------------- one library
# A detection-only (or segmentation-only) environment, made for real: a fresh interpreter
# without site-packages (-S) gets a folder of links to every site-packages entry except
# the hidden library's package and its dist-info, so neither `import` nor the package
# metadata (which mmengine consults for 'mmseg::' bases) can find it.
HIDDEN = {'mmseg': ('mmseg', 'mmsegmentation-'), 'mmdet': ('mmdet', 'mmdet-')}
REPO = str(Path(__file__).resolve().parents[1])


@pytest.fixture(scope='module')
def env_without(tmp_path_factory):
    made = {}

    def make(library):
        if library not in made:
            site = tmp_path_factory.mktemp(f'site_without_{library}')
            package, dist = HIDDEN[library]
            (real, ) = {p for p in map(Path, sys.path) if (p / 'mmengine').is_dir()}
            for entry in real.iterdir():
                if entry.name == package or entry.name.startswith(dist):
                    continue
                (site / entry.name).symlink_to(entry)
            made[library] = str(site)
        return made[library]

    return make


def run_without(site, code, *args):
    prelude = (f'import site, sys; site.addsitedir({site!r}); sys.path.insert(0, {REPO!r})\n')
    return subprocess.run([sys.executable, '-S', '-c', prelude + code, *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


CHECK = """
import importlib.util, json, sys, torch
from mmengine.config import Config
from mmengine.registry import init_default_scope
from mmengine.utils import is_installed
hidden = sys.argv[2]
assert importlib.util.find_spec(hidden) is None and not is_installed(
    {'mmseg': 'mmsegmentation', 'mmdet': 'mmdet'}[hidden]), 'the library is not hidden'
import twins_mm
from twins_mm.registry import MODELS as OURS
cfg = Config.fromfile(sys.argv[1])  # custom_imports: twins_mm
init_default_scope(cfg.default_scope)
MODELS = importlib.import_module(cfg.default_scope + '.registry').MODELS
for reg in (OURS, MODELS):
    assert reg.module_dict['TwinsSVT'] is twins_mm.TwinsSVT
    assert reg.module_dict['TwinsPCPVT'] is twins_mm.TwinsPCPVT
model = MODELS.build(cfg.model).eval()
with torch.no_grad():
    out = model._forward(torch.randn(1, 3, 64, 64))
flat = out if isinstance(out, torch.Tensor) else [t for level in out for t in level]
flat = flat if isinstance(flat, list) else [flat]
assert hidden not in sys.modules and not any(m.startswith(hidden + '.') for m in sys.modules)
backbone = type(model.backbone)
print(json.dumps(dict(backbone=backbone.__module__ + '.' + backbone.__name__,
                      shapes=[list(t.shape) for t in flat])))
"""


@pytest.mark.parametrize('hidden,text,family,shapes', [
    ('mmseg', DET_CFG, 'TwinsSVT', None), ('mmdet', SEG_CFG, 'TwinsPCPVT', [[1, 19, 16, 16]])])
def test_backbones_register_and_build_with_one_library_only(env_without, tmp_path, hidden, text,
                                                            family, shapes):
    cfg = tmp_path / 'cfg.py'
    cfg.write_text(textwrap.dedent(text.format(type=family, channels=CHANNELS[family])))
    proc = run_without(env_without(hidden), CHECK, str(cfg), hidden)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res['backbone'] == f'twins_mm.models.twins.{family}'
    if hidden == 'mmseg':
        assert res['shapes'][0] == [1, 720, 8, 8] and len(res['shapes']) == 10
    else:
        assert res['shapes'] == shapes


TRAIN = """
import runpy, sys
sys.argv = ['tools/train.py', *sys.argv[1:]]
runpy.run_path('tools/train.py', run_name='__main__')
"""
# Each tool in turn; each ends with SystemExit, whose message is printed.
TOOLS = """
import runpy, sys
config, work_dir, checkpoint, image = sys.argv[1:]
for tool, args in (('tools/train.py', [config, '--work-dir', work_dir]),
                   ('tools/test.py', [config, checkpoint, '--work-dir', work_dir]),
                   ('tools/inference.py', [config, checkpoint, image, '--out', image + '.png'])):
    sys.argv = [tool, *args]
    try:
        runpy.run_path(tool, run_name='__main__')
    except SystemExit as e:
        print(f'{tool}: {e.code}')
"""


def test_seg_config_without_mmseg_names_it_and_the_install(env_without, tmp_path):
    """The tools with one of our segmentation configs where only mmdet is installed."""
    config = 'configs/fpn_twins_svt_s_80k.py'
    (tmp_path / 'x.pth').write_bytes(b'')
    (tmp_path / 'x.jpg').write_bytes(b'')
    proc = run_without(env_without('mmseg'), TOOLS, config, str(tmp_path / 'w'),
                       str(tmp_path / 'x.pth'), str(tmp_path / 'x.jpg'))
    assert proc.returncode == 0 and 'Traceback' not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()[-3:]
    for tool, line in zip(('train', 'test', 'inference'), lines):
        assert line.startswith(f'tools/{tool}.py: error: {config} inherits mmseg:: configs, '
                               'but mmsegmentation is not installed'), line
        assert 'pip install ".[seg]"' in line, line


def test_det_scope_without_mmdet_names_it_and_the_install(env_without, tmp_path):
    """A complete mmdet-scope config (no 'mmdet::' base to fail on) where only mmseg is."""
    cfg = tmp_path / 'own_det.py'
    cfg.write_text("default_scope = 'mmdet'\nmodel = dict(type='RetinaNet')\n")
    proc = run_without(env_without('mmdet'), TRAIN, str(cfg), '--work-dir', str(tmp_path / 'w'))
    assert proc.returncode != 0 and 'Traceback' not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the config sets default_scope='mmdet', but mmdet is not "
                           'installed'), last
    assert 'pip install ".[det]"' in last
