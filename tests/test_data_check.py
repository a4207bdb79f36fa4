"""The dataset check run by tools/train.py and tools/test.py: one-line errors for missing,
empty or inconsistent data; grayscale and RGBA images are handled (3-channel inputs)."""
import json
import os
import os.path as osp
import subprocess
import sys

import cv2
import numpy as np
import pytest
from mmengine.config import Config
from mmengine.registry import init_default_scope

from twins_mm import data_check
from twins_mm.data_check import DatasetCheckError, check_datasets
from twins_mm.demo_data.ade20k import make_ade20k

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
SEG_CONFIG = osp.join(REPO, 'configs', 'fpn_twins_svt_s_80k.py')
DET_CONFIG = osp.join(REPO, 'configs', 'retinanet_twins_pcpvt_s_1x.py')


def seg_cfg(data_root):
    cfg = Config.fromfile(SEG_CONFIG)
    for split in ('train', 'val', 'test'):
        cfg[f'{split}_dataloader'].dataset.data_root = data_root
    init_default_scope('mmseg')
    return cfg


@pytest.fixture
def data_root(tmp_path):
    return make_ade20k(str(tmp_path), num_train=3, num_val=2, size=64, seed=0)


def one_line_error(cfg, splits=('train', 'val')) -> str:
    with pytest.raises(DatasetCheckError) as info:
        check_datasets(cfg, splits)
    message = str(info.value)
    assert '\n' not in message
    return message


def test_demo_data_passes(data_root):
    check_datasets(seg_cfg(data_root), ('train', 'val', 'test'))


def test_missing_data_root(tmp_path):
    missing = str(tmp_path / 'nowhere' / 'ADEChallengeData2016')
    message = one_line_error(seg_cfg(missing))
    assert repr(missing) in message
    assert 'ADE20K layout' in message and 'images/{training,validation}' in message
    assert 'python tools/make_demo_data.py ade20k' in message


def test_missing_coco_for_the_detection_example(tmp_path):
    cfg = Config.fromfile(DET_CONFIG)
    init_default_scope('mmdet')
    missing = str(tmp_path / 'coco') + '/'
    for split in ('train', 'val', 'test'):
        cfg[f'{split}_dataloader'].dataset.data_root = missing
    message = one_line_error(cfg)
    assert missing in message and 'COCO layout' in message
    assert 'python tools/make_demo_data.py coco' in message
    # pointing the config at other data also needs the evaluators' ann_file
    for split in ('val', 'test'):
        assert f'{split}_evaluator.ann_file=PATH/annotations/instances_val2017.json' in message


def test_empty_split(data_root):
    folder = osp.join(data_root, 'images', 'validation')
    for name in os.listdir(folder):
        os.remove(osp.join(folder, name))
    message = one_line_error(seg_cfg(data_root))
    assert 'empty split' in message and repr(folder) in message


def test_image_without_annotation(data_root):
    annotation = osp.join(data_root, 'annotations', 'training', 'ADE_train_00000002.png')
    os.remove(annotation)
    message = one_line_error(seg_cfg(data_root))
    assert repr(annotation) in message and 'has no annotation' in message


def test_annotation_of_the_wrong_size(data_root):
    annotation = osp.join(data_root, 'annotations', 'validation', 'ADE_val_00000001.png')
    cv2.imwrite(annotation, np.ones((40, 64), np.uint8))
    message = one_line_error(seg_cfg(data_root))
    assert repr(annotation) in message
    assert 'is 64x40 but its image is 64x64' in message


def test_num_classes_that_disagrees_with_the_dataset(data_root):
    cfg = seg_cfg(data_root)
    cfg.model.decode_head.num_classes = 19
    message = one_line_error(cfg)
    assert 'model.decode_head.num_classes is 19' in message and 'has 150 classes' in message
    cfg.model.decode_head.num_classes = 150
    cfg.train_dataloader.dataset.metainfo = dict(classes=('wall', 'sky', 'person'))
    message = one_line_error(cfg)
    assert 'has 3 classes' in message


