"""tools/train.py, tools/test.py, tools/inference.py and tools/convert_checkpoint.py on a
tiny RetinaNet: the repository's Twins-SVT-S RetinaNet config with a five-block SVT of widths
16-64 and a 32-channel FPN and head, trained from scratch for three iterations on 64x64 demo
COCO images. The checks are
about what the tools do (which checkpoint a resume starts from, what --out holds, how --tta
merges its views, where inference draws), not about learning.

One training run (module fixture) serves every test; the tools run in this process, each
with its own experiment name.
"""
import os.path as osp
import pickle
import sys

import mmcv
import numpy as np
import pytest
import torch
from mmengine.logging.history_buffer import HistoryBuffer

from tools import convert_checkpoint, inference
from tools import test as test_tool
from tools import train
from twins_mm.demo_data.coco import make_coco
from twins_mm import TwinsSVT

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
BASE = osp.join(REPO, 'configs', 'retinanet_twins_svt_s_1x.py')
TINY_SVT = dict(embed_dims=[16, 32, 32, 64], num_heads=[1, 1, 2, 2], mlp_ratios=[2, 2, 2, 2],
                depths=[1, 1, 1, 2], sr_ratios=[8, 4, 2, 1], window_sizes=[7, 7, 7, 7])
SIZE = 64
EPOCHS = 3
CONFIG = """
_base_ = [{base!r}]
data_root = {data_root!r}
model = dict(
    backbone=dict(arch={arch!r}, drop_path_rate=0., init_cfg=None),
    neck=dict(in_channels={widths!r}, out_channels=32),
    bbox_head=dict(in_channels=32, feat_channels=32, stacked_convs=1),
    test_cfg=dict(score_thr=0.))  # a few iterations leave every score under 0.05
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=({size}, {size}), keep_ratio=True),
    dict(type='PackDetInputs')]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=({size}, {size}), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor'))]
train_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False,
                        dataset=dict(data_root=data_root, pipeline=train_pipeline))
test_dataloader = dict(batch_size=1, num_workers=0, persistent_workers=False,
                       dataset=dict(data_root=data_root, pipeline=test_pipeline))
test_evaluator = dict(ann_file=data_root + '/annotations/instances_val2017.json')
val_dataloader = val_cfg = val_evaluator = None  # no validation while training
optim_wrapper = dict(optimizer=dict(lr=1e-3))
param_scheduler = [dict(type='LinearLR', start_factor=0.5, by_epoch=False, begin=0, end=2)]
train_cfg = dict(max_epochs={epochs})
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=1))
randomness = dict(seed=0)
"""


def load(path):
    # mmengine fills HistoryBuffer's statistics methods (pickled in the message hub) when
    # the first one is made; twins_mm's safe loader allows only known ones.
    HistoryBuffer()
    return torch.load(path, map_location='cpu')


def tool_args(name):
    return ['--cfg-options', f'experiment_name={name}']


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """The config, the demo data and an uninterrupted training run of EPOCHS epochs
    (one iteration of both training images each), a checkpoint per epoch."""
    root = tmp_path_factory.mktemp('tools_cli')
    data_root = make_coco(str(root / 'coco'), num_train=2, num_val=2, seed=0,
                          size=(SIZE, SIZE))
    config = root / 'retinanet_tiny.py'
    config.write_text(CONFIG.format(base=BASE, data_root=data_root,
                                    arch=dict(_delete_=True, **TINY_SVT),
                                    widths=TINY_SVT['embed_dims'], size=SIZE, epochs=EPOCHS))
    work_dir = str(root / 'straight')
    train.main([str(config), '--work-dir', work_dir, *tool_args('straight')])
    return dict(root=root, config=str(config), data_root=data_root, work_dir=work_dir,
                checkpoint=osp.join(work_dir, f'epoch_{EPOCHS}.pth'))


# ----------------------------------------------------------------------------- launch
def test_missing_config_file_is_one_line(tmp_path):
    missing = str(tmp_path / 'nowhere.py')
    for main, extra in ((train.main, []), (test_tool.main, [str(tmp_path / 'x.pth')])):
        with pytest.raises(SystemExit) as exit_info:
            main([missing, *extra])
        assert exit_info.value.code == f'error: config file {missing!r} does not exist.'


@pytest.mark.parametrize('scope', ['mmpretrain', None])
def test_config_outside_mmseg_and_mmdet_is_refused(tmp_path, scope):
    config = tmp_path / 'other.py'
    config.write_text('model = dict(type="ImageClassifier")\n'
                      + (f'default_scope = {scope!r}\n' if scope else ''))
    with pytest.raises(SystemExit) as exit_info:
        train.main([str(config), '--work-dir', str(tmp_path / 'w')])
    message = exit_info.value.code
    assert message.startswith(f'error: the config sets default_scope={scope!r}; these tools '
                              'run mmseg and mmdet configs')
    assert "add default_scope='mmseg' or 'mmdet'" in message
    assert not (tmp_path / 'w').exists()


