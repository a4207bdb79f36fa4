"""Twins-PCPVT and Twins-SVT backbones for mmsegmentation 1.x and mmdetection 3.x."""
from . import compat

compat.install()

from .models import TwinsPCPVT, TwinsSVT  # noqa: E402
from .version import __version__  # noqa: E402

__all__ = ['TwinsPCPVT', 'TwinsSVT', '__version__']
