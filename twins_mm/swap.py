"""Put a Twins backbone into any mmdet / mmseg config: what ``tools/misc/swap_backbone.py`` does.

:func:`swap_backbone` reads a source config (a path, or an upstream name such as
``mmdet::dino/dino-4scale_r50_8xb2-12e_coco.py``), finds its backbone and writes a thin
config that inherits the source and changes only what the swap needs:

- the backbone (``_delete_=True``): ``TwinsPCPVT`` / ``TwinsSVT`` of the chosen variant,
  fed to the same levels as the replaced backbone, with the variant's ImageNet weights
  and the drop path rate of twins_mm's own configs;
- every channel key that reads the backbone's maps: the first neck's ``in_channels``,
  or, without a neck, the heads' ``in_channels`` (integers addressed by ``in_index``),
  DeepLabV3+'s ``c1_in_channels``, K-Net's ``kernel_generate_head``, the pixel decoder of
  MaskFormer / Mask2Former, and the heads that read the maps FastFCN's JPU passes through;
- the input normalisation, where the source's is not the ImageNet RGB one the weights
  were trained with (caffe-style configs), and a model-level ``pretrained`` (mmseg);
- Twins' no-decay rules (the PEG ``pos_block`` and the norms) merged into
  ``optim_wrapper.paramwise_cfg.custom_keys``, keeping the source's own keys.

The levels and widths of the replaced backbone are measured, not looked up: the source
backbone is built (without weights) and run once on a 128x128 input; each map's stride
gives the Twins stage that stands in for it (stride 4, 8, 16, 32 = stage 0, 1, 2, 3) and
each map's width is checked against the channel keys before they are rewritten, so a key
the tool misreads is an error instead of a silently wrong config.

Anything the tool cannot map raises :class:`SwapError`, whose message names the key and
what to do; the output file is only written (atomically) when everything mapped.
"""
import copy
import functools
import importlib
import importlib.util
import keyword
import os
import os.path as osp
import re
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple

from mmengine.config import Config

from twins_mm.models.archs import PCPVT_ARCHS, SVT_ARCHS

PRETRAINED_ROOT = 'https://download.openmmlab.com/mmsegmentation/v0.5/pretrain/twins/'
# name: (backbone type, arch, ImageNet checkpoint) (docs/reference.md 6; configs/*).
VARIANTS: Dict[str, Tuple[str, str, str]] = {
    'twins_pcpvt_s': ('TwinsPCPVT', 'small', PRETRAINED_ROOT + 'pcpvt_small_20220308-e638c41c.pth'),
    'twins_pcpvt_b': ('TwinsPCPVT', 'base', PRETRAINED_ROOT + 'pcpvt_base_20220308-0621964c.pth'),
    'twins_pcpvt_l': ('TwinsPCPVT', 'large', PRETRAINED_ROOT + 'pcpvt_large_20220308-37579dc6.pth'),
    'twins_svt_s': ('TwinsSVT', 'small', PRETRAINED_ROOT + 'alt_gvt_small_20220308-7e1c3695.pth'),
    'twins_svt_b': ('TwinsSVT', 'base', PRETRAINED_ROOT + 'alt_gvt_base_20220308-1b7eb711.pth'),
    'twins_svt_l': ('TwinsSVT', 'large', PRETRAINED_ROOT + 'alt_gvt_large_20220308-fb5936f3.pth'),
}
ARCHS = {'TwinsPCPVT': PCPVT_ARCHS, 'TwinsSVT': SVT_ARCHS}
# Twins' no-decay rules, as in configs/_base_/seg_upernet_160k.py and det_schedule_3x.py:
# keys match parameter names by substring (mmengine's DefaultOptimWrapperConstructor).
NO_DECAY_KEYS = ('pos_block', 'norm')
# The ImageNet normalisation of the Twins weights (RGB).
IMAGENET_MEAN = [123.675, 116.28, 103.53]
IMAGENET_STD = [58.395, 57.12, 57.375]
STAGE_OF_STRIDE = {4: 0, 8: 1, 16: 2, 32: 3}
PROBE_SIZE = 128  # input side of the run that measures the source backbone's maps
PACKAGES = ('mmdet', 'mmseg')  # upstream zoos whose installed configs get a pkg:: name
DOC = 'docs/use_in_your_model.md'
# Model keys that are not modules reading the backbone's maps.
NOT_HEADS = ('backbone', 'neck', 'data_preprocessor', 'init_cfg', 'train_cfg', 'test_cfg',
             'pretrained')


class SwapError(ValueError):
    """The source cannot be converted; the message names the key and what to do."""


def _plain(obj):
    """ConfigDicts to dicts (recursively), keeping tuples and lists apart, no ``_scope_``."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items() if k != '_scope_'}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj)
    return obj


# --------------------------------------------------------------------------- the source
def _zoo_root(package: str) -> Optional[str]:
    """The installed config zoo of mmdet / mmseg (``<package>/.mim/configs``), or None."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        return None
    return osp.realpath(osp.join(osp.dirname(spec.origin), '.mim', 'configs'))


def _mmengine_name(package: str, rel: str) -> Optional[str]:
    """``package::rel`` where mmengine can read it as a ``_base_``: its pattern for such
    names takes letters, digits and _ in the first folder (not ``gn+ws``, ``legacy_1.x``)."""
    from mmengine.config.utils import _get_package_and_cfg_path
    name = f'{package}::{rel}'
    try:
        _get_package_and_cfg_path(name)
    except (ValueError, AssertionError):
        return None
    return name


