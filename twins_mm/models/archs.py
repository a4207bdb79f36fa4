"""The paper's six variants and the checking of custom ``arch`` dicts.

Kept apart from the model file so that :mod:`twins_mm.checkpoints` and the tools can read
the presets without importing the model (no import cycle).
Source: docs/reference.md, section 1.2 (the official model factories).
"""
import copy
from typing import Dict, Union

PCPVT_ARCHS: Dict[str, dict] = {
    'small': dict(embed_dims=[64, 128, 320, 512], num_heads=[1, 2, 5, 8], mlp_ratios=[8, 8, 4, 4],
                  depths=[3, 4, 6, 3], sr_ratios=[8, 4, 2, 1]),
    'base': dict(embed_dims=[64, 128, 320, 512], num_heads=[1, 2, 5, 8], mlp_ratios=[8, 8, 4, 4],
                 depths=[3, 4, 18, 3], sr_ratios=[8, 4, 2, 1]),
    'large': dict(embed_dims=[64, 128, 320, 512], num_heads=[1, 2, 5, 8], mlp_ratios=[8, 8, 4, 4],
                  depths=[3, 8, 27, 3], sr_ratios=[8, 4, 2, 1]),
}
SVT_ARCHS: Dict[str, dict] = {
    'small': dict(embed_dims=[64, 128, 256, 512], num_heads=[2, 4, 8, 16], mlp_ratios=[4, 4, 4, 4],
                  depths=[2, 2, 10, 4], sr_ratios=[8, 4, 2, 1], window_sizes=[7, 7, 7, 7]),
    'base': dict(embed_dims=[96, 192, 384, 768], num_heads=[3, 6, 12, 24], mlp_ratios=[4, 4, 4, 4],
                 depths=[2, 2, 18, 2], sr_ratios=[8, 4, 2, 1], window_sizes=[7, 7, 7, 7]),
    'large': dict(embed_dims=[128, 256, 512, 1024], num_heads=[4, 8, 16, 32],
                  mlp_ratios=[4, 4, 4, 4], depths=[2, 2, 18, 2], sr_ratios=[8, 4, 2, 1],
                  window_sizes=[7, 7, 7, 7]),
}
ARCH_ALIASES = {'s': 'small', 'b': 'base', 'l': 'large'}


def resolve_arch(arch: Union[str, dict], presets: Dict[str, dict], family: str) -> dict:
    """Turns ``arch`` (a preset name or a dict of hyper-parameters) into a checked dict."""
    required = list(next(iter(presets.values())).keys())
    if isinstance(arch, str):
        name = ARCH_ALIASES.get(arch.lower(), arch.lower())
        if name not in presets:
            raise ValueError(f'Unknown {family} arch {arch!r}: choose one of '
                             f'{sorted(presets)} (or {sorted(ARCH_ALIASES)}), or pass a dict '
                             f'with the keys {required}.')
        return copy.deepcopy(presets[name])
    if not isinstance(arch, dict):
        raise ValueError(f'{family} arch must be one of {sorted(presets)} or a dict with the '
                         f'keys {required}, got {type(arch).__name__}.')
    missing = [k for k in required if k not in arch]
    extra = [k for k in arch if k not in required]
    if missing or extra:
        raise ValueError(f'{family} arch dict must have exactly the keys {required}; '
                         f'missing {missing}, unexpected {extra}. Presets: {sorted(presets)}.')
    choices = f'Presets: {sorted(presets)}; a dict needs the keys {required}.'
    lengths = {k: len(v) for k, v in arch.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f'{family} arch dict: every entry needs one value per stage, '
                         f'got lengths {lengths}. {choices}')
    for dim, heads in zip(arch['embed_dims'], arch['num_heads']):
        if dim % heads:
            raise ValueError(f'{family} arch dict: embed_dims {arch["embed_dims"]} must be '
                             f'divisible by num_heads {arch["num_heads"]} stage by stage. '
                             f'{choices}')
    if any(d < 1 for d in arch['depths']):
        raise ValueError(f'{family} arch dict: depths must be >= 1, got {arch["depths"]}. '
                         f'{choices}')
    return {k: list(v) for k, v in arch.items()}