def test_grayscale_and_rgba_images_become_three_channel_inputs(data_root):
    images = osp.join(data_root, 'images', 'training')
    gray = osp.join(images, 'ADE_train_00000001.jpg')
    cv2.imwrite(gray, cv2.imread(gray, cv2.IMREAD_GRAYSCALE))
    assert cv2.imread(gray, cv2.IMREAD_UNCHANGED).ndim == 2
    rgba = osp.join(images, 'ADE_train_00000002.jpg')
    bgra = cv2.cvtColor(cv2.imread(rgba), cv2.COLOR_BGR2BGRA)
    bgra[..., 3] = 128
    ok, png = cv2.imencode('.png', bgra)  # 4 channels; JPEG cannot hold alpha
    with open(rgba, 'wb') as f:
        f.write(png.tobytes())
    assert cv2.imread(rgba, cv2.IMREAD_UNCHANGED).shape[-1] == 4

    cfg = seg_cfg(data_root)
    check_datasets(cfg, ('train', ))
    from mmseg.registry import DATASETS
    dataset_cfg = cfg.train_dataloader.dataset
    dataset_cfg.pipeline = [p for p in dataset_cfg.pipeline
                            if p['type'] not in ('RandomResize', 'RandomCrop')]
    dataset = DATASETS.build(dataset_cfg)
    names = [osp.basename(dataset.get_data_info(i)['img_path']) for i in range(len(dataset))]
    for name in ('ADE_train_00000001.jpg', 'ADE_train_00000002.jpg'):
        sample = dataset[names.index(name)]
        assert tuple(sample['inputs'].shape) == (3, 64, 64)
        assert tuple(sample['data_samples'].gt_sem_seg.data.shape) == (1, 64, 64)