def resolve_source(src: str) -> Tuple[str, Optional[str]]:
    """Returns ``(path, package_name)``: the config file, and ``'pkg::folder/file.py'`` if it
    is a config of an installed upstream zoo (mmdet, mmseg) that mmengine can name, else None
    (then the written config inherits the source by its path).

    ``pkg::`` names resolve as mmengine resolves them in a ``_base_`` (the config inside the
    installed package's ``.mim`` folder, as in a wheel install), so the written ``_base_``
    means the same file on any machine with the same package.
    """
    if '::' in src:
        package, _, rel = src.partition('::')
        root = _zoo_root(package) if package in PACKAGES else None
        if root is None:
            raise SwapError(f'SRC {src}: the tool converts configs of mmdet and mmseg '
                            f'(mmdet::FOLDER/FILE.py, mmseg::FOLDER/FILE.py, installed), or '
                            f'a config path; {package!r} is not one of them or not installed.')
        path = osp.join(root, rel)
        if not osp.isfile(path):
            raise SwapError(f'SRC {src}: no such config in the installed {package} (looked '
                            f'in {root}); check the name, or give a path.')
        return path, _mmengine_name(package, rel)
    path = osp.abspath(osp.expanduser(src))
    if not osp.isfile(path):
        raise SwapError(f'SRC {src}: no such file; give a config path or an upstream name '
                        f'such as mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py.')
    real = osp.realpath(path)
    for package in PACKAGES:
        root = _zoo_root(package)
        if root is not None and real.startswith(root + os.sep):
            return path, _mmengine_name(package, osp.relpath(real, root).replace(os.sep, '/'))
    return path, None


def _in_zoo(path: str) -> bool:
    real = osp.realpath(path)
    return any(root is not None and real.startswith(root + os.sep)
               for root in map(_zoo_root, PACKAGES))


def _find_backbones(node, path: str) -> List[str]:
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == 'backbone' and isinstance(value, dict) and 'type' in value:
                found.append(f'{path}.{key}')
            elif isinstance(value, (dict, list, tuple)):
                found += _find_backbones(value, f'{path}.{key}')
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            found += _find_backbones(value, f'{path}.{i}')
    return found


def _get(root: dict, dotted: str):
    node = root
    for part in dotted.split('.'):
        node = node[int(part)] if isinstance(node, (list, tuple)) else node[part]
    return node


# ------------------------------------------------------------------ the source backbone
_PROBE_CACHE: Dict[Tuple[str, str], Tuple[List[int], List[int]]] = {}


def measure_backbone(backbone_cfg: dict, scope: str, key: str) -> Tuple[List[int], List[int]]:
    """Builds the source backbone without weights, runs it once on a PROBE_SIZE square
    input and returns ``(strides, widths)`` of its output maps, in output order."""
    import torch
    from mmengine.model import revert_sync_batchnorm
    from mmengine.registry import DefaultScope

    cfg = _plain(backbone_cfg)
    for k in ('init_cfg', 'pretrained'):
        cfg.pop(k, None)
    cache_key = (scope, repr(sorted(cfg.items(), key=lambda kv: kv[0])))
    if cache_key in _PROBE_CACHE:
        return _PROBE_CACHE[cache_key]
    try:
        registry = importlib.import_module(f'{scope}.registry').MODELS
        with DefaultScope.overwrite_default_scope(scope):
            model = registry.build(cfg)
        model = revert_sync_batchnorm(model)
        model.eval()  # some backbones' train() returns None
        with torch.no_grad():
            outs = model(torch.zeros(1, 3, PROBE_SIZE, PROBE_SIZE))
    except Exception as err:  # noqa: BLE001  (any failure of a third-party backbone)
        raise SwapError(
            f'{key} (type {cfg.get("type")!r}) could not be built and run to read its output '
            f'levels: {type(err).__name__}: {err}. Install the package that provides it (and '
            f'list it in the config\'s custom_imports), or fix the config so that it '
            f'builds.') from None
    if not isinstance(outs, (list, tuple)):
        raise SwapError(f'{key} (type {cfg.get("type")!r}) returns one tensor, not a tuple of '
                        f'maps, in inference: its head is written for that interface, which '
                        f'Twins (a tuple of maps, one per level) does not have. The tool swaps '
                        f'pyramid backbones; for this design set the backbone and its '
                        f'consumers by hand ({DOC}).')
    strides, widths = [], []
    for i, out in enumerate(outs):
        if not (isinstance(out, torch.Tensor) and out.dim() == 4):
            raise SwapError(f'{key} (type {cfg.get("type")!r}) returns something other than '
                            f'feature maps at output {i} ({type(out).__name__}); the tool '
                            f'swaps backbones that return a tuple of NCHW maps.')
        strides.append(PROBE_SIZE / out.shape[-1])
        widths.append(int(out.shape[1]))
    _PROBE_CACHE[cache_key] = (strides, widths)
    return strides, widths


