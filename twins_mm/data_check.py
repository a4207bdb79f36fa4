"""Checks a config's datasets before a runner is built.

Without it a missing dataset surfaces as a stack trace from a dataloader worker (or, for an
empty split, as a sampler that never yields). ``check_datasets`` raises
:class:`DatasetCheckError` whose message is one line: the path, the expected layout and
the command that writes demo data. Two dataset styles are understood:

* folder style (mmseg's ``ADE20KDataset`` and friends): ``data_prefix.img_path`` and
  ``data_prefix.seg_map_path`` directories, annotation = image name with the map suffix;
* annotation-file style (mmdet's ``CocoDataset``): ``ann_file`` plus ``data_prefix.img``.

For a training COCO split with ``filter_cfg``, the number of images that mmdet's
``CocoDataset.filter_data`` will drop is logged (and a split it would empty is an error).
"""
import importlib
import inspect
import json
import os.path as osp
from typing import Iterable, List, Optional

from mmengine.logging import print_log
from PIL import Image

DEMO_COMMANDS = {
    'ade20k': 'python tools/make_demo_data.py ade20k --out data/ade',
    'coco': 'python tools/make_demo_data.py coco --out data/coco',
}
LAYOUTS = {
    'ade20k': ('ADE20K layout <data_root>/images/{training,validation}/*.jpg and '
               '<data_root>/annotations/{training,validation}/*.png (0 = ignore, 1..150)'),
    'coco': ('COCO layout <data_root>/annotations/instances_{train,val}2017.json with '
             'images in <data_root>/{train,val}2017/'),
}
# Scanning every pair's header is cheap (PIL reads headers only); beyond this many pairs the
# sizes of the first ones are checked, the rest is left to the pipeline.
MAX_SIZE_CHECKS = 30000
# Real COCO annotation files are hundreds of MB: only small ones are parsed for emptiness.
MAX_JSON_BYTES = 50 * 1024 * 1024


class DatasetCheckError(ValueError):
    """A dataset a config needs is missing, empty or inconsistent (one-line message)."""


def check_datasets(cfg, splits: Iterable[str] = ('train', 'val')) -> None:
    """Checks the datasets of ``<split>_dataloader`` for each split present in ``cfg``."""
    for split in splits:
        loader = cfg.get(f'{split}_dataloader')
        if not loader:
            continue
        for dataset in _leaf_datasets(loader['dataset']):
            _check_one(cfg, split, dataset)


def _leaf_datasets(dataset) -> List[dict]:
    """Unwraps RepeatDataset / ClassBalancedDataset (``dataset``) and ConcatDataset (``datasets``)."""
    if 'datasets' in dataset:
        return [leaf for d in dataset['datasets'] for leaf in _leaf_datasets(d)]
    if 'dataset' in dataset:
        return _leaf_datasets(dataset['dataset'])
    return [dataset]


def _style(dataset) -> str:
    return 'coco' if dataset.get('ann_file') else 'ade20k'


def _override_hint(split: str, style: str) -> str:
    if style == 'coco':
        # mmdet's COCO bases join data_root into the evaluators' ann_file when the config is
        # read: pointing a config at other data needs both.
        from twins_mm.demo_data.coco import coco_cfg_options
        return ('point every split and the evaluators at your data with `--cfg-options '
                f'{" ".join(coco_cfg_options("PATH"))}`')
    return f'set data_root (e.g. `--cfg-options {split}_dataloader.dataset.data_root=PATH`)'


def _fail(split: str, dataset, problem: str) -> None:
    style = _style(dataset)
    raise DatasetCheckError(
        f'{split} dataset ({dataset.get("type")}): {problem}. Expected the {LAYOUTS[style]}. '
        f'Make demo data with `{DEMO_COMMANDS[style]}` or {_override_hint(split, style)}.')


def _join(root: Optional[str], path: Optional[str]) -> str:
    path = path or ''
    return path if not root or osp.isabs(path) else osp.join(root, path)