# ----------------------------------------------------------------------------- train
def test_resume_from_a_given_file_continues_that_file(trained, tmp_path):
    """--resume FILE starts from FILE, not from the work dir's latest checkpoint: the work
    dir holds a later checkpoint with other weights (named by last_checkpoint); resuming
    from epoch 1 redoes epochs 2 and 3 and ends on the uninterrupted run's weights."""
    first = osp.join(trained['work_dir'], 'epoch_1.pth')
    work_dir = tmp_path / 'resumed'
    work_dir.mkdir()
    decoy = load(osp.join(trained['work_dir'], 'epoch_2.pth'))
    decoy['state_dict'] = {k: v + 0.05 if v.is_floating_point() else v
                           for k, v in decoy['state_dict'].items()}
    torch.save(decoy, work_dir / 'epoch_2.pth')
    (work_dir / 'last_checkpoint').write_text(str(work_dir / 'epoch_2.pth'))

    train.main([trained['config'], '--work-dir', str(work_dir), '--resume', first,
                *tool_args('resumed')])
    for epoch in (2, 3):  # epoch 2 rewritten, epoch 3 new
        a = load(osp.join(trained['work_dir'], f'epoch_{epoch}.pth'))
        b = load(work_dir / f'epoch_{epoch}.pth')
        assert b['meta']['epoch'] == epoch and b['meta']['iter'] == a['meta']['iter'] == epoch
        for key, value in a['state_dict'].items():
            torch.testing.assert_close(b['state_dict'][key], value, rtol=1e-4, atol=1e-6,
                                       msg=lambda m: f'epoch {epoch} {key}: {m}')


# ----------------------------------------------------------------------------- test
def val_images(data_root):
    import json
    with open(osp.join(data_root, 'annotations', 'instances_val2017.json')) as f:
        return {img['id']: osp.join(data_root, 'val2017', img['file_name'])
                for img in json.load(f)['images']}


def detector(trained):
    from mmdet.apis import init_detector
    return init_detector(trained['config'], trained['checkpoint'], device='cpu')


def predict(model, image):
    """mmdet's own single-image inference: boxes in the image's pixel coordinates."""
    from mmdet.apis import inference_detector
    pred = inference_detector(model, image).pred_instances
    return pred.bboxes, pred.scores, pred.labels


def dumped(trained, tmp_path, name, *flags):
    out = str(tmp_path / f'{name}.pkl')
    test_tool.main([trained['config'], trained['checkpoint'], '--work-dir',
                    str(tmp_path / name), '--out', out, *flags, *tool_args(name)])
    with open(out, 'rb') as f:
        return {r['img_id']: r for r in pickle.load(f)}


@pytest.fixture(scope='module')
def plain_results(trained, tmp_path_factory):
    return dumped(trained, tmp_path_factory.mktemp('test_out'), 'plain')


def test_out_pickle_holds_each_images_detections(trained, plain_results):
    """mmdet --out: one entry per validation image, the image's id and path, and its
    detections: those of mmdet's own inference API on that image with the checkpoint."""
    images = val_images(trained['data_root'])
    assert sorted(plain_results) == sorted(images)
    model = detector(trained)
    for img_id, result in plain_results.items():
        assert result['img_path'] == images[img_id]
        assert tuple(result['ori_shape']) == (SIZE, SIZE)
        pred = result['pred_instances']
        assert set(pred) >= {'bboxes', 'scores', 'labels'}
        assert len(pred['scores']) == 100  # max_per_img, every score kept (score_thr 0)
        bboxes, scores, labels = predict(model, images[img_id])
        torch.testing.assert_close(pred['bboxes'], bboxes, rtol=0, atol=1e-3)
        torch.testing.assert_close(pred['scores'], scores, rtol=0, atol=1e-5)
        assert torch.equal(pred['labels'], labels)
        assert labels.min() >= 0 and labels.max() < 80


def test_out_must_be_a_pickle_for_detection(trained, tmp_path):
    with pytest.raises(SystemExit, match=r"--out must name a \.pkl file for detection configs, "
                                         r"got '.*results\.json'"):
        test_tool.main([trained['config'], trained['checkpoint'], '--work-dir',
                        str(tmp_path / 'w'), '--out', str(tmp_path / 'results.json'),
                        *tool_args('json_out')])