def _stages_of(bb: dict, key: str, strides: List[float], allow_stride_change: bool,
               ) -> Tuple[List[int], Optional[str]]:
    """The Twins stage standing in for each output map of the source backbone."""
    dilations = tuple(bb.get('dilations') or ())
    out_indices = bb.get('out_indices')
    out_indices = [out_indices] if isinstance(out_indices, int) else list(out_indices or [])
    # ResNet-family backbones (they have a depth) name their stages in out_indices, stage i
    # at stride 4 * 2**i; a dilated one keeps stride 8 or 16 in its last stages instead
    # ("-d8" / "-d16" segmentation configs, "DC5" detectors). Dilation with the usual
    # strides (FastFCN's backbone) maps as usual.
    if ('depth' in bb and any(d > 1 for d in dilations) and len(out_indices) == len(strides)
            and [round(s) for s in strides] != [4 * 2**i for i in out_indices]):
        if not allow_stride_change:
            raise SwapError(
                f'{key}.dilations={dilations} (strides={tuple(bb.get("strides", ()))}): this '
                f'backbone keeps its stages {tuple(out_indices)} at strides '
                f'{_fmt_strides(strides)} by dilation; Twins has no dilated stages, its stages '
                f'0-3 give maps at strides 4, 8, 16, 32. Either start from a config of the '
                f'same head with an undilated backbone (e.g. a "-d32" or FPN config), or pass '
                f'--allow-stride-change to feed the head the same stages of Twins at their '
                f'own strides (coarser maps; the head\'s own dilations stay as they are).')
        if any(not 0 <= i <= 3 for i in out_indices):
            raise SwapError(f'{key}.out_indices={tuple(out_indices)}: Twins has stages 0-3 '
                            f'only; drop the levels outside 0-3 from the source config.')
        note = (f'--allow-stride-change: the source backbone is dilated '
                f'(dilations={dilations}); Twins feeds stages {tuple(out_indices)} at strides '
                f'{", ".join(str(4 * 2 ** i) for i in out_indices)} instead of '
                f'{_fmt_strides(strides)}')
        return out_indices, note
    stages = []
    for i, stride in enumerate(strides):
        rounded = int(round(stride))
        if abs(stride - rounded) > 1e-6 or rounded not in STAGE_OF_STRIDE:
            where = f'{key}.out_indices={tuple(bb["out_indices"])}' if 'out_indices' in bb \
                else key
            raise SwapError(
                f'{where}: output {i} of the source backbone is a map at stride '
                f'{stride:g}; Twins has maps at strides 4, 8, 16, 32 only (stages 0-3). Drop '
                f'that level from the backbone\'s out_indices in the source config (a neck '
                f'such as FPN can make coarser levels itself: num_outs / add_extra_convs).')
        stages.append(STAGE_OF_STRIDE[rounded])
    if len(stages) > 4 or any(b <= a for a, b in zip(stages, stages[1:])):
        where = f'{key}.out_indices={tuple(bb["out_indices"])}' if 'out_indices' in bb else key
        if any(d > 1 for d in dilations):
            where += f' (dilations={dilations})'
        raise SwapError(
            f'{where}: the source backbone returns {len(stages)} maps at strides '
            f'{_fmt_strides(strides)}: not one map per level of a 4-level pyramid (strides 4, '
            f'8, 16, 32, each at most once, in increasing order), which is what Twins gives. '
            f'The tool swaps pyramid backbones (ResNet family, Swin, PVT, MiT, ConvNeXt, '
            f'HRNet, ...); for this design set the backbone and its consumers by hand '
            f'({DOC}).')
    return stages, None


def _fmt_strides(strides) -> str:
    return ', '.join(f'{s:g}' for s in strides)