def _check_one(cfg, split: str, dataset) -> None:
    root = dataset.get('data_root')
    if root and not osp.isdir(root):
        _fail(split, dataset, f'data_root {root!r} does not exist')
    if _style(dataset) == 'coco':
        _check_annotation_file_style(split, dataset, root)
    else:
        _check_folder_style(split, dataset, root)
    _check_num_classes(cfg, split, dataset)


def _check_annotation_file_style(split, dataset, root) -> None:
    ann_file = _join(root, dataset['ann_file'])
    if not osp.isfile(ann_file):
        _fail(split, dataset, f'annotation file {ann_file!r} does not exist')
    prefix = dataset.get('data_prefix') or {}
    img_dir = _join(root, prefix.get('img', ''))
    if not osp.isdir(img_dir):
        _fail(split, dataset, f'image folder {img_dir!r} does not exist')
    if osp.getsize(ann_file) <= MAX_JSON_BYTES:
        try:
            with open(ann_file) as f:
                coco = json.load(f)
            images = coco.get('images')
        except (ValueError, AttributeError) as e:
            _fail(split, dataset, f'annotation file {ann_file!r} is not COCO JSON ({e})')
        if not images:
            _fail(split, dataset, f'annotation file {ann_file!r} lists no images (empty split)')
        _report_filtered_images(split, dataset, ann_file, coco)


def count_filtered_images(dataset, coco: dict) -> Optional[dict]:
    """How many images mmdet's ``CocoDataset.filter_data`` drops, counted the same way.

    With ``filter_empty_gt`` an image is kept when any annotation (crowd and degenerate boxes
    included: mmdet uses pycocotools' category-to-image index) has a category whose name is
    one of the dataset's classes; then images with ``min(width, height) < min_size`` go.
    None for datasets mmdet does not filter (test mode, no ``filter_cfg``).
    """
    filter_cfg = dataset.get('filter_cfg') or {}
    if dataset.get('test_mode', False) or not filter_cfg:
        return None
    images = coco.get('images') or []
    total = len(images)
    if filter_cfg.get('filter_empty_gt', False):
        classes = _dataset_classes(dataset)
        cat_ids = {c['id'] for c in coco.get('categories') or []
                   if classes is None or c['name'] in classes}
        with_gt = {a['image_id'] for a in coco.get('annotations') or []
                   if a['category_id'] in cat_ids}
        images = [img for img in images if img['id'] in with_gt]
    min_size = filter_cfg.get('min_size', 0)
    kept = [img for img in images if min(img['width'], img['height']) >= min_size]
    return dict(images=total, empty_gt=total - len(images), min_size=len(images) - len(kept),
                kept=len(kept))


def _report_filtered_images(split, dataset, ann_file, coco) -> None:
    counts = count_filtered_images(dataset, coco)
    filter_cfg = dataset.get('filter_cfg') or {}
    if counts is None or not (filter_cfg.get('filter_empty_gt') or counts['min_size']):
        return
    dropped = []
    if filter_cfg.get('filter_empty_gt'):
        dropped.append(f'{counts["empty_gt"]} of {counts["images"]} images in {ann_file!r} '
                       'have no annotation of the dataset\'s classes and are dropped '
                       '(filter_cfg.filter_empty_gt=True)')
    if counts['min_size']:
        n = counts['min_size']
        dropped.append(f'{n} image{"s are" if n > 1 else " is"} smaller than filter_cfg.min_size='
                       f'{filter_cfg["min_size"]} and dropped')
    dropped = ', '.join(dropped)
    if not counts['kept']:
        _fail(split, dataset, f'{dropped}: no image is left to train on (check the category '
              'names against metainfo.classes, or relax filter_cfg)')
    print_log(f'{split} dataset ({dataset.get("type")}): {dropped}; {counts["kept"]} of '
              f'{counts["images"]} images remain.', logger='current')


