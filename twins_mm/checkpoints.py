"""Recognise Twins checkpoint layouts and map them to twins_mm's.

twins_mm's layout is the official one (shared by timm): ``patch_embeds.{i}.proj``,
``pos_block.{i}.proj.0``, ``blocks.{i}.{j}.attn.{q,kv,qkv,sr,norm,proj}``, ``mlp.fc1/fc2``,
plus ``norm_list.{i}`` for per-stage norms. Official / timm classification checkpoints
add ``head.*`` and the final ``norm.*``, which dense backbones drop. mmseg 1.x renames
most modules and fuses GSA's q and kv into ``nn.MultiheadAttention``'s ``in_proj``.
"""
import os
import os.path as osp
import pickle
import re
import socket
import urllib.error
import zipfile
from collections import OrderedDict
from typing import Dict, Optional, Tuple
from urllib.parse import urlparse

import torch
from mmengine.logging import print_log
from mmengine.runner.checkpoint import CheckpointLoader

from twins_mm.compat import UntrustedCheckpointError
from twins_mm.models.archs import PCPVT_ARCHS, SVT_ARCHS

CLASSIFIER_KEYS = re.compile(r'^(head|norm)\.')
STAGE_NORM_KEYS = re.compile(r'^norm_list\.\d+\.')


class CheckpointLayoutError(ValueError):
    """The checkpoint is not a Twins checkpoint this model can take."""


class CheckpointDownloadError(OSError):
    """A checkpoint URL could not be fetched (no network, proxy, HTTP error)."""


class UnreadableCheckpointError(CheckpointLayoutError):
    """The file is no readable checkpoint: empty, cut short, or not a checkpoint at all."""


ZIP_MAGIC = b'PK\x03\x04'  # torch.save's default (zip) format
PICKLE_MAGIC = b'\x80'  # torch.save's legacy format and plain pickles start with PROTO
LFS_POINTER = b'version https://git-lfs'


def _is_safetensors(filename: str, head: bytes) -> bool:
    """A safetensors file: an 8-byte little-endian header length, then the JSON header."""
    return filename.endswith('.safetensors') or (len(head) >= 9 and head[8:9] == b'{')


def _read_safetensors(filename: str, map_location) -> Dict[str, torch.Tensor]:
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError as err:
        raise ImportError(f'{filename} is a safetensors file; reading it needs the safetensors '
                          f'library: pip install safetensors') from err
    device = map_location if isinstance(map_location, str) else 'cpu'
    try:
        return load_file(filename, device=device)
    except (SafetensorError, OSError, ValueError) as err:
        raise UnreadableCheckpointError(
            f'{filename} is not a readable safetensors file ({err}); the file is probably cut '
            f'short or damaged: download or copy it again.') from None


def _fetch(url: str) -> str:
    """Downloads ``url`` once into torch's hub cache, as ``load_state_dict_from_url`` does."""
    folder = osp.join(torch.hub.get_dir(), 'checkpoints')
    os.makedirs(folder, exist_ok=True)
    cached = osp.join(folder, osp.basename(urlparse(url).path))
    if not osp.isfile(cached):
        print_log(f'Downloading {url} to {cached}', logger='current')
        torch.hub.download_url_to_file(url, cached, progress=False)
    return cached


def _describe_unknown(head: bytes) -> str:
    if head.startswith(LFS_POINTER):
        return ('it is a Git LFS pointer file, not the weights: fetch them with `git lfs pull` '
                '(or download the file itself)')
    if head.lstrip()[:1] == b'<':
        kind = 'an HTML or XML page, e.g. the error page of a failed download'
    elif all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        kind = 'a text file'
    else:
        kind = 'an unknown binary format'
    return (f'it starts with {head[:16]!r} ({kind}); a PyTorch checkpoint is a zip archive or a '
            f'pickle written by torch.save, a safetensors file starts with an 8-byte header '
            f'length and "{{"')


def read_checkpoint(filename: str, map_location='cpu'):
    """Reads a checkpoint from a path or URL.

    safetensors files (timm's releases; recognised by content or the ``.safetensors``
    extension) are read by the safetensors library, which unpickles nothing and does not
    depend on the torch version. Everything else goes through mmengine's
    ``CheckpointLoader`` (with twins_mm's safe unpickling). A local file that is empty, cut
    short or no checkpoint at all raises :class:`UnreadableCheckpointError` naming the file
    and the problem, instead of torch's raw ``EOFError`` / ``KeyError`` / zip errors.
    """
    if '://' in filename:
        try:
            if urlparse(filename).scheme in ('http', 'https') and \
                    urlparse(filename).path.endswith('.safetensors'):
                return _read_safetensors(_fetch(filename), map_location)
            return CheckpointLoader.load_checkpoint(filename, map_location=map_location)
        except (urllib.error.URLError, socket.timeout, ConnectionError) as err:
            name = osp.basename(urlparse(filename).path)
            cache = osp.join(torch.hub.get_dir(), 'checkpoints')
            raise CheckpointDownloadError(
                f'Cannot download {filename} ({err}). Without network access, download it on '
                f'another machine and point the config at the file, e.g. --cfg-options '
                f'model.backbone.init_cfg.checkpoint=/path/to/{name} (or copy it into {cache}).'
            ) from err
    path = osp.expanduser(filename)
    if not osp.isfile(path):
        raise FileNotFoundError(f'Checkpoint {filename} does not exist.')
    size = osp.getsize(path)
    if size == 0:
        raise UnreadableCheckpointError(
            f'{filename} is empty (0 bytes): the download or copy that made it failed.')
    with open(path, 'rb') as f:
        head = f.read(64)
    if _is_safetensors(path, head):
        return _read_safetensors(path, map_location)
    if head.startswith(ZIP_MAGIC) and not zipfile.is_zipfile(path):
        raise UnreadableCheckpointError(
            f'{filename} is truncated or damaged: it begins like a torch.save zip archive but '
            f'its end (the zip central directory) is missing ({size} bytes); download or copy '
            f'it again.')
    if not head.startswith((ZIP_MAGIC, PICKLE_MAGIC)):
        raise UnreadableCheckpointError(f'{filename} is not a checkpoint: '
                                        f'{_describe_unknown(head)}.')
    try:
        return CheckpointLoader.load_checkpoint(filename, map_location=map_location)
    except UntrustedCheckpointError:
        raise
    except (RuntimeError, EOFError, KeyError, ValueError, pickle.UnpicklingError,
            zipfile.BadZipFile) as err:
        detail = str(err) or ('the file ends too early' if isinstance(err, EOFError) else '')
        raise UnreadableCheckpointError(
            f'{filename} ({size} bytes) could not be read as a PyTorch checkpoint, it is '
            f'probably cut short or damaged: {type(err).__name__}: {detail}') from err


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
        raw = read_checkpoint(checkpoint, map_location=map_location)
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
