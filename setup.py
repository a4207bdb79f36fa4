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


setup(
    name='twins_mm',
    version=read_version(),
    description='Twins-PCPVT and Twins-SVT backbones for mmsegmentation 1.x and mmdetection 3.x',
    long_description=(ROOT / 'README.md').read_text() if (ROOT / 'README.md').exists() else '',
    long_description_content_type='text/markdown',
    packages=find_packages(include=['twins_mm', 'twins_mm.*']),
    python_requires='>=3.9',
    # mmcv 2.1.0 must be compiled with ops against the installed torch: tools/install.sh
    # does that; it is declared here so pip reports a missing build instead of failing later.
    install_requires=read_requirements('torch.txt') + ['mmcv>=2.0.0,<2.2.0'] +
    read_requirements('runtime.txt'),
    extras_require={'tests': read_requirements('tests.txt')},
    license='Apache-2.0',
)
