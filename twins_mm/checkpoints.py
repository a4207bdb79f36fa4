"""Recognise Twins checkpoint layouts and map them to twins_mm's.

twins_mm's layout is the official one (shared by timm): ``patch_embeds.{i}.proj``,
``pos_block.{i}.proj.0``, ``blocks.{i}.{j}.attn.{q,kv,qkv,sr,norm,proj}``, ``mlp.fc1/fc2``,
plus ``norm_list.{i}`` for per-stage norms. Official / timm classification checkpoints
add ``head.*`` and the final ``norm.*``, which dense backbones drop. mmseg 1.x renames
most modules and fuses GSA's q and kv into ``nn.MultiheadAttention``'s ``in_proj``.
"""
import re
from collections import OrderedDict
from typing import Dict, Optional, Tuple

import torch
from mmengine.logging import print_log
from mmengine.runner.checkpoint import CheckpointLoader

from twins_mm.models.twins import PCPVT_ARCHS, SVT_ARCHS

CLASSIFIER_KEYS = re.compile(r'^(head|norm)\.')
STAGE_NORM_KEYS = re.compile(r'^norm_list\.\d+\.')


class CheckpointLayoutError(ValueError):
    """The checkpoint is not a Twins checkpoint this model can take."""


def extract_state_dict(checkpoint, prefix: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """Unwraps ``state_dict`` / ``model`` containers, ``module.`` and ``backbone.`` prefixes."""
    if not isinstance(checkpoint, dict):
        raise CheckpointLayoutError(
            f'Expected a checkpoint dict (a state dict, or one under "state_dict" or "model"), '
            f'got {type(checkpoint).__name__}.')
    for wrapper in ('state_dict', 'model'):
        if isinstance(checkpoint.get(wrapper), dict):
            checkpoint = checkpoint[wrapper]
            break
    state = OrderedDict(
        (k[len('module.'):] if k.startswith('module.') else k, v) for k, v in checkpoint.items()
        if isinstance(v, torch.Tensor))
    if prefix is None and any(k.startswith('backbone.') for k in state):
        prefix = 'backbone.'
    if prefix:
        state = OrderedDict((k[len(prefix):], v) for k, v in state.items()
                            if k.startswith(prefix))
        if not state:
            raise CheckpointLayoutError(f'No key of the checkpoint starts with {prefix!r}.')
    return state


def detect_layout(state: Dict[str, torch.Tensor]) -> str:
    """'official' (official, timm and twins_mm) or 'mmseg'; anything else is an error."""
    keys = list(state)
    if 'patch_embeds.0.proj.weight' in state and any(k.startswith('blocks.') for k in keys):
        return 'official'
    if 'patch_embeds.0.projection.weight' in state and any(k.startswith('layers.') for k in keys):
        return 'mmseg'
    if any(k.startswith('stages.') or 'norm_after_stage' in k for k in keys):
        raise CheckpointLayoutError(
            'This looks like an mmpretrain Twins checkpoint ("stages.*" keys); it is not '
            'supported. Use the official, timm or mmseg checkpoint of the same model.')
    sample = ', '.join(keys[:5]) or '(no tensors)'
    raise CheckpointLayoutError(
        'Unknown checkpoint layout: expected Twins keys of the official/timm layout '
        '("patch_embeds.0.proj.weight", "blocks.0.0...") or the mmseg 1.x layout '
        f'("patch_embeds.0.projection.weight", "layers.0.0..."); found {sample}.')


def mmseg_to_official(state: Dict[str, torch.Tensor]) -> 'OrderedDict[str, torch.Tensor]':
    """Inverse of mmseg's ``twins2mmseg``: undo renames, split GSA's fused in_proj."""
    out = OrderedDict()
    for key, value in state.items():
        new = key
        new = re.sub(r'^patch_embeds\.(\d+)\.projection\.', r'patch_embeds.\1.proj.', new)
        new = re.sub(r'^position_encodings\.(\d+)\.proj\.', r'pos_block.\1.proj.0.', new)
        new = re.sub(r'^layers\.', 'blocks.', new)
        new = new.replace('.ffn.layers.0.0.', '.mlp.fc1.').replace('.ffn.layers.1.', '.mlp.fc2.')
        new = new.replace('.attn.attn.out_proj.', '.attn.proj.')
        match = re.match(r'^(.*\.attn)\.attn\.in_proj_(weight|bias)$', new)
        if match:
            base, kind = match.groups()
            dim = value.shape[0] // 3
            out[f'{base}.q.{kind}'] = value[:dim]
            out[f'{base}.kv.{kind}'] = value[dim:]
            continue
        out[new] = value
    return out


def describe_arch(state: Dict[str, torch.Tensor]) -> dict:
    """Family and hyper-parameters that the official-layout weights determine."""
    widths, depths, mlp, sr = [], [], [], []
    i = 0
    while f'patch_embeds.{i}.norm.weight' in state:
        widths.append(state[f'patch_embeds.{i}.norm.weight'].shape[0])
        blocks = {int(m.group(1)) for k in state for m in [re.match(rf'^blocks\.{i}\.(\d+)\.', k)]
                  if m}
        depths.append(len(blocks))
        fc1 = state.get(f'blocks.{i}.0.mlp.fc1.weight')
        mlp.append(fc1.shape[0] // widths[-1] if fc1 is not None else None)
        srs = [state[k].shape[-1] for k in state if re.match(rf'^blocks\.{i}\.\d+\.attn\.sr\.weight$', k)]
        sr.append(srs[0] if srs else 1)
        i += 1
    family = 'TwinsSVT' if any(k.endswith('.attn.qkv.weight') for k in state) else 'TwinsPCPVT'
    desc = dict(family=family, embed_dims=widths, depths=depths, mlp_ratios=mlp, sr_ratios=sr)
    presets = SVT_ARCHS if family == 'TwinsSVT' else PCPVT_ARCHS
    desc['arch'] = next((name for name, p in presets.items()
                         if all(p[k] == desc[k] for k in ('embed_dims', 'depths', 'mlp_ratios',
                                                           'sr_ratios'))), 'custom')
    return desc


def arch_label(desc: dict) -> str:
    return (f'{desc["family"]}-{desc["arch"]} (embed_dims {desc["embed_dims"]}, depths '
            f'{desc["depths"]})')


def convert_to_twins_mm(checkpoint, prefix: Optional[str] = None
                        ) -> Tuple['OrderedDict[str, torch.Tensor]', dict]:
    """Any supported checkpoint -> (state dict in twins_mm's layout, info)."""
    state = extract_state_dict(checkpoint, prefix)
    layout = detect_layout(state)
    if layout == 'mmseg':
        state = mmseg_to_official(state)
    dropped = [k for k in state if CLASSIFIER_KEYS.match(k)]
    state = OrderedDict((k, v) for k, v in state.items() if not CLASSIFIER_KEYS.match(k))
    info = dict(layout=layout, dropped=dropped, **describe_arch(state))
    return state, info


def check_compatible(model: torch.nn.Module, state: Dict[str, torch.Tensor], info: dict):
    """Raises with a precise message unless ``state`` fits ``model`` exactly.

    The only keys allowed to be missing are the per-stage norms (``norm_list``), which
    ImageNet checkpoints never contain.
    """
    expected = model.state_dict()
    model_desc = dict(family=type(model).__name__, arch=getattr(model, 'arch_name', 'custom'),
                      embed_dims=list(model.embed_dims),
                      depths=[len(b) for b in model.blocks])
    if info['family'] != model_desc['family'] or info['embed_dims'] != model_desc['embed_dims'] \
            or info['depths'] != model_desc['depths']:
        raise CheckpointLayoutError(
            f'Checkpoint of another variant: the model is {arch_label(model_desc)}, the '
            f'checkpoint ({info["layout"]} layout) holds {arch_label(info)}. Use the '
            f'checkpoint that matches the arch, or change the arch.')
    mismatched = [f'{k}: model {tuple(expected[k].shape)}, checkpoint {tuple(v.shape)}'
                  for k, v in state.items() if k in expected and expected[k].shape != v.shape]
    unexpected = [k for k in state if k not in expected]
    missing = [k for k in expected if k not in state and not STAGE_NORM_KEYS.match(k)]
    if mismatched or unexpected or missing:
        parts = []
        for title, items in (('shape mismatches', mismatched), ('unexpected keys', unexpected),
                             ('missing keys', missing)):
            if items:
                more = f' ... and {len(items) - 5} more' if len(items) > 5 else ''
                parts.append(f'{title}: {"; ".join(items[:5])}{more}')
        raise CheckpointLayoutError(
            f'Checkpoint ({info["layout"]} layout, {arch_label(info)}) does not fit '
            f'{arch_label(model_desc)}: ' + ' | '.join(parts))


def load_pretrained(model: torch.nn.Module, checkpoint, prefix: Optional[str] = None,
                    map_location='cpu') -> dict:
    """Loads a checkpoint (path, URL, or already-loaded dict) of any supported layout."""
    if checkpoint is None or checkpoint == '':
        raise ValueError(f'{type(model).__name__}: init_cfg type "Pretrained" needs a checkpoint '
                         f'path or URL, got {checkpoint!r}; set it, or drop init_cfg to train '
                         f'from scratch.')
    if isinstance(checkpoint, str):
        raw = CheckpointLoader.load_checkpoint(checkpoint, map_location=map_location)
    else:
        raw = checkpoint
    state, info = convert_to_twins_mm(raw, prefix)
    check_compatible(model, state, info)
    model.load_state_dict(state, strict=False)
    fresh = sorted({k.rsplit('.', 1)[0] for k in model.state_dict()
                    if STAGE_NORM_KEYS.match(k) and k not in state})
    source = checkpoint if isinstance(checkpoint, str) else 'the given state dict'
    msg = f'Loaded {source} ({info["layout"]} layout, {arch_label(info)})'
    if info['dropped']:
        msg += f'; dropped the classification head / final norm ({len(info["dropped"])} keys)'
    if fresh:
        msg += f'; newly initialised per-stage norms (not in ImageNet checkpoints): {fresh}'
    print_log(msg, logger='current')
    info['newly_initialised'] = fresh
    return info