# ------------------------------------------------------------------ channel rewriting
class _Rewriter:
    """Rewrites the channel keys that read the backbone's output maps, in place."""

    def __init__(self, old_widths: List[int], new_widths: List[int], scope: str):
        self.old = old_widths
        self.new = new_widths
        self.n = len(old_widths)
        self.scope = scope
        self.changes: List[str] = []

    def _position(self, index: int, key: str) -> int:
        pos = index + self.n if index < 0 else index
        if not 0 <= pos < self.n:
            raise SwapError(f'{key}={index}: the backbone feeds {self.n} maps (positions '
                            f'0-{self.n - 1}); the source config reads a map it does not have.')
        return pos

    def _check(self, value: int, pos: int, key: str):
        if value != self.old[pos]:
            raise SwapError(
                f'{key} is {value}, but the source backbone\'s map {pos} (the one this key '
                f'reads) has {self.old[pos]} channels: the tool cannot tell what this key '
                f'counts. Set the channel keys of this config by hand ({DOC}).')

    def set_positions(self, node: dict, name: str, positions: Sequence[int], key: str,
                      why: str):
        old = node[name]
        full = f'{key}.{name}'
        if isinstance(old, int):
            if len(positions) != 1:
                raise SwapError(f'{full} is one number ({old}) but reads {len(positions)} '
                                f'maps; set it by hand ({DOC}).')
            self._check(old, positions[0], full)
            new = self.new[positions[0]]
        else:
            if len(old) != len(positions):
                raise SwapError(
                    f'{full} has {len(old)} entries for the {len(positions)} maps it reads '
                    f'(positions {list(positions)} of the {self.n} the backbone feeds); make '
                    f'them agree in the source config.')
            for value, pos in zip(old, positions):
                self._check(value, pos, full)
            new = type(old)(self.new[p] for p in positions)
        if new != old:
            node[name] = new
            self.changes.append(f'{full}: {_literal(old)} -> {_literal(new)} ({why})')

    # A head that reads the backbone's maps itself.
    def head(self, head: dict, key: str, n_inputs: Optional[int] = None,
             passthrough: Optional[Dict[int, int]] = None):
        """``passthrough``: for heads behind a neck that passes some backbone maps through
        (JPU): input position -> backbone position; other inputs are the neck's own."""
        n_inputs = self.n if n_inputs is None else n_inputs
        htype = head.get('type', '?')
        if 'kernel_generate_head' in head:  # K-Net: the generating head reads the maps
            self.head(head['kernel_generate_head'], f'{key}.kernel_generate_head', n_inputs,
                      passthrough)
        if 'shared_head' in head or ('bbox_roi_extractor' in head and passthrough is None):
            reader = 'shared_head, a ResNet stage,' if 'shared_head' in head else 'the box head'
            raise SwapError(
                f'{key} (type {htype!r}) reads the backbone\'s map without a neck (a C4 / DC5 '
                f'design: the RoI extractor and {reader} take the backbone\'s width); the '
                f'tool does not map it. Start from the FPN version of this detector.')
        unknown = [k for k in head if k.endswith('in_channels')
                   and k not in ('in_channels', 'c1_in_channels')]
        if unknown:
            raise SwapError(f'{key}.{unknown[0]} (head type {htype!r}): the tool does not know '
                            f'which backbone map this key counts; set it by hand ({DOC}).')
        if 'in_channels' in head:
            in_channels = head['in_channels']
            # mmseg's decode heads read input -1 by default; list in_channels without an
            # in_index (MaskFormer / Mask2Former heads, mmdet heads) read every input.
            in_index = head.get('in_index')
            if isinstance(in_channels, int):
                if in_index is None and self.scope == 'mmseg':
                    in_index = -1
                if in_index is None:
                    if n_inputs != 1:
                        raise SwapError(
                            f'{key}.in_channels is one number ({in_channels}) but the '
                            f'backbone feeds {n_inputs} maps and the head has no in_index: '
                            f'the tool cannot tell which map it reads; set it by hand ({DOC}).')
                    in_index = 0
                if not isinstance(in_index, int):
                    raise SwapError(f'{key}.in_index={in_index} is a list but in_channels '
                                    f'({in_channels}) is one number; make them agree.')
                indices = [in_index]
            else:
                if in_index is None:
                    indices = list(range(n_inputs))
                elif isinstance(in_index, int):
                    raise SwapError(f'{key}.in_channels={list(in_channels)} is a list but '
                                    f'in_index={in_index} is one number; make them agree.')
                else:
                    indices = list(in_index)
            positions = [self._input_position(i, n_inputs, f'{key}.in_index', passthrough)
                         for i in indices]
            if all(p is not None for p in positions):
                why = ('the head reads backbone maps ' + ', '.join(map(str, positions))
                       + (' (in_index)' if 'in_index' in head else ''))
                self.set_positions(head, 'in_channels', positions, key, why)
                decoder = head.get('pixel_decoder')
                if isinstance(decoder, dict) and 'in_channels' in decoder:
                    self.set_positions(decoder, 'in_channels', positions,
                                       f'{key}.pixel_decoder',
                                       'the pixel decoder reads the same maps as its head')
            elif any(p is not None for p in positions):
                raise SwapError(f'{key}.in_index={in_index} mixes maps the neck passes through '
                                f'from the backbone with the neck\'s own; set it by hand '
                                f'({DOC}).')
        if 'c1_in_channels' in head:
            # DepthwiseSeparableASPPHead (DeepLabV3+): c1 = the raw input 0 (stride 4).
            pos = self._input_position(0, n_inputs, f'{key}.c1_in_channels', passthrough)
            if pos is not None:
                self.set_positions(head, 'c1_in_channels', [pos], key,
                                   f'DeepLabV3+ low-level branch: backbone map {pos}')

    def _input_position(self, index: int, n_inputs: int, key: str,
                        passthrough: Optional[Dict[int, int]]) -> Optional[int]:
        if passthrough is None:
            return self._position(index, key)
        pos = index + n_inputs if index < 0 else index
        if not 0 <= pos < n_inputs:
            raise SwapError(f'{key}={index}: the neck gives {n_inputs} maps; the source '
                            f'config reads a map it does not have.')
        return passthrough.get(pos)

    def neck(self, neck: dict, key: str) -> Optional[Tuple[int, Dict[int, int]]]:
        """The first neck reads every map of the backbone. Returns, for necks that pass some
        backbone maps through (JPU), (number of outputs, output position -> backbone map)."""
        ntype = neck.get('type', '?')
        if ntype in ('RFP', 'mmdet.RFP'):
            raise SwapError(f'{key} (type RFP, DetectoRS): the recursive feature pyramid runs '
                            f'a second ResNet (rfp_backbone) on the pyramid; it cannot take '
                            f'Twins. Start from a config without RFP (e.g. DetectoRS\' SAC-only '
                            f'configs).')
        unknown = [k for k in neck if k.endswith('in_channels') and k != 'in_channels']
        if unknown:
            raise SwapError(f'{key}.{unknown[0]} (neck type {ntype!r}): the tool does not know '
                            f'which backbone map this key counts; set it by hand ({DOC}).')
        if 'in_channels' not in neck:
            raise SwapError(f'{key} (type {ntype!r}) has no in_channels key; the tool cannot '
                            f'tell how it reads the backbone. Set it by hand ({DOC}).')
        value = neck['in_channels']
        if isinstance(value, int):
            if self.n != 1:
                raise SwapError(f'{key}.in_channels is one number ({value}) but the backbone '
                                f'feeds {self.n} maps; set it by hand ({DOC}).')
            positions = [0]
        else:
            positions = list(range(len(value)))
            if len(value) != self.n:
                raise SwapError(f'{key}.in_channels has {len(value)} entries but the backbone '
                                f'feeds {self.n} maps ({DOC}).')
            if ntype in ('YOLOV3Neck', 'mmdet.YOLOV3Neck'):
                positions.reverse()  # YOLOv3's neck lists the deepest map first
        self.set_positions(neck, 'in_channels', positions, key,
                           f'the neck reads backbone maps {", ".join(map(str, positions))}')
        if ntype in ('JPU', 'mmseg.JPU'):
            # FastFCN's JPU returns the backbone maps start_level..end_level-2 unchanged,
            # then its own map (mmseg JPU.forward).
            start = neck.get('start_level', 0)
            end = neck.get('end_level', -1)
            end = self.n if end == -1 else end
            passthrough = {i - start: i for i in range(start, end - 1)}
            return end - start, passthrough
        return None


