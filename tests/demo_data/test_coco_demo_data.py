"""The COCO demo generator writes the exact COCO 2017 layout, deterministically, with boxes
and masks that match the drawn shapes and classes that differ in colour from each other and
from the background (what lets the demo detector learn them in a few minutes of CPU)."""
import filecmp
import json
import os.path as osp

import cv2
import numpy as np
import pytest

from twins_mm.demo_data.coco import (COCO_CATEGORY_IDS, EMPTY_EVERY, SHAPES, coco_cfg_options,
                                     make_coco)

SIZE = (160, 128)


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('coco'))
    return make_coco(root, num_train=24, num_val=6, seed=0, size=SIZE)


def load(root, split):
    with open(osp.join(root, 'annotations', f'instances_{split}2017.json')) as f:
        return json.load(f)


def test_layout_and_categories(dataset):
    from mmdet.datasets import CocoDataset
    for split, count in (('train', 24), ('val', 6)):
        data = load(dataset, split)
        assert [im['id'] for im in data['images']] == list(range(1, count + 1))
        for im in data['images']:
            assert im['file_name'] == f"{im['id']:012d}.jpg"
            assert (im['width'], im['height']) == SIZE
            image = cv2.imread(osp.join(dataset, f'{split}2017', im['file_name']))
            assert image.shape == (SIZE[1], SIZE[0], 3)
        assert [c['id'] for c in data['categories']] == COCO_CATEGORY_IDS
        assert [c['name'] for c in data['categories']] == \
            list(CocoDataset.METAINFO['classes'])
        used = {a['category_id'] for a in data['annotations']}
        names = {c['id']: c['name'] for c in data['categories']}
        assert {names[i] for i in used} <= set(SHAPES)


def test_empty_images_and_border_objects(dataset):
    data = load(dataset, 'train')
    annotated = {a['image_id'] for a in data['annotations']}
    empty = sorted(im['id'] for im in data['images'] if im['id'] not in annotated)
    assert empty == list(range(EMPTY_EVERY, 25, EMPTY_EVERY))
    width, height = SIZE
    on_border = [a for a in data['annotations']
                 if min(a['bbox'][0], a['bbox'][1]) < 1 or
                 a['bbox'][0] + a['bbox'][2] > width - 1 or a['bbox'][1] + a['bbox'][3] > height - 1]
    assert on_border


def test_boxes_and_masks_match_the_drawn_shapes(dataset):
    """The box is the mask's extent, inside the image; the mask's area is the polygon's;
    and the pixels inside the mask have the class's colour."""
    for split in ('train', 'val'):
        data = load(dataset, split)
        names = {c['id']: c['name'] for c in data['categories']}
        images = {im['id']: im for im in data['images']}
        for ann in data['annotations']:
            x, y, w, h = ann['bbox']
            pts = np.array(ann['segmentation'][0]).reshape(-1, 2)
            assert np.allclose(pts.min(axis=0), (x, y), atol=0.02)
            assert np.allclose(pts.max(axis=0), (x + w, y + h), atol=0.02)
            assert x >= 0 and y >= 0 and x + w <= SIZE[0] + 0.01 and y + h <= SIZE[1] + 0.01
            assert 0.25 * min(SIZE) - 1 <= max(w, h) <= 0.5 * min(SIZE) + 1
            assert ann['area'] == pytest.approx(cv2.contourArea(pts.astype(np.float32)),
                                                rel=1e-3)
            image = cv2.imread(osp.join(dataset, f'{split}2017',
                                        images[ann['image_id']]['file_name']))
            mask = np.zeros(image.shape[:2], np.uint8)
            cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 1)
            inner = cv2.erode(mask, np.ones((5, 5), np.uint8)).astype(bool)
            mean = image[inner].mean(axis=0)
            colour = np.array(SHAPES[names[ann['category_id']]][1])
            assert np.abs(mean - colour).max() < 25, (ann, mean, colour)


def test_background_is_grey_and_far_from_every_class_colour(dataset):
    for split in ('train', 'val'):
        data = load(dataset, split)
        annotated = {a['image_id'] for a in data['annotations']}
        for im in data['images']:
            if im['id'] in annotated:
                continue
            image = cv2.imread(osp.join(dataset, f'{split}2017', im['file_name']))
            pixels = image.reshape(-1, 3).astype(np.float64)
            # grey: the channel means differ by little
            means = pixels.mean(axis=0)
            assert means.max() - means.min() < 10, means
            for _, colour in SHAPES.values():
                assert np.abs(means - np.array(colour)).max() > 60


def test_deterministic_from_seed(tmp_path, dataset):
    again = make_coco(str(tmp_path / 'a'), num_train=24, num_val=6, seed=0, size=SIZE)
    other = make_coco(str(tmp_path / 'b'), num_train=24, num_val=6, seed=1, size=SIZE)
    for rel in ('annotations/instances_train2017.json', 'annotations/instances_val2017.json',
                'train2017/000000000001.jpg', 'val2017/000000000002.jpg'):
        assert filecmp.cmp(osp.join(dataset, rel), osp.join(again, rel), shallow=False)
    assert load(dataset, 'train') != load(other, 'train')


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match='at least one image'):
        make_coco(str(tmp_path), num_train=0)
    with pytest.raises(ValueError, match='at least 64x64'):
        make_coco(str(tmp_path), size=(48, 96))


def test_cfg_options_point_every_split_and_evaluator_at_the_root():
    opts = coco_cfg_options('/data/x')
    assert 'train_dataloader.dataset.data_root=/data/x' in opts
    assert 'test_evaluator.ann_file=/data/x/annotations/instances_val2017.json' in opts
    assert len(opts) == 5