def _check_folder_style(split, dataset, root) -> None:
    prefix = dataset.get('data_prefix') or {}
    img_dir = _join(root, prefix.get('img_path', ''))
    seg_dir = _join(root, prefix.get('seg_map_path', ''))
    cls = _dataset_class(dataset)
    img_suffix = dataset.get('img_suffix', _default_arg(cls, 'img_suffix', '.jpg'))
    seg_suffix = dataset.get('seg_map_suffix', _default_arg(cls, 'seg_map_suffix', '.png'))
    for kind, folder in (('image', img_dir), ('annotation', seg_dir)):
        if not osp.isdir(folder):
            _fail(split, dataset, f'{kind} folder {folder!r} does not exist')
    images = _list_files(img_dir, img_suffix)
    if not images:
        _fail(split, dataset, f'image folder {img_dir!r} has no *{img_suffix} files (empty split)')
    for rel in images[:MAX_SIZE_CHECKS]:
        seg = osp.join(seg_dir, rel[:-len(img_suffix)] + seg_suffix)
        if not osp.isfile(seg):
            _fail(split, dataset, f'image {osp.join(img_dir, rel)!r} has no annotation {seg!r}')
        img_size, seg_size = _image_size(osp.join(img_dir, rel)), _image_size(seg)
        if img_size != seg_size:
            _fail(split, dataset,
                  f'annotation {seg!r} is {seg_size[0]}x{seg_size[1]} but its image is '
                  f'{img_size[0]}x{img_size[1]} (width x height); they must match')


def _default_arg(cls, name: str, fallback: str) -> str:
    if cls is None:
        return fallback
    param = inspect.signature(cls.__init__).parameters.get(name)
    return fallback if param is None or param.default is inspect.Parameter.empty \
        else param.default


def _list_files(folder: str, suffix: str) -> List[str]:
    from mmengine.fileio import list_dir_or_file
    return sorted(list_dir_or_file(folder, list_dir=False, suffix=suffix, recursive=True))


def _image_size(path: str):
    try:
        with Image.open(path) as im:
            return im.size
    except OSError as e:
        raise DatasetCheckError(f'cannot read {path!r} as an image ({e}); replace or remove '
                                'the file.') from None


def _dataset_class(dataset):
    scope = dataset.get('_scope_') or _default_scope()
    try:
        registry = importlib.import_module(f'{scope}.registry').DATASETS
    except ImportError:
        return None
    return registry.get(dataset.get('type'))


def _default_scope() -> str:
    from mmengine.registry import DefaultScope
    current = DefaultScope.get_current_instance()
    return current.scope_name if current else 'mmengine'


def _dataset_classes(dataset) -> Optional[tuple]:
    metainfo = dataset.get('metainfo') or {}
    if metainfo.get('classes'):
        return tuple(metainfo['classes'])
    cls = _dataset_class(dataset)
    meta = getattr(cls, 'METAINFO', None) or {}
    return tuple(meta['classes']) if meta.get('classes') else None


def _heads_with_classes(model):
    """(config path, num_classes) for the heads whose outputs are the dataset's classes."""
    found = []

    def visit(path, head):
        if isinstance(head, (list, tuple)):
            for i, h in enumerate(head):
                visit(f'{path}.{i}', h)
        elif isinstance(head, dict) and head.get('num_classes') is not None:
            found.append((path, head['num_classes']))

    for key in ('decode_head', 'auxiliary_head', 'bbox_head'):
        visit(f'model.{key}', model.get(key))
    roi_head = model.get('roi_head') or {}
    for key in ('bbox_head', 'mask_head'):
        visit(f'model.roi_head.{key}', roi_head.get(key))
    return found


def _check_num_classes(cfg, split, dataset) -> None:
    classes = _dataset_classes(dataset)
    model = cfg.get('model') or {}
    if model.get('type', '').endswith('TTAModel'):
        model = model.get('module') or {}
    if classes is None:
        return
    for path, num in _heads_with_classes(model):
        if num != len(classes):
            raise DatasetCheckError(
                f'{path}.num_classes is {num} but the {split} dataset ({dataset.get("type")}) '
                f'has {len(classes)} classes; set --cfg-options {path}.num_classes='
                f'{len(classes)} or give the dataset metainfo=dict(classes=[...]) with {num} '
                'names.')
