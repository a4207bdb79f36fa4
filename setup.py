import os
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent


def read_version():
    scope = {}
    exec((ROOT / 'twins_mm' / 'version.py').read_text(), scope)
    return scope['__version__']


def read_requirements(name):
    lines = (ROOT / 'requirements' / name).read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith('#')]


# What twins_mm needs, as ranges: installing it into an environment must never replace the
# torch or the OpenMMLab packages already there (a CUDA torch, a mim-installed mmcv). The
# exact CPU stack that tools/install.sh builds and the tests run on is pinned in
# requirements/torch.txt and requirements/runtime.txt (torch 2.13.0, mmengine 0.10.7,
# mmcv 2.1.0, mmsegmentation 1.2.2, mmdet 3.3.0); tests/test_install_metadata.py checks
# that it lies inside these ranges and that no range is an exact pin.
INSTALL_REQUIRES = [
    # torch.compiler.is_exporting (twins_mm/ops/dispatch.py) is in torch 2.7's API;
    # torch.serialization.add_safe_globals with (object, name) pairs (twins_mm/compat.py)
    # and scaled_dot_product_attention are older.
    'torch>=2.7',
    # mmengine.device.is_musa_available (tools/train.py) first appears in 0.10.3; mmseg 1.x
    # and mmdet 3.x require mmengine < 1.0.
    'mmengine>=0.10.3,<1.0.0',
    # mmdet 3.3.0 and mmseg 1.2.2 refuse mmcv >= 2.2.0. mmcv must be built with its ops for
    # the installed torch; prebuilt mmcv 2.1 wheels stop at torch 2.1, so with torch >= 2.7 it
    # is compiled from source (docs/install.md).
    'mmcv>=2.0.0,<2.2.0',
    'numpy',
    # timm's Twins releases are .safetensors files; twins_mm/checkpoints.py reads them with
    # the safetensors library (safetensors.torch.load_file) on every torch version.
    'safetensors>=0.4.0',
]

# mmengine 0.10 resolves the 'mmseg::' / 'mmdet::' bases of our configs through
# pkg_resources, which setuptools 81 removed.
PKG_RESOURCES = 'setuptools<81'
EXTRAS_REQUIRE = {
    # mmseg.registry / mmdet.registry, apis, datasets and the config bases we use are all in
    # mmseg 1.0 and mmdet 3.0; tested with mmsegmentation 1.2.2 and mmdet 3.3.0.
    'seg': ['mmsegmentation>=1.0.0,<2.0.0', PKG_RESOURCES],
    'det': ['mmdet>=3.0.0,<4.0.0', PKG_RESOURCES],
    # ONNX export and its onnxruntime check (tools/deployment/pytorch2onnx.py).
    'deploy': read_requirements('deploy.txt'),
    'tests': read_requirements('tests.txt'),
}
EXTRAS_REQUIRE['all'] = sorted(set(EXTRAS_REQUIRE['seg'] + EXTRAS_REQUIRE['det']))

# `mim search twins_mm` reads <package>/.mim/model-index.yml, and the configs and READMEs
# it names, as for mmseg and mmdet: they are shipped there (symlinks in an editable
# install, copies in a wheel or sdist).
MIM_FILES = ('model-index.yml', 'configs', 'docs')


def add_mim_extension():
    commands = set(sys.argv[1:])
    if commands & {'develop', 'editable_wheel'}:
        mode = 'symlink'
    elif commands & {'sdist', 'bdist_wheel', 'build', 'build_py', 'install'}:
        mode = 'copy'
    else:
        return
    mim = ROOT / 'twins_mm' / '.mim'
    mim.mkdir(exist_ok=True)
    for name in MIM_FILES:
        src, dst = ROOT / name, mim / name
        if not src.exists():  # building from an sdist: .mim already holds the copies
            continue
        if dst.is_symlink() or dst.is_file():
            dst.unlink()
        elif dst.is_dir():
            shutil.rmtree(dst)
        if mode == 'symlink':
            dst.symlink_to(os.path.relpath(src, mim))
        elif src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns('__pycache__'))
        else:
            shutil.copyfile(src, dst)


add_mim_extension()
setup(
    name='twins_mm',
    version=read_version(),
    description='Twins-PCPVT and Twins-SVT backbones for mmsegmentation 1.x and mmdetection 3.x',
    long_description=(ROOT / 'README.md').read_text() if (ROOT / 'README.md').exists() else '',
    long_description_content_type='text/markdown',
    packages=find_packages(include=['twins_mm', 'twins_mm.*']),
    package_data={'twins_mm': ['.mim/model-index.yml', '.mim/configs/*.py',
                               '.mim/configs/*.yml', '.mim/configs/_base_/*.py',
                               '.mim/docs/*.md']},
    python_requires='>=3.9',
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    license='Apache-2.0',
)