# ------------------------------------------------------------------ optimiser rules
@functools.lru_cache(maxsize=None)
def _twins_param_names(btype: str, arch: str) -> Tuple[str, ...]:
    """The backbone's parameter names: built with the variant's depths, attention layout and
    sr ratios but one channel per head (the names do not depend on the widths)."""
    from twins_mm.models import TwinsPCPVT, TwinsSVT
    cls = dict(TwinsPCPVT=TwinsPCPVT, TwinsSVT=TwinsSVT)[btype]
    settings = copy.deepcopy(ARCHS[btype][arch])
    settings['embed_dims'] = list(settings['num_heads'])
    return tuple(name for name, _ in cls(arch=settings).named_parameters())


def _winner(name: str, custom_keys: dict) -> Optional[str]:
    """The key mmengine's DefaultOptimWrapperConstructor applies: the longest matching key,
    ties broken alphabetically."""
    for key in sorted(sorted(custom_keys), key=len, reverse=True):
        if key in name:
            return key
    return None


def _module_key(name: str) -> str:
    """The shortest key that names the module of a PEG / norm parameter only:
    backbone.pos_block, backbone.norm_list, backbone.blocks.0.1.norm (norm1 and norm2),
    backbone.blocks.0.1.attn.norm, backbone.patch_embeds.0.norm."""
    for group in ('pos_block', 'norm_list'):
        if f'.{group}.' in name:
            return name[:name.index(f'.{group}.') + len(group) + 1]
    module = name.rsplit('.', 1)[0]
    return re.sub(r'(norm)\d+$', r'\1', module)


def _is_no_decay(name: str) -> bool:
    return any(k in name for k in NO_DECAY_KEYS)


def _applied(name: str, custom_keys: dict) -> Tuple[Optional[str], dict]:
    """The key mmengine applies to parameter ``name`` and its settings, without entries that
    equal the defaults (lr_mult 1, decay_mult 1)."""
    key = _winner(name, custom_keys)
    rule = {} if key is None else {k: v for k, v in custom_keys[key].items()
                                   if not (k in ('lr_mult', 'decay_mult') and v == 1)}
    return key, rule


def merge_custom_keys(source_keys: dict, param_names: Sequence[str]
                      ) -> Tuple[Dict[str, dict], List[str]]:
    """Twins' no-decay keys merged into the source's ``custom_keys``.

    Returns ``(additions, notes)``: the keys to write in the child config (mmengine merges
    them into the source's dict, so the source's keys stay) and what was done. Each Twins
    parameter must end up with the settings the source gives it, plus ``decay_mult=0`` for the
    PEG (``pos_block``) and the norms. mmengine applies only the longest matching key, so
    where a source key also matches those parameters (e.g. DETR-style ``'backbone':
    dict(lr_mult=0.1)``, longer than ``'norm'``, shorter than ``'pos_block'``), plain
    ``'norm'`` / ``'pos_block'`` keys would lose or drop it: those modules get their own,
    longer keys with the source key's settings and ``decay_mult=0``, as mmdet's Mask2Former
    Swin configs do for Swin's norms. The result is checked parameter by parameter.
    """
    source_keys = {k: dict(v) for k, v in (source_keys or {}).items()}
    additions: Dict[str, dict] = {
        key: dict(decay_mult=0.) for key in NO_DECAY_KEYS
        if source_keys.get(key, {}).get('decay_mult') != 0}

    def merged():
        out = {k: dict(v) for k, v in source_keys.items()}
        for k, v in additions.items():
            out.setdefault(k, {}).update(v)
        return out

    def wanted(name):
        rule = dict(_applied(name, source_keys)[1])
        if _is_no_decay(name):
            rule['decay_mult'] = 0.
        return rule

    current = merged()
    shadowing: Dict[Optional[str], List[str]] = {}
    for name in param_names:
        if _is_no_decay(name) and _applied(name, current)[1] != wanted(name):
            source_key = _applied(name, source_keys)[0]
            shadowing.setdefault(source_key, []).append(name)
            additions[_module_key(name)] = wanted(name)
    notes = []
    for source_key, names in shadowing.items():
        modules = sorted({_module_key(n) for n in names})
        notes.append(
            f'the source key {source_key!r} ({_literal(source_keys.get(source_key))}) also '
            f'matches the backbone\'s PEG / norm parameters and mmengine applies only the '
            f'longest matching key, so {len(modules)} PEG / norm module(s) get their own key '
            f'with its settings and decay_mult=0 (as mmdet\'s Mask2Former Swin configs do)')
    final = merged()
    for name in param_names:  # what mmengine will apply, parameter by parameter
        if _applied(name, final)[1] != wanted(name):
            raise AssertionError(f'custom_keys merge gives {name} {_applied(name, final)}, '
                                 f'wanted {wanted(name)}')
    return additions, notes