def test_tta_merges_the_flipped_view(trained, plain_results, tmp_path):
    """mmdet --tta (no tta_model in the config: mmdet's horizontal-flip default): per image,
    the detections of the image and of its mirror image (boxes mirrored back) are pooled
    and reduced by NMS at IoU 0.5 to 100, which is what comes out."""
    from mmcv.ops import batched_nms
    tta = dumped(trained, tmp_path, 'tta', '--tta')
    images = val_images(trained['data_root'])
    assert sorted(tta) == sorted(images)
    model = detector(trained)
    for img_id, image in images.items():
        mirror = str(tmp_path / f'mirror_{img_id}.png')  # lossless: the exact mirror pixels
        mmcv.imwrite(mmcv.imflip(mmcv.imread(image)), mirror)
        bboxes, scores, labels = predict(model, mirror)
        bboxes = torch.stack([SIZE - bboxes[:, 2], bboxes[:, 1], SIZE - bboxes[:, 0],
                              bboxes[:, 3]], dim=1)
        plain = plain_results[img_id]['pred_instances']
        pooled = (torch.cat([bboxes, plain['bboxes']]), torch.cat([scores, plain['scores']]),
                  torch.cat([labels, plain['labels']]))
        dets, keep = batched_nms(*pooled, dict(type='nms', iou_threshold=0.5))
        dets, keep = dets[:100], keep[:100]
        got = tta[img_id]['pred_instances']
        torch.testing.assert_close(got['bboxes'], dets[:, :4], rtol=0, atol=1e-3)
        torch.testing.assert_close(got['scores'], dets[:, 4], rtol=0, atol=1e-5)
        assert torch.equal(got['labels'], pooled[2][keep])
        # the mirror view contributed: some kept boxes are not among the plain detections
        from_mirror = (keep < len(scores)).sum().item()
        assert 0 < from_mirror < len(keep), from_mirror


# ----------------------------------------------------------------------------- inference
def test_inference_draws_the_detections_above_the_threshold(trained, tmp_path):
    """tools/inference.py on a detection config: with a threshold above every score the
    overlay is the image itself; with one between the best two scores only the best box
    is drawn, at its place in the original (not the resized) image."""
    image = str(tmp_path / 'big.png')  # 4x the training size: the model sees it at 64x64
    mmcv.imwrite(mmcv.imresize(mmcv.imread(val_images(trained['data_root'])[1]), (256, 256)),
                 image)
    bboxes, scores, _ = predict(detector(trained), image)
    original = mmcv.imread(image)

    def overlay(thr):
        out = str(tmp_path / f'overlay_{thr:.6f}.png')
        inference.main([trained['config'], trained['checkpoint'], image, '--out', out,
                        '--device', 'cpu', '--score-thr', str(thr)])
        drawn = mmcv.imread(out)
        assert drawn.shape == original.shape
        return np.abs(drawn.astype(int) - original.astype(int)).sum(-1) > 0

    assert not overlay(scores.max().item() + 1e-3).any()
    top, second = scores.topk(2).values.tolist()
    changed = overlay((top + second) / 2)
    x1, y1, x2, y2 = bboxes[scores.argmax()].round().int().tolist()
    ys, xs = np.nonzero(changed)
    margin = 3  # the box line width
    # the box outline is drawn (its left edge), and nothing left of or above the box
    assert changed[max(y1, 0) + margin:min(y2, 255) - margin, max(x1, 0):x1 + margin].mean() > 0.9
    assert xs.min() >= x1 - margin and ys.min() >= y1 - margin, (x1, y1, xs.min(), ys.min())


# ----------------------------------------------------------------------------- convert
def test_convert_checkpoint_prefix_selects_the_sub_tree(tmp_path, monkeypatch):
    """--prefix takes the keys under that prefix; without it a detector's 'backbone.' keys
    are taken (here beside an EMA copy of the backbone under 'ema.backbone.')."""
    backbone, ema = (TwinsSVT(TINY_SVT).state_dict() for _ in range(2))  # official layout
    src = tmp_path / 'detector.pth'
    torch.save({'state_dict': {**{f'backbone.{k}': v for k, v in backbone.items()},
                               **{f'ema.backbone.{k}': v for k, v in ema.items()},
                               'neck.conv.weight': torch.zeros(1)}}, src)
    for flags, expected in (([], backbone), (['--prefix', 'ema.backbone.'], ema)):
        dst = tmp_path / f'converted{len(flags)}.pth'
        monkeypatch.setattr(sys, 'argv', ['convert_checkpoint.py', str(src), str(dst), *flags])
        convert_checkpoint.main()
        state = torch.load(dst)['state_dict']
        assert state.keys() == expected.keys()
        for key, value in expected.items():
            assert torch.equal(state[key], value), (flags, key)
    monkeypatch.setattr(sys, 'argv', ['convert_checkpoint.py', str(src), str(dst), '--prefix',
                                      'teacher.'])
    with pytest.raises(SystemExit, match="No key of the checkpoint starts with 'teacher.'"):
        convert_checkpoint.main()


def test_end_distributed_destroys_the_process_group(tmp_path):
    """tools/train.py and tools/test.py end with ``end_distributed``: a gloo group left to the
    interpreter's exit can abort a run that succeeded."""
    import torch.distributed as dist

    from twins_mm.launch import end_distributed
    end_distributed()  # no group: nothing to do
    dist.init_process_group('gloo', init_method=f'file://{tmp_path / "store"}', rank=0,
                            world_size=1)
    try:
        end_distributed()
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
