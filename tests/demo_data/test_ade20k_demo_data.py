"""The ADE20K demo generator writes the exact layout, deterministically, with labels that
mean what ADE20K's do and content whose class fixes shape and colour."""
import filecmp
import glob
import os.path as osp

import cv2
import numpy as np
import pytest

from twins_mm.demo_data.ade20k import BACKGROUND, SHAPES, make_ade20k


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('ade'))
    return make_ade20k(root, num_train=6, num_val=3, size=64, seed=0)


def test_layout(dataset):
    assert osp.basename(dataset) == 'ADEChallengeData2016'
    for split, prefix, count in (('training', 'ADE_train', 6), ('validation', 'ADE_val', 3)):
        images = sorted(glob.glob(osp.join(dataset, 'images', split, '*.jpg')))
        labels = sorted(glob.glob(osp.join(dataset, 'annotations', split, '*.png')))
        assert [osp.basename(p) for p in images] == \
            [f'{prefix}_{i:08d}.jpg' for i in range(1, count + 1)]
        assert [osp.basename(p)[:-4] for p in labels] == [osp.basename(p)[:-4] for p in images]


def test_labels_are_ade20k_values(dataset):
    seen = set()
    for path in glob.glob(osp.join(dataset, 'annotations', '*', '*.png')):
        label = cv2.imread(path, cv2.IMREAD_UNCHANGED)
        assert label.dtype == np.uint8 and label.ndim == 2 and label.shape == (64, 64)
        values = set(np.unique(label).tolist())
        assert values <= {0, BACKGROUND, *SHAPES}
        assert BACKGROUND in values and values & set(SHAPES)
        seen |= values
    assert 0 in seen  # the unlabelled rings


def test_class_fixes_colour(dataset):
    """Mean colour inside each class region is close to that class's colour, across images."""
    for value, (_, colour) in SHAPES.items():
        means = []
        for path in glob.glob(osp.join(dataset, 'annotations', '*', '*.png')):
            label = cv2.imread(path, cv2.IMREAD_UNCHANGED)
            mask = label == value
            if mask.sum() >= 20:
                image = cv2.imread(path.replace('annotations', 'images')[:-4] + '.jpg')
                means.append(image[mask].mean(axis=0))
        for mean in means:
            assert np.abs(mean - np.array(colour)).max() < 40, (value, mean)


def test_deterministic_from_seed(tmp_path, dataset):
    again = make_ade20k(str(tmp_path / 'a'), num_train=6, num_val=3, size=64, seed=0)
    other = make_ade20k(str(tmp_path / 'b'), num_train=6, num_val=3, size=64, seed=1)
    rel = 'annotations/training/ADE_train_00000001.png'
    same_img = 'images/training/ADE_train_00000001.jpg'
    assert filecmp.cmp(osp.join(dataset, rel), osp.join(again, rel), shallow=False)
    assert filecmp.cmp(osp.join(dataset, same_img), osp.join(again, same_img), shallow=False)
    assert not filecmp.cmp(osp.join(dataset, same_img), osp.join(other, same_img),
                           shallow=False)


def test_rejects_impossible_sizes(tmp_path):
    with pytest.raises(ValueError, match='size >= 32'):
        make_ade20k(str(tmp_path), size=8)