def test_train_tool_stops_with_one_line(tmp_path):
    missing = str(tmp_path / 'ADEChallengeData2016')
    proc = subprocess.run(
        [sys.executable, 'tools/train.py', SEG_CONFIG, '--work-dir', str(tmp_path / 'w'),
         '--cfg-options', f'train_dataloader.dataset.data_root={missing}'],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert 'Traceback' not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith('error: train dataset (ADE20KDataset): data_root')
    assert missing in last and 'make_demo_data.py ade20k' in last
    assert not (tmp_path / 'w').exists()


# filter_cfg of a COCO training split: the images mmdet will drop are counted up front.
TINY_CLASSES = ('cat_a', 'cat_b')


def tiny_coco(tmp_path, annotations, sizes=None) -> dict:
    """Six 64x48 images (ids 1..6), categories cat_a=1, cat_b=2, cat_c=3; a train dataset cfg."""
    sizes = sizes or {}
    (tmp_path / 'images').mkdir(exist_ok=True)
    coco = dict(
        images=[dict(id=i, file_name=f'{i}.jpg', width=sizes.get(i, (64, 48))[0],
                     height=sizes.get(i, (64, 48))[1]) for i in range(1, 7)],
        categories=[dict(id=i + 1, name=n) for i, n in enumerate(TINY_CLASSES + ('cat_c', ))],
        annotations=[dict(id=k, image_id=img, category_id=cat, bbox=[4, 4, w, 10], area=w * 10,
                          iscrowd=crowd) for k, (img, cat, w, crowd) in enumerate(annotations)])
    (tmp_path / 'ann.json').write_text(json.dumps(coco))
    return dict(type='CocoDataset', data_root=str(tmp_path), ann_file='ann.json',
                data_prefix=dict(img='images/'), metainfo=dict(classes=TINY_CLASSES),
                filter_cfg=dict(filter_empty_gt=True, min_size=32), pipeline=[])


def logged_check(monkeypatch, dataset) -> list:
    logged = []
    monkeypatch.setattr(data_check, 'print_log', lambda msg, **kw: logged.append(msg))
    init_default_scope('mmdet')
    check_datasets(Config(dict(train_dataloader=dict(dataset=dataset))), ('train', ))
    return logged


def test_filter_empty_gt_count_matches_mmdet(tmp_path, monkeypatch):
    dataset = tiny_coco(tmp_path, [
        (1, 1, 10, 0),  # a normal box of cat_a: kept
        (2, 2, 10, 1),  # only a crowd box of cat_b: mmdet keeps it
        (4, 3, 10, 0),  # only a category outside the dataset's classes: dropped
        (5, 1, 0, 0),   # only a degenerate (zero-width) box of cat_a: mmdet keeps it
        (6, 2, 10, 0),  # a box, but the image is 20x40, under min_size=32: dropped
    ], sizes={6: (20, 40)})  # image 3 has no annotation at all: dropped
    (message, ) = logged_check(monkeypatch, dataset)
    assert message.startswith('train dataset (CocoDataset): 2 of 6 images in ')
    assert "have no annotation of the dataset's classes" in message
    assert 'filter_cfg.filter_empty_gt=True' in message
    assert '1 image is smaller than filter_cfg.min_size=32 and dropped' in message
    assert message.endswith('3 of 6 images remain.')

    from mmdet.registry import DATASETS
    built = DATASETS.build(dataset)
    assert sorted(built.get_data_info(i)['img_id'] for i in range(len(built))) == [1, 2, 5]
    coco = json.loads((tmp_path / 'ann.json').read_text())
    counts = data_check.count_filtered_images(dataset, coco)
    assert counts == dict(images=6, empty_gt=2, min_size=1, kept=3)


def test_no_count_without_filter_or_in_test_mode(tmp_path, monkeypatch):
    dataset = tiny_coco(tmp_path, [(1, 1, 10, 0)])
    assert logged_check(monkeypatch, {**dataset, 'test_mode': True}) == []
    assert logged_check(monkeypatch, {**dataset, 'filter_cfg': None}) == []
    (message, ) = logged_check(monkeypatch, {**dataset, 'filter_cfg': dict(min_size=0,
                                                                          filter_empty_gt=True)})
    assert '5 of 6 images' in message and message.endswith('1 of 6 images remain.')


def test_filter_that_drops_every_image_is_an_error(tmp_path, monkeypatch):
    dataset = tiny_coco(tmp_path, [(1, 3, 10, 0)])  # only cat_c, not a dataset class
    init_default_scope('mmdet')
    message = one_line_error(Config(dict(train_dataloader=dict(dataset=dataset))), ('train', ))
    assert '6 of 6 images' in message and 'no image is left to train on' in message


# ----------------------------------------------------------------------------- COCO image
# folder, unreadable images, dataset wrappers, annotation files that are not COCO
def test_missing_coco_image_folder(tmp_path):
    dataset = tiny_coco(tmp_path, [(1, 1, 10, 0)])
    os.rmdir(tmp_path / 'images')
    init_default_scope('mmdet')
    message = one_line_error(Config(dict(train_dataloader=dict(dataset=dataset))), ('train', ))
    assert f"image folder {str(tmp_path / 'images') + '/'!r} does not exist" in message
    assert 'COCO layout' in message and 'make_demo_data.py coco' in message


def test_unreadable_image_is_named(data_root):
    image = osp.join(data_root, 'images', 'validation', 'ADE_val_00000002.jpg')
    with open(image, 'wb') as f:
        f.write(b'<html>404 Not Found</html>')
    message = one_line_error(seg_cfg(data_root))
    assert message.startswith(f'cannot read {image!r} as an image')
    assert 'replace or remove the file' in message


@pytest.mark.parametrize('wrapper', ['RepeatDataset', 'ClassBalancedDataset', 'ConcatDataset'])
def test_datasets_inside_wrappers_are_checked(data_root, tmp_path, wrapper):
    """The datasets inside RepeatDataset / ClassBalancedDataset (``dataset``) and
    ConcatDataset (``datasets``, the second one broken here) are checked one by one."""
    cfg = seg_cfg(data_root)
    good = cfg.train_dataloader.dataset
    missing = str(tmp_path / 'second_ade')
    bad = Config(dict(good.to_dict(), data_root=missing))
    if wrapper == 'ConcatDataset':
        cfg.train_dataloader.dataset = dict(type=wrapper, datasets=[good, bad])
    else:
        cfg.train_dataloader.dataset = dict(type=wrapper, dataset=bad, times=2, oversample_thr=0.1)
    message = one_line_error(cfg, ('train', ))
    assert message.startswith(f'train dataset (ADE20KDataset): data_root {missing!r} does not '
                              'exist')
    cfg.train_dataloader.dataset = (dict(type=wrapper, datasets=[good, good])
                                    if wrapper == 'ConcatDataset' else
                                    dict(type=wrapper, dataset=good, times=2))
    check_datasets(cfg, ('train', ))


@pytest.mark.parametrize('content,problem', [
    ('{"images": [1, 2', 'is not COCO JSON'),        # cut short
    ('[{"file_name": "1.jpg"}]', 'is not COCO JSON'),  # a list, e.g. an ODGT / label file
    ('{"annotations": []}', 'lists no images (empty split)'),
    ('not json at all', 'is not COCO JSON'),
])
def test_annotation_file_that_is_not_coco(tmp_path, content, problem):
    dataset = tiny_coco(tmp_path, [(1, 1, 10, 0)])
    ann_file = tmp_path / 'ann.json'
    ann_file.write_text(content)
    init_default_scope('mmdet')
    message = one_line_error(Config(dict(train_dataloader=dict(dataset=dataset))), ('train', ))
    assert f'annotation file {str(ann_file)!r} {problem}' in message
    assert message.startswith('train dataset (CocoDataset): ')
