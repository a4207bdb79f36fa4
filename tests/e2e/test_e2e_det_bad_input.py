"""Bad COCO input (slow: tools/train.py in subprocesses): a missing annotation file and one
with no images stop with one line; images without annotations and boxes that stick out of
the image are handled the way mmdet's COCO pipeline defines, and checked here."""
import json
import os
import os.path as osp
import re
import subprocess
import sys

import pytest
from mmengine.config import Config
from mmengine.registry import init_default_scope

from mmdet.registry import DATASETS
from twins_mm.data_check import check_datasets
from twins_mm.demo_data.coco import coco_cfg_options, make_coco

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
CONFIG = 'configs/retinanet_twins_svt_s_1x.py'
SIZE = (128, 96)


@pytest.fixture
def coco(tmp_path):
    return make_coco(str(tmp_path / 'coco'), num_train=6, num_val=2, seed=0, size=SIZE)


def ann_path(root, split='train'):
    return osp.join(root, 'annotations', f'instances_{split}2017.json')


def edit_annotations(root, edit, split='train'):
    with open(ann_path(root, split)) as f:
        data = json.load(f)
    edit(data)
    with open(ann_path(root, split), 'w') as f:
        json.dump(data, f)
    return data


def train_error(root):
    proc = subprocess.run(
        [sys.executable, 'tools/train.py', CONFIG, '--work-dir', osp.join(root, 'work'),
         '--cfg-options', *coco_cfg_options(root)],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert 'Traceback' not in proc.stderr, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith('error:')]
    assert len(lines) == 1, proc.stderr[-2000:]
    return lines[0]


def test_missing_annotation_file(coco, tmp_path):
    missing = ann_path(coco)
    os.remove(missing)
    line = train_error(coco)
    assert missing in line and 'tools/make_demo_data.py coco' in line

    # The hint's --cfg-options (data roots and the evaluators' ann_file) point the config at
    # a user's own dataset: every split passes the check and the evaluators read its files.
    (opts, ) = re.findall(r'`--cfg-options ([^`]*)`', line)
    assert 'val_evaluator.ann_file=PATH/' in opts and 'test_evaluator.ann_file=PATH/' in opts
    own = make_coco(str(tmp_path / 'own'), num_train=2, num_val=1, seed=1, size=SIZE)
    cfg = Config.fromfile(osp.join(REPO, CONFIG))
    cfg.merge_from_dict(dict(o.replace('PATH', own).split('=', 1) for o in opts.split()))
    init_default_scope('mmdet')
    check_datasets(cfg, ('train', 'val', 'test'))
    for split in ('val', 'test'):
        assert cfg[f'{split}_evaluator'].ann_file == ann_path(own, 'val')
        assert cfg[f'{split}_dataloader'].dataset.data_root == own


def test_annotation_file_without_images(coco):
    edit_annotations(coco, lambda d: d.update(images=[], annotations=[]))
    line = train_error(coco)
    assert ann_path(coco) in line and 'no images' in line


def build_split(root, split):
    cfg = Config.fromfile(osp.join(REPO, CONFIG))
    dataset = cfg[f'{split}_dataloader'].dataset
    dataset.data_root = root
    pipeline = dataset.pipeline
    pipeline[[t['type'] for t in pipeline].index('Resize')]['scale'] = SIZE
    init_default_scope('mmdet')
    return DATASETS.build(dataset)


def test_images_without_annotations(coco):
    """make_coco leaves image 6 of 6 empty. Training skips it (mmdet's filter_empty_gt, the
    official setting); validation keeps every image, so false positives there count."""
    with open(ann_path(coco)) as f:
        data = json.load(f)
    annotated = {a['image_id'] for a in data['annotations']}
    empty = [im['id'] for im in data['images'] if im['id'] not in annotated]
    assert empty, 'the demo data should contain an image without objects'
    train = build_split(coco, 'train')
    assert sorted(train.get_data_info(i)['img_id'] for i in range(len(train))) == \
        sorted(annotated)
    for i in range(len(train)):
        assert len(train[i]['data_samples'].gt_instances) > 0

    edit_annotations(coco, lambda d: d.update(annotations=[
        a for a in d['annotations'] if a['image_id'] != d['images'][0]['id']]), split='val')
    val = build_split(coco, 'val')
    assert len(val) == 2
    empty_sample = next(val[i] for i in range(2) if val[i]['data_samples'].img_id == 1)
    assert len(empty_sample['data_samples'].gt_instances) == 0


def test_boxes_partly_outside_the_image(coco):
    """A box that sticks out on the right and bottom is kept and clipped to the image."""
    width, height = SIZE

    def stick_out(data):
        ann = data['annotations'][0]
        x, y, w, h = ann['bbox']
        ann['bbox'] = [x, y, width - x + 30, height - y + 20]
        data['first'] = ann

    data = edit_annotations(coco, stick_out)
    image_id = data['first']['image_id']
    count = sum(a['image_id'] == image_id for a in data['annotations'])
    train = build_split(coco, 'train')
    index = next(i for i in range(len(train)) if train.get_data_info(i)['img_id'] == image_id)
    raw = train.get_data_info(index)['instances']
    assert len(raw) == count
    sample = train[index]['data_samples']
    boxes = sample.gt_instances.bboxes.tensor
    h, w = sample.img_shape
    assert len(boxes) == count
    assert (boxes[:, 0::2] >= 0).all() and (boxes[:, 0::2] <= w).all()
    assert (boxes[:, 1::2] >= 0).all() and (boxes[:, 1::2] <= h).all()
    # The clipped box reaches the image border (or its mirror after a flip).
    assert ((boxes[:, 2] == w) | (boxes[:, 0] == 0)).any()
