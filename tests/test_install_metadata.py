"""What ``pip install twins_mm`` asks of an existing environment.

A plugin must never replace the user's torch or OpenMMLab packages. The wheel is built from
the sources (offline, no build isolation) and its metadata read; then it is installed with
pip's full resolver, offline, into an environment whose torch and OpenMMLab packages are of
other versions than the pinned CPU stack: pip must install twins_mm alone and keep them.
"""
import email.parser
import json
import os
import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import distributions
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
# Packages that an environment brings and twins_mm must never replace.
GUARDED = {'torch', 'torchvision', 'mmengine', 'mmcv', 'mmcv-full', 'mmsegmentation', 'mmdet',
           'mmpretrain'}
SOURCES = ('setup.py', 'README.md', 'model-index.yml', 'requirements', 'twins_mm', 'configs',
           'docs')


def pip(*args, timeout=300):
    """pip of this interpreter, offline, blind to the machine's pip configuration (indexes,
    find-links, constraints: also where ``--python`` runs pip again under another one)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith('PIP_')}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_NO_INPUT='1', PIP_DISABLE_PIP_VERSION_CHECK='1')
    return subprocess.run([sys.executable, '-m', 'pip', '--isolated', *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope='module')
def wheel(tmp_path_factory):
    src = tmp_path_factory.mktemp('src')
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, symlinks=False,
                            ignore=shutil.ignore_patterns('__pycache__', '*.egg-info', '.mim'))
        else:
            shutil.copy(ROOT / name, src / name)
    out = tmp_path_factory.mktemp('wheelhouse')
    proc = pip('wheel', '--no-deps', '--no-build-isolation', '--no-index', '-w', str(out),
               str(src))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (built, ) = out.glob('twins_mm-*.whl')
    return built


def read_metadata(wheel_path):
    with zipfile.ZipFile(wheel_path) as z:
        name = next(n for n in z.namelist() if n.endswith('.dist-info/METADATA'))
        return email.parser.Parser().parsestr(z.read(name).decode())


def requirements(wheel_path, extra=''):
    """The requirements pip installs for ``twins_mm[extra]`` (``''``: no extra)."""
    reqs = [Requirement(r) for r in read_metadata(wheel_path).get_all('Requires-Dist')]
    return {canonicalize_name(r.name): r for r in reqs
            if r.marker is None or (extra and r.marker.evaluate({'extra': extra}))}


def pinned_stack():
    """The exact versions tools/install.sh installs: {name: version}."""
    pins = {}
    for name in ('torch.txt', 'mmcv.txt', 'runtime.txt'):
        for line in (ROOT / 'requirements' / name).read_text().splitlines():
            line = line.split('#')[0].strip()
            if '==' in line:
                req = Requirement(line)
                pins[canonicalize_name(req.name)] = next(iter(req.specifier)).version
    return pins


def test_no_exact_pin_of_torch_or_openmmlab(wheel):
    everything = {}
    for extra in ('', 'seg', 'det', 'all'):
        everything.update(requirements(wheel, extra))
    guarded = {n: r for n, r in everything.items() if n in GUARDED}
    assert {'torch', 'mmengine', 'mmcv', 'mmsegmentation', 'mmdet'} <= set(guarded)
    for name, req in guarded.items():
        exact = [s for s in req.specifier if s.operator in ('==', '===')]
        assert not exact, f'{req}: an exact pin would replace the user\'s {name}'
        assert str(req.specifier), f'{req}: give the range the code was checked against'


def test_mmcv_range_and_the_pinned_stack_is_inside_every_range(wheel):
    reqs = {**requirements(wheel, 'all'), **requirements(wheel)}
    assert reqs['mmcv'].specifier == Requirement('mmcv>=2.0.0,<2.2.0').specifier
    stack = pinned_stack()
    assert {'torch', 'mmengine', 'mmcv', 'mmsegmentation', 'mmdet', 'safetensors'} <= set(stack)
    for name, req in reqs.items():
        if name in stack:
            assert req.specifier.contains(stack[name]), (
                f'{req} excludes {name}=={stack[name]} that tools/install.sh installs')


def test_mmseg_and_mmdet_are_extras(wheel):
    base = requirements(wheel)
    assert 'mmsegmentation' not in base and 'mmdet' not in base
    assert {'torch', 'mmengine', 'mmcv', 'safetensors'} <= set(base)
    seg, det, both = (set(requirements(wheel, e)) for e in ('seg', 'det', 'all'))
    assert 'mmsegmentation' in seg and 'mmdet' not in seg
    assert 'mmdet' in det and 'mmsegmentation' not in det
    assert {'mmsegmentation', 'mmdet'} <= both


def test_wheel_ships_the_model_index_for_mim(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    assert 'twins_mm/.mim/model-index.yml' in names
    shipped = [f for f in (ROOT / 'configs').rglob('*') if f.suffix in ('.py', '.yml')]
    shipped += list((ROOT / 'docs').glob('*.md'))
    for path in shipped:
        assert f'twins_mm/.mim/{path.relative_to(ROOT).as_posix()}' in names


def stub_distribution(site, name, version):
    info = site / f'{name}-{version}.dist-info'
    info.mkdir(parents=True)
    (info / 'METADATA').write_text(f'Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n')
    (info / 'INSTALLER').write_text('stub\n')
    (info / 'RECORD').write_text('')


# A user's environment: a CUDA torch of another version, a mim-installed mmcv, their own
# mmengine / mmseg / mmdet, all different from the pinned stack of tools/install.sh.
USER_ENV = {'torch': '2.7.1+cu126', 'mmengine': '0.10.4', 'mmcv': '2.1.0',
            'mmsegmentation': '1.2.1', 'mmdet': '3.2.0', 'numpy': '1.26.4',
            'safetensors': '0.4.5', 'setuptools': '75.8.0'}


@pytest.mark.parametrize('extra', ['', '[seg]', '[det]', '[all]'])
def test_install_keeps_the_environments_torch_and_openmmlab(wheel, tmp_path, extra):
    env = tmp_path / 'env'
    subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(env)], check=True)
    (site, ) = env.glob('lib/python*/site-packages')
    for name, version in USER_ENV.items():
        stub_distribution(site, name, version)
    report = tmp_path / 'report.json'
    proc = pip('--python', str(env / 'bin' / 'python'), 'install', '--no-index', '--find-links',
               str(wheel.parent), '--report', str(report), f'twins_mm{extra}')
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    installed = [item['metadata']['name'] for item in json.loads(report.read_text())['install']]
    assert installed == ['twins_mm']
    after = {canonicalize_name(d.metadata['Name']): d.version
             for d in distributions(path=[str(site)])}
    assert after == {**USER_ENV, 'twins-mm': after.get('twins-mm')}
    assert after['twins-mm'] is not None


# --- mim: the model index, as `mim search twins_mm` reads it from an installed wheel -------

MIM_SEARCH = r"""
import json, sys
from mim.commands.search import get_model_info
out = dict(rows=get_model_info('twins_mm', to_dict=True),
           filtered={c: sorted(get_model_info('twins_mm', filter_conditions=c).index)
                     for c in sys.argv[1:]},
           by_box_ap=list(get_model_info('twins_mm', sorted_fields=['coco/box_ap'],
                                         ascending=False).index))
