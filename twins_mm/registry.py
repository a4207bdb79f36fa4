"""Where the backbones are registered.

mmseg and mmdet keep sibling registries: a name registered in one is invisible from the
other. twins_mm therefore registers each backbone in its own scoped registry (so
``type='twins_mm.TwinsSVT'`` works from any scope) and in the model registries of
mmseg and mmdet, whichever are installed (so plain ``type='TwinsSVT'`` works under
``default_scope='mmseg'`` and ``'mmdet'``). The names never collide with mmseg's
own ``PCPVT`` / ``SVT``.
"""
import importlib

from mmengine.registry import MODELS as MMENGINE_MODELS
from mmengine.registry import Registry

MODELS = Registry('model', parent=MMENGINE_MODELS, scope='twins_mm',
                  locations=['twins_mm.models'])

DOWNSTREAM_SCOPES = ('mmseg', 'mmdet')


def register_everywhere(*classes):
    """Registers ``classes`` in twins_mm's registry and in every installed downstream one."""
    registries = [MODELS]
    for scope in DOWNSTREAM_SCOPES:
        try:
            registries.append(importlib.import_module(f'{scope}.registry').MODELS)
        except ImportError:
            continue
    for registry in registries:
        for cls in classes:
            if registry.module_dict.get(cls.__name__) is not cls:
                registry.register_module(module=cls)
    return classes
