"""A small synthetic dataset in the exact ADE20K (ADEChallengeData2016) layout.

::

    root/ADEChallengeData2016/images/training/ADE_train_00000001.jpg ...
    root/ADEChallengeData2016/images/validation/ADE_val_00000001.jpg ...
    root/ADEChallengeData2016/annotations/training/ADE_train_00000001.png ...
    root/ADEChallengeData2016/annotations/validation/ADE_val_00000001.png ...

Annotations are single-channel PNGs with ADE20K's values: 0 = ignore ("other"), 1..150 =
the classes, so ``ADE20KDataset`` (``reduce_zero_label=True``) and 150-way heads run
unchanged. Each image is a textured background class with a few textured shapes; the
class fixes shape and colour, so a network learns them quickly. A one-pixel ring around
every shape is labelled 0, like ADE20K's unlabelled boundaries. Deterministic from ``seed``.
"""
import os.path as osp
from typing import Dict

import cv2
import numpy as np
from mmengine.utils import mkdir_or_exist

SUBDIR = 'ADEChallengeData2016'
BACKGROUND = 1  # 'wall'
# ADE20K label value (1-based) -> (shape, colour BGR); the names are ADE20K's classes.
SHAPES: Dict[int, tuple] = {
    3: ('band', (235, 200, 120)),       # sky: a horizontal band at the top
    13: ('ellipse', (60, 80, 200)),     # person
    16: ('rectangle', (40, 140, 60)),   # table
    21: ('triangle', (200, 60, 40)),    # car
}
MAX_OBJECTS = 3


def make_ade20k(root: str, num_train: int = 64, num_val: int = 16, size: int = 128,
                seed: int = 0) -> str:
    """Writes the dataset under ``root`` and returns the data_root (``root/ADEChallengeData2016``)."""
    if num_train < 1 or num_val < 1 or size < 32:
        raise ValueError(f'need num_train >= 1, num_val >= 1 and size >= 32, got '
                         f'{num_train}, {num_val}, {size}.')
    data_root = osp.join(root, SUBDIR)
    rng = np.random.default_rng(seed)
    for split, prefix, count in (('training', 'ADE_train', num_train),
                                 ('validation', 'ADE_val', num_val)):
        img_dir = osp.join(data_root, 'images', split)
        ann_dir = osp.join(data_root, 'annotations', split)
        mkdir_or_exist(img_dir)
        mkdir_or_exist(ann_dir)
        for i in range(1, count + 1):
            image, label = draw_sample(rng, size)
            name = f'{prefix}_{i:08d}'
            cv2.imwrite(osp.join(img_dir, name + '.jpg'), image,
                        [cv2.IMWRITE_JPEG_QUALITY, 95])
            cv2.imwrite(osp.join(ann_dir, name + '.png'), label)
    return data_root


def _texture(rng, h: int, w: int, colour, amplitude: float = 25.) -> np.ndarray:
    """The class colour with stripes of random phase and pixel noise."""
    yy, xx = np.mgrid[0:h, 0:w]
    freq, phase = rng.uniform(0.3, 0.6), rng.uniform(0, 2 * np.pi)
    stripes = np.sin(freq * (xx + yy) + phase)[..., None] * amplitude * 0.6
    noise = rng.normal(0, amplitude * 0.4, (h, w, 1))
    return np.clip(np.asarray(colour, np.float32) + stripes + noise, 0, 255)


def _shape_mask(rng, kind: str, size: int) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    s = int(rng.integers(size // 5, size // 2))
    cx, cy = (int(v) for v in rng.integers(s // 2, size - s // 2, 2))
    if kind == 'band':
        mask[:int(rng.integers(size // 6, size // 3))] = 1
    elif kind == 'ellipse':
        cv2.ellipse(mask, (cx, cy), (s // 3, s // 2), 0, 0, 360, 1, -1)
    elif kind == 'rectangle':
        cv2.rectangle(mask, (cx - s // 2, cy - s // 4), (cx + s // 2, cy + s // 4), 1, -1)
    else:
        pts = np.array([[cx, cy - s // 2], [cx - s // 2, cy + s // 2], [cx + s // 2, cy + s // 2]])
        cv2.fillPoly(mask, [pts.astype(np.int32)], 1)
    return mask.astype(bool)


def draw_sample(rng, size: int):
    """One (BGR uint8 image, uint8 label map) pair."""
    grey = int(rng.integers(90, 170))
    image = _texture(rng, size, size, (grey, grey, grey), amplitude=30.)
    label = np.full((size, size), BACKGROUND, np.uint8)
    classes = list(SHAPES)
    picks = rng.choice(classes, size=int(rng.integers(1, MAX_OBJECTS + 1)), replace=False)
    # The band (sky) is drawn first so that the other shapes may cover it.
    for value in sorted(picks, key=lambda v: SHAPES[v][0] != 'band'):
        kind, colour = SHAPES[int(value)]
        mask = _shape_mask(rng, kind, size)
        image[mask] = _texture(rng, size, size, colour)[mask]
        ring = cv2.dilate(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool) & ~mask
        label[mask] = value
        label[ring] = 0
    return image.astype(np.uint8), label