# ------------------------------------------------------------------ writing
def _literal(value, indent: int = 0) -> str:
    """Python source for a config value: dict(...) for identifier keys, {...} otherwise."""
    pad = ' ' * (indent + 4)
    if isinstance(value, dict):
        if not value:
            return 'dict()'
        idents = all(isinstance(k, str) and k.isidentifier() and not keyword.iskeyword(k)
                     for k in value)
        items = [(f'{k}=' if idents else f'{k!r}: ') + _literal(v, indent + 4)
                 for k, v in value.items()]
        one_line = ', '.join(items)
        opener, closer = ('dict(', ')') if idents else ('{', '}')
        if len(one_line) + indent < 80 and '\n' not in one_line:
            return f'{opener}{one_line}{closer}'
        return opener + '\n' + ''.join(f'{pad}{it},\n' for it in items) + ' ' * indent + closer
    if isinstance(value, (list, tuple)):
        items = [_literal(v, indent + 4) for v in value]
        opener, closer = ('[', ']') if isinstance(value, list) else ('(', ')')
        if isinstance(value, tuple) and len(value) == 1:
            return f'({items[0]}, )'
        one_line = ', '.join(items)
        if len(one_line) + indent < 80 and '\n' not in one_line:
            return f'{opener}{one_line}{closer}'
        return opener + '\n' + ''.join(f'{pad}{it},\n' for it in items) + ' ' * indent + closer
    if isinstance(value, float):
        return repr(value)
    return repr(value)