print(json.dumps(out))
"""


def metafile_models():
    import yaml
    models = {}
    for name in ('metafile-seg.yml', 'metafile-det.yml'):
        with open(ROOT / 'configs' / name) as f:
            for model in yaml.safe_load(f)['Models']:
                results = model['Results']
                results = results if isinstance(results, list) else [results]
                model['metrics'] = {k: v for r in results for k, v in r['Metrics'].items()}
                models[model['Name']] = model
    return models


@pytest.fixture(scope='module')
def installed_site(wheel, tmp_path_factory):
    """twins_mm installed from the wheel, alone, into a folder put on PYTHONPATH."""
    site = tmp_path_factory.mktemp('site')
    proc = pip('install', '--no-deps', '--no-index', '--target', str(site), str(wheel))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return site


def test_model_index_passes_model_index_check(installed_site):
    from modelindex.load_model_index import load
    for index in (ROOT / 'model-index.yml', installed_site / 'twins_mm' / '.mim' /
                  'model-index.yml'):
        loaded = load(str(index))
        assert loaded.check(silent=True) == [], index
        assert len(loaded.models) == len(metafile_models())


def test_mim_search_finds_every_model(installed_site):
    conditions = ['miou>46', 'box_ap>45']
    proc = subprocess.run([sys.executable, '-c', MIM_SEARCH, *conditions], capture_output=True,
                          text=True, timeout=300,
                          env={**os.environ, 'PYTHONPATH': str(installed_site)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    models = metafile_models()
    assert set(found['rows']) == set(models) and len(models) == 54
    for name, row in found['rows'].items():
        model = models[name]
        assert row['config'] == model['Config']
        assert (installed_site / 'twins_mm' / '.mim' / row['config']).is_file()
        for metric, column in (('mIoU', 'ade20k/miou'), ('box AP', 'coco/box_ap'),
                               ('mask AP', 'coco/mask_ap')):
            if metric in model['metrics']:
                assert row[column] == model['metrics'][metric], (name, column)
    expected = {
        'miou>46': sorted(n for n, m in models.items() if m['metrics'].get('mIoU', 0) > 46),
        'box_ap>45': sorted(n for n, m in models.items() if m['metrics'].get('box AP', 0) > 45)}
    assert found['filtered'] == expected
    assert all(expected.values())
    with_box = sorted((m['metrics']['box AP'], n) for n, m in models.items()
                      if 'box AP' in m['metrics'])
    ranked = found['by_box_ap'][:len(with_box)]
    assert [models[n]['metrics']['box AP'] for n in ranked] == sorted(
        (ap for ap, _ in with_box), reverse=True)


def upstream_metafiles(package):
    """The metafiles that mmseg / mmdet ship for mim (``<package>/.mim/configs``)."""
    import importlib.util

    import yaml
    spec = importlib.util.find_spec(package)  # finds, does not import
    root = Path(spec.submodule_search_locations[0]) / '.mim' / 'configs'
    files = sorted(root.glob('*/metafile.y*ml'))
    assert len(files) > 20, root
    loaded = [yaml.safe_load(f.read_text()) for f in files]
    return [d if isinstance(d, dict) else {'Models': d} for d in loaded]


@pytest.mark.parametrize('ours,package', [('metafile-seg.yml', 'mmseg'),
                                          ('metafile-det.yml', 'mmdet')])
def test_metafiles_use_the_fields_of_the_library_they_belong_to(ours, package):
    """Every field, task and metric name of ours is one that the library's own metafiles use,
    and results are laid out as there (mmseg: one dict, mmdet: a list)."""
    import yaml
    upstream = upstream_metafiles(package)
    models = [m for d in upstream for m in d.get('Models') or []]
    collections = [c for d in upstream for c in d.get('Collections') or [] if isinstance(c, dict)]

    def results(model):
        r = model['Results']
        return r if isinstance(r, list) else [r]

    model_keys = {k for m in models for k in m}
    collection_keys = {k for c in collections for k in c}
    tasks = {r['Task'] for m in models for r in results(m)}
    metrics = {k for m in models for r in results(m) for k in r.get('Metrics') or {}}
    layouts = {type(m['Results']) for m in models}
    assert len(layouts) == 1
    with open(ROOT / 'configs' / ours) as f:
        mine = yaml.safe_load(f)
    for model in mine['Models']:
        assert set(model) - {'Weights'} <= model_keys, model['Name']
        assert {'Name', 'In Collection', 'Config', 'Metadata', 'Results'} <= set(model)
        assert type(model['Results']) in layouts, model['Name']
        for result in results(model):
            assert result['Task'] in tasks and set(result['Metrics']) <= metrics, model['Name']
            assert all(isinstance(v, (int, float)) for v in result['Metrics'].values())
        assert model['In Collection'] in {c['Name'] for c in mine['Collections']}
    for collection in mine['Collections']:
        assert set(collection) <= collection_keys, collection['Name']
