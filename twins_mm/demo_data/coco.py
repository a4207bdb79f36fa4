"""A small synthetic dataset in the exact COCO 2017 detection / instance layout.

::

    root/annotations/instances_train2017.json
    root/annotations/instances_val2017.json
    root/train2017/000000000001.jpg ...
    root/val2017/000000000001.jpg ...

Objects are flat-coloured shapes on a noisy grey background, each with a box and a polygon
mask. The class fixes both shape and colour (a yellow disc, a red octagon, a blue triangle),
and the background is nearly colourless, so colour alone separates the classes from each
other and from the background and a detector learns them quickly. The JSON lists all
80 COCO categories under their real ids and uses three of them, so the COCO configs run
unchanged (80-way heads, mmdet's default class names). About one image in six has no
objects, and about a quarter of the objects touch the image border. Everything is
deterministic from ``seed``.
"""
import json
import math
import os.path as osp
from typing import List, Sequence, Tuple

import cv2
import numpy as np
from mmengine.utils import mkdir_or_exist

# The ten ids COCO 2017 leaves out of 1..90; the remaining 80 follow mmdet's class order.
_COCO_UNUSED_IDS = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}
COCO_CATEGORY_IDS = [i for i in range(1, 91) if i not in _COCO_UNUSED_IDS]

# name -> (polygon corners, 0 = disc, colour BGR)
SHAPES = {
    'sports ball': (0, (30, 210, 245)),
    'stop sign': (8, (40, 40, 220)),
    'kite': (3, (220, 90, 30)),
}
EMPTY_EVERY = 6
BORDER_PROB = 0.25
# object side as a fraction of the image's shorter side
SIDE_RANGE = (0.25, 0.5)
DISC_CORNERS = 24


def coco_categories() -> List[dict]:
    from mmdet.datasets import CocoDataset
    names = CocoDataset.METAINFO['classes']
    return [dict(id=i, name=n, supercategory='demo') for i, n in zip(COCO_CATEGORY_IDS, names)]


def shape_polygon(corners: int, x: float, y: float, side: float) -> np.ndarray:
    """Vertices (K, 2) of a shape inscribed in the square box (x, y, side, side)."""
    cx, cy, r = x + side / 2, y + side / 2, side / 2
    if corners == 3:
        return np.array([[cx, y], [x + side, y + side], [x, y + side]], dtype=np.float64)
    n = corners or DISC_CORNERS
    # Octagons get flat top/bottom edges; every vertex stays inside the box.
    phase = math.pi / n if corners == 8 else 0.
    t = np.arange(n) * 2 * math.pi / n + phase
    pts = np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)
    return pts


def polygon_area(pts: np.ndarray) -> float:
    x, y = pts[:, 0], pts[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


def _overlaps(box, boxes, margin=2.):
    x, y, s = box
    return any(x < bx + bs + margin and bx < x + s + margin and
               y < by + bs + margin and by < y + s + margin for bx, by, bs in boxes)


def _place(rng: np.random.Generator, width: int, height: int, boxes) -> Tuple[float, float, float]:
    """A square box that does not overlap ``boxes``; sometimes flush with an image edge."""
    for _ in range(50):
        side = float(rng.uniform(*SIDE_RANGE) * min(width, height))
        x = float(rng.uniform(0, width - side))
        y = float(rng.uniform(0, height - side))
        if rng.random() < BORDER_PROB:
            edge = rng.integers(4)
            x = 0. if edge == 0 else (width - side if edge == 1 else x)
            y = 0. if edge == 2 else (height - side if edge == 3 else y)
        if not _overlaps((x, y, side), boxes):
            return x, y, side
    return None


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Grey (each channel within 8 of the others) with noise and a horizontal ramp."""
    base = rng.integers(80, 170) + rng.integers(-4, 5, size=3)
    noise = rng.normal(0, 12, size=(height, width, 3))
    ramp = np.linspace(-20, 20, width)[None, :, None]
    return np.clip(base + noise + ramp, 0, 255).astype(np.uint8)


def _write_split(root: str, split: str, num_images: int, rng: np.random.Generator,
                 size: Tuple[int, int], categories: List[dict]) -> dict:
    width, height = size
    img_dir = osp.join(root, f'{split}2017')
    mkdir_or_exist(img_dir)
    name_to_id = {c['name']: c['id'] for c in categories}
    names = list(SHAPES)
    images, annotations = [], []
    for index in range(num_images):
        image_id = index + 1
        file_name = f'{image_id:012d}.jpg'
        img = _background(rng, width, height)
        boxes = []
        num_objects = 0 if index % EMPTY_EVERY == EMPTY_EVERY - 1 else int(rng.integers(1, 4))
        for _ in range(num_objects):
            box = _place(rng, width, height, boxes)
            if box is None:
                continue
            boxes.append(box)
            name = names[int(rng.integers(len(names)))]
            corners, colour = SHAPES[name]
            pts = shape_polygon(corners, *box)
            cv2.fillPoly(img, [np.round(pts).astype(np.int32)], colour, lineType=cv2.LINE_AA)
            x0, y0 = pts.min(axis=0)
            x1, y1 = pts.max(axis=0)
            annotations.append(dict(
                id=len(annotations) + 1, image_id=image_id, category_id=name_to_id[name],
                bbox=[round(float(v), 2) for v in (x0, y0, x1 - x0, y1 - y0)],
                area=round(polygon_area(pts), 2), iscrowd=0,
                segmentation=[[round(float(v), 2) for v in pts.reshape(-1)]]))
        cv2.imwrite(osp.join(img_dir, file_name), img, [cv2.IMWRITE_JPEG_QUALITY, 95])
        images.append(dict(id=image_id, file_name=file_name, width=width, height=height))
    return dict(info=dict(description=f'twins_mm demo COCO {split}2017'), licenses=[],
                images=images, annotations=annotations, categories=categories)


def make_coco(root: str, num_train: int = 96, num_val: int = 24, seed: int = 0,
              size: Sequence[int] = (320, 256)) -> str:
    """Writes the demo dataset under ``root`` and returns ``root``.

    Args:
        root: the dataset root (what a config calls ``data_root``).
        num_train / num_val: images per split.
        seed: the same seed writes the same files.
        size: (width, height) of every image.
    """
    if num_train < 1 or num_val < 1:
        raise ValueError(f'make_coco needs at least one image per split, got '
                         f'num_train={num_train}, num_val={num_val}.')
    width, height = (int(s) for s in size)
    if min(width, height) < 64:
        raise ValueError(f'make_coco: size must be at least 64x64, got {width}x{height}.')
    categories = coco_categories()
    mkdir_or_exist(osp.join(root, 'annotations'))
    for offset, (split, count) in enumerate((('train', num_train), ('val', num_val))):
        rng = np.random.default_rng([seed, offset])
        data = _write_split(root, split, count, rng, (width, height), categories)
        with open(osp.join(root, 'annotations', f'instances_{split}2017.json'), 'w') as f:
            json.dump(data, f)
    return root


def coco_cfg_options(data_root: str) -> List[str]:
    """``--cfg-options`` that point an mmdet COCO config at the dataset under ``data_root``.

    mmdet's COCO bases join ``data_root`` into the evaluators' ``ann_file`` when the config is
    read, so overriding ``data_root`` alone would leave them on data/coco/.
    """
    opts = [f'{split}_dataloader.dataset.data_root={data_root}'
            for split in ('train', 'val', 'test')]
    ann = osp.join(data_root, 'annotations', 'instances_val2017.json')
    return opts + [f'val_evaluator.ann_file={ann}', f'test_evaluator.ann_file={ann}']