def _diff(old, new):
    """What a child config must state so that merging it into ``old`` gives ``new``: changed
    dict keys only (mmengine merges dicts), whole lists (mmengine replaces lists)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = {}
        for k, v in new.items():
            if k not in old:
                out[k] = v
            elif old[k] != v:
                out[k] = _diff(old[k], v)
        return out
    return new


def _nest(path: str, value):
    """``model.detector.backbone``, v -> {'detector': {'backbone': v}} (below ``model``)."""
    parts = path.split('.')[1:]
    for part in reversed(parts):
        value = {part: value}
    return value


class SwapResult:
    """What :func:`convert` found and the text of the config to write."""

    def __init__(self, text: str, changes: List[str], key: str, backbone: dict,
                 source_ref: str):
        self.text = text
        self.key = key
        self.changes = changes
        self.backbone = backbone
        self.source_ref = source_ref
        self.config: Optional[Config] = None  # the written file, read back by mmengine


def convert(src: str, backbone: str, out: Optional[str] = None,
            allow_stride_change: bool = False, backbone_key: Optional[str] = None
            ) -> SwapResult:
    """Builds the text of the thin config (nothing is written); see the module docstring.

    ``out`` is where the text will be written: a local source is inherited by its path
    relative to that folder. ``backbone_key`` picks the backbone where the model has several
    (e.g. ``model.detector.backbone``).
    """
    if backbone not in VARIANTS:
        raise SwapError(f'--backbone {backbone!r} is not a Twins variant; choose one of '
                        f'{", ".join(VARIANTS)}.')
    btype, arch, checkpoint = VARIANTS[backbone]
    path, package_name = resolve_source(src)
    try:
        cfg = Config.fromfile(path)
    except Exception as err:  # noqa: BLE001  (syntax errors, missing bases, ...)
        raise SwapError(f'SRC {src} could not be read as a config: {type(err).__name__}: '
                        f'{err}') from None
    if not isinstance(cfg.get('model'), dict):
        raise SwapError(f'SRC {src} has no `model` dict; give a model config (one that '
                        f'defines model.backbone).')
    root = {'model': _plain(cfg.model)}
    if backbone_key is not None:
        key = backbone_key if backbone_key.startswith('model.') else f'model.{backbone_key}'
        try:
            found = _get(root, key)
        except (KeyError, IndexError, ValueError, TypeError):
            found = None
        if not (isinstance(found, dict) and 'type' in found):
            raise SwapError(f'--backbone-key {backbone_key}: SRC {src} has no backbone dict '
                            f'there; backbones found: {_find_backbones(root["model"], "model")}.')
    else:
        keys = _find_backbones(root['model'], 'model')
        if not keys:
            raise SwapError(f'SRC {src} has no model.backbone (a dict with a type): there is '
                            f'no backbone to replace. Give the config of a model with a '
                            f'backbone.')
        if len(keys) > 1:
            raise SwapError(f'SRC {src} has several backbones ({", ".join(keys)}); choose the '
                            f'one to replace with --backbone-key.')
        key = keys[0]
    parent_key = key.rsplit('.', 1)[0]
    new_root = copy.deepcopy(root)
    parent = _get(new_root, parent_key)
    bb = parent['backbone']

    scope = cfg.get('default_scope') or cfg.model.get('_scope_') or \
        (package_name.split('::')[0] if package_name else None)
    if scope not in PACKAGES:
        raise SwapError(f'SRC {src}: default_scope is {scope!r}; the tool converts mmdet and '
                        f'mmseg models (default_scope = "mmdet" or "mmseg").')
    if cfg.get('custom_imports'):
        try:
            from mmengine.utils import import_modules_from_strings
            import_modules_from_strings(**cfg.custom_imports)
        except ImportError as err:
            raise SwapError(f'SRC {src}: custom_imports could not be imported ({err}); install '
                            f'what the config imports.') from None

    strides, old_widths = measure_backbone(bb, scope, key)
    stages, stride_note = _stages_of(bb, key, strides, allow_stride_change)
    new_widths = [ARCHS[btype][arch]['embed_dims'][s] for s in stages]
    rewriter = _Rewriter(old_widths, new_widths, scope)

    neck = parent.get('neck')
    heads = [k for k, v in parent.items() if k not in NOT_HEADS and (
        (isinstance(v, dict) and 'type' in v) or
        (isinstance(v, (list, tuple)) and v and all(isinstance(h, dict) for h in v)))]
    if neck:
        necks = neck if isinstance(neck, (list, tuple)) else [neck]
        first_key = f'{parent_key}.neck' + ('.0' if isinstance(neck, (list, tuple)) else '')
        through = rewriter.neck(necks[0], first_key)
        if through is not None:
            n_out, passthrough = through
            for hk in heads:
                for i, head in _each(parent[hk]):
                    rewriter.head(head, f'{parent_key}.{hk}' + ('' if i is None else f'.{i}'),
                                  n_out, passthrough)
    else:
        for hk in heads:
            for i, head in _each(parent[hk]):
                rewriter.head(head, f'{parent_key}.{hk}' + ('' if i is None else f'.{i}'))

    changes = []
    drop_path = 0.3 if (scope == 'mmseg' and backbone == 'twins_svt_l') else 0.2
    new_bb = dict(_delete_=True, type=btype, arch=arch, out_indices=tuple(stages),
                  drop_path_rate=drop_path,
                  init_cfg=dict(type='Pretrained', checkpoint=checkpoint))
    old_desc = _describe_backbone(bb)
    changes.append(
        f'{key}: {old_desc} -> {btype} {arch!r} (deleted and rewritten, _delete_=True); '
        f'out_indices={tuple(stages)}: the levels the replaced backbone fed (maps at strides '
        f'{_fmt_strides(strides)} -> Twins stages {tuple(stages)}, widths '
        f'{old_widths} -> {new_widths}); drop_path_rate={drop_path} as twins_mm\'s '
        f'{"segmentation" if scope == "mmseg" else "detection"} configs for this variant; '
        f'ImageNet weights of {backbone} through init_cfg. Settings of the replaced backbone '
        f'(frozen_stages, norm_eval, ...) are not carried over: Twins trains every stage, as '
        f'in twins_mm\'s own configs')
    if stride_note:
        changes.append(stride_note)
    changes += rewriter.changes
    parent['backbone'] = new_bb

    # mmseg's EncoderDecoder hands a model-level `pretrained` to the backbone, which would
    # then have both it and init_cfg.
    for holder_key in sorted({'model', parent_key}):
        holder = _get(new_root, holder_key)
        if holder.get('pretrained') is not None:
            changes.append(f'{holder_key}.pretrained: {holder["pretrained"]!r} -> None (it '
                           f'would be handed to the backbone; the weights come from init_cfg)')
            holder['pretrained'] = None
    changes += _fix_normalisation(new_root, parent_key)

    model_override = _diff(root['model'], new_root['model'])
    # The backbone is written whole (with _delete_), not as a diff.
    _set_nested(model_override, key.split('.')[1:], new_bb)

    optim_text, optim_changes = _optim_override(cfg, key, btype, arch)
    changes += optim_changes

    imports = (cfg.get('custom_imports') or {}).get('imports') or []
    imports = [imports] if isinstance(imports, str) else list(imports)
    if 'twins_mm' not in imports:
        imports.append('twins_mm')

    if package_name is not None:
        base_ref = package_name
    elif _in_zoo(path):
        # An installed upstream config whose folder mmengine cannot name (gn+ws, legacy_1.x).
        base_ref = path
        changes.insert(0, '_base_: the source by its path: mmengine cannot read its '
                          'package name (pkg::FOLDER/FILE.py) as a _base_, its pattern for '
                          'folder names takes letters, digits and _ only')
    elif out is not None:
        try:
            base_ref = osp.relpath(path, osp.dirname(osp.abspath(out)))
        except ValueError:  # another drive (Windows)
            base_ref = path
    else:
        base_ref = path
    text = _render(src, backbone, base_ref, imports, model_override, optim_text, changes)
    return SwapResult(text, changes, key, new_bb, base_ref)


def _each(value):
    if isinstance(value, (list, tuple)):
        return list(enumerate(value))
    return [(None, value)]


def _set_nested(tree: dict, parts: List[str], value):
    for part in parts[:-1]:
        tree = tree.setdefault(part, {})
    tree[parts[-1]] = value


def _describe_backbone(bb: dict) -> str:
    extra = [f'{k} {bb[k]}' for k in ('depth', 'arch') if k in bb and not isinstance(bb[k], dict)]
    return f'{bb["type"]}' + (f' ({", ".join(extra)})' if extra else '')


def _fix_normalisation(root: dict, parent_key: str) -> List[str]:
    changes = []
    candidates = ['model.data_preprocessor', 'model.data_preprocessor.data_preprocessor']
    if parent_key != 'model':
        candidates.append(f'{parent_key}.data_preprocessor')
    for ck in candidates:
        try:
            dp = _get(root, ck)
        except (KeyError, IndexError, TypeError, ValueError):
            continue
        if not isinstance(dp, dict) or dp.get('mean') is None:
            continue
        mean, std = list(dp['mean']), list(dp.get('std') or [1., 1., 1.])
        rgb = bool(dp.get('bgr_to_rgb', False))
        same = (len(mean) == 3 and all(abs(a - b) < 1e-3 for a, b in zip(mean, IMAGENET_MEAN))
                and all(abs(a - b) < 1e-3 for a, b in zip(std, IMAGENET_STD)) and rgb)
        if not same:
            changes.append(
                f'{ck}: mean={mean}, std={std}, bgr_to_rgb={dp.get("bgr_to_rgb")} -> the '
                f'ImageNet RGB normalisation the Twins weights were trained with')
            dp['mean'], dp['std'], dp['bgr_to_rgb'] = list(IMAGENET_MEAN), list(IMAGENET_STD), \
                True
    return changes


def _optim_override(cfg: Config, key: str, btype: str, arch: str) -> Tuple[Optional[dict],
                                                                           List[str]]:
    optim = cfg.get('optim_wrapper')
    if not isinstance(optim, dict):
        return None, ['no optim_wrapper in the source: Twins\' no-decay rules not added (add '
                      'them where the optimiser is set: custom_keys pos_block and norm with '
                      'decay_mult=0.)']
    constructor = optim.get('constructor', 'DefaultOptimWrapperConstructor')
    if constructor not in ('DefaultOptimWrapperConstructor',
                           'ForceDefaultOptimWrapperConstructor'):
        raise SwapError(
            f'optim_wrapper.constructor={constructor!r}: this constructor gives learning rates '
            f'by the replaced backbone\'s parameter names (e.g. layer-wise decay for ConvNeXt / '
            f'BEiT) and does not know Twins\' names. Remove it from the source config (or '
            f'start from a config without it) so that Twins\' no-decay rules apply.')
    paramwise = optim.get('paramwise_cfg') or {}
    prefix = '.'.join(key.split('.')[1:]) + '.'
    names = [prefix + n for n in _twins_param_names(btype, arch)]
    additions, notes = merge_custom_keys(_plain(paramwise.get('custom_keys') or {}), names)
    changes = []
    if additions:
        kept = sorted(set((paramwise.get('custom_keys') or {})))
        changes.append(
            f'optim_wrapper.paramwise_cfg.custom_keys: added {len(additions)} key(s): no '
            f'weight decay on the PEG (pos_block) and the norms, as twins_mm\'s own configs '
            f'(keys match parameter names by substring: "norm" also matches the heads\' '
            f'norms); the source\'s keys {kept} are kept (mmengine merges the dicts)')
        changes += [f'optim_wrapper.paramwise_cfg.custom_keys: {n}' for n in notes]
    return (dict(paramwise_cfg=dict(custom_keys=additions)) if additions else None), changes


def _render(src, backbone, base_ref, imports, model_override, optim_override, changes) -> str:
    lines = [
        f'# {backbone} in {src}: written by tools/misc/swap_backbone.py.',
        '# It inherits the source config and changes only what the backbone swap needs:',
    ]
    for change in changes:
        words, line = change.split(' '), '# -'
        for word in words:
            if len(line) + 1 + len(word) > 95:
                lines.append(line)
                line = '#  '
            line += ' ' + word
        lines.append(line)
    lines += [
        f'_base_ = [{base_ref!r}]',
        '# Registers TwinsPCPVT / TwinsSVT in the mmdet and mmseg registries.',
        f'custom_imports = dict(imports={imports!r}, allow_failed_imports=False)',
        f'model = {_literal(model_override)}',
    ]
    if optim_override is not None:
        lines.append(f'optim_wrapper = {_literal(optim_override)}')
    return '\n'.join(lines) + '\n'


def swap_backbone(src: str, backbone: str, out: str, allow_stride_change: bool = False,
                  backbone_key: Optional[str] = None) -> SwapResult:
    """Converts ``src`` (see :func:`convert`) and writes the config to ``out``: to a temporary
    file next to it, checked by reading it back with mmengine, then renamed, so a failure
    never leaves a partial file."""
    result = convert(src, backbone, out, allow_stride_change, backbone_key)
    folder = osp.dirname(osp.abspath(out))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix='.py', prefix='.swap_backbone_', dir=folder)
    try:
        with os.fdopen(fd, 'w') as f:
            f.write(result.text)
        check = Config.fromfile(tmp)
        written = _get({'model': check.model}, result.key)
        if written.get('type') != result.backbone['type']:
            raise SwapError(f'{out}: the written config does not read back with the Twins '
                            f'backbone (got {written.get("type")!r}).')
        os.replace(tmp, out)
        result.config = check
    except BaseException:
        if osp.exists(tmp):
            os.remove(tmp)
        raise
    return result

