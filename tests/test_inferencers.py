"""The OpenMMLab inference APIs with our configs and a checkpoint trained by the demo route.

A checkpoint is trained with ``tools/train.py`` on demo data, with the demo's own overrides
(``tools/demo_segmentation.py`` / ``tools/demo_detection.py``) shrunk to a few images, so it is
exactly what the Runner writes (message hub, dataset meta, ...), and the config is the one the
Runner dumped into the work dir. Each API then runs in a fresh process, as a user's script:
``mmseg.apis.init_model`` + ``inference_model`` and ``MMSegInferencer``; ``mmdet.apis.
init_detector`` + ``inference_detector`` and ``DetInferencer``. Their outputs are checked
against the model built here from the same config with the checkpoint's state dict loaded
by ``load_state_dict`` and run through its own ``test_step``: same predictions, the class
count of the dataset the checkpoint was trained on, outputs at the input image's size.
"""
import json
import os.path as osp
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.dataset import Compose, pseudo_collate
from mmengine.registry import init_default_scope

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'tools'))

import demo_detection  # noqa: E402
import demo_segmentation  # noqa: E402

# Image of the test: not square, sides not multiples of 32.
HEIGHT, WIDTH = 56, 72

SEG_APIS = r"""
import sys
import numpy as np
from mmseg.apis import MMSegInferencer, inference_model, init_model

config, checkpoint, image, out = sys.argv[1:]
model = init_model(config, checkpoint, device='cpu')
sample = inference_model(model, image)
inferencer = MMSegInferencer(model=config, weights=checkpoint, device='cpu')
from_inferencer = inferencer(image, return_datasamples=True)
np.savez(out, api_pred=sample.pred_sem_seg.data.numpy(),
         api_logits=sample.seg_logits.data.numpy(),
         inferencer_pred=from_inferencer.pred_sem_seg.data.numpy(),
         inferencer_logits=from_inferencer.seg_logits.data.numpy(),
         classes=np.array(model.dataset_meta['classes']),
         inferencer_classes=np.array(inferencer.model.dataset_meta['classes']))
"""

DET_APIS = r"""
import sys
import numpy as np
from mmdet.apis import DetInferencer, inference_detector, init_detector

config, checkpoint, image, out = sys.argv[1:]
model = init_detector(config, checkpoint, device='cpu')
pred = inference_detector(model, image).pred_instances
inferencer = DetInferencer(model=config, weights=checkpoint, device='cpu', show_progress=False)
result = inferencer(image, return_datasamples=True, no_save_vis=True)
inf = result['predictions'][0].pred_instances
np.savez(out, api_bboxes=pred.bboxes.numpy(), api_scores=pred.scores.numpy(),
         api_labels=pred.labels.numpy(), inferencer_bboxes=inf.bboxes.numpy(),
         inferencer_scores=inf.scores.numpy(), inferencer_labels=inf.labels.numpy(),
         classes=np.array(model.dataset_meta['classes']),
         inferencer_classes=np.array(inferencer.model.dataset_meta['classes']))
"""


def run(cmd, cwd=ROOT, timeout=600):
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def train(config, opts, work_dir):
    run([sys.executable, ROOT / 'tools' / 'train.py', config, '--work-dir', work_dir,
         '--cfg-options', *opts])
    dumped = work_dir / osp.basename(config)
    assert dumped.is_file()  # the config the Runner wrote next to its checkpoints
    return dumped


def fake_imagenet(path):
    from twins_mm.testing import official_state_dict
    torch.save({'model': official_state_dict('TwinsSVT', 'small', seed=0)}, path)
    return str(path)


def crop_image(src, dst):
    """A crop of a demo validation image, HEIGHT x WIDTH."""
    img = cv2.imread(str(src))
    img = cv2.resize(img, (max(WIDTH, img.shape[1]), max(HEIGHT, img.shape[0])))
    cv2.imwrite(str(dst), img[:HEIGHT, :WIDTH])
    return dst


def apis_in_fresh_process(script, config, checkpoint, image, tmp_path):
    out = tmp_path / 'apis.npz'
    run([sys.executable, '-c', script, config, checkpoint, image, out])
    return dict(np.load(out))


def own_model(scope, config, checkpoint):
    """The model built from the config, the checkpoint's state dict loaded with
    ``load_state_dict``: (model, config, the checkpoint's meta)."""
    init_default_scope(scope)
    registry = __import__(f'{scope}.registry', fromlist=['MODELS']).MODELS
    cfg = Config.fromfile(str(config))
    model = registry.build(cfg.model)
    state = torch.load(checkpoint, map_location='cpu')
    model.load_state_dict(state['state_dict'])
    return model.eval(), cfg, state['meta']


def own_test_step(model, pipeline, image):
    """The model's own prediction: the given test pipeline without annotations, test_step."""
    pipeline = Compose([t for t in pipeline if 'LoadAnnotations' not in t['type']])
    with torch.no_grad():
        (sample, ) = model.test_step(pseudo_collate([pipeline(dict(img_path=str(image),
                                                                  img_id=0))]))
    return sample


def predict_both_ways(scope, script, trained, tmp_path, num_classes):
    """(what the APIs return in a fresh process, the model built here, its config). Both APIs
    must hold the classes of the dataset the checkpoint was trained on (ADE20K 150, COCO 80)."""
    config, checkpoint, image = trained
    got = apis_in_fresh_process(script, config, checkpoint, image, tmp_path)
    model, cfg, meta = own_model(scope, config, checkpoint)
    classes = meta['dataset_meta']['classes']
    assert len(classes) == num_classes
    assert list(got['classes']) == list(got['inferencer_classes']) == list(classes)
    return got, model, cfg


@pytest.fixture(scope='module')
def seg_run(tmp_path_factory):
    from twins_mm.demo_data.ade20k import make_ade20k
    tmp = tmp_path_factory.mktemp('seg_demo')
    root = make_ade20k(str(tmp / 'data'), num_train=2, num_val=1, size=64, seed=0)
    opts = demo_segmentation.demo_overrides(root, fake_imagenet(tmp / 'imagenet.pth'),
                                            iters=2, size=64, batch=2, workers=1)
    config = train(demo_segmentation.CONFIG, opts, tmp / 'work')
    image = crop_image(next((Path(root) / 'images' / 'validation').glob('*.jpg')),
                       tmp / 'image.png')
    return config, tmp / 'work' / 'iter_2.pth', image


def test_mmseg_init_model_and_inferencer_in_fresh_process(seg_run, tmp_path):
    got, model, cfg = predict_both_ways('mmseg', SEG_APIS, seg_run, tmp_path, num_classes=150)
    # mmseg's inference_model reads cfg.test_pipeline, MMSegInferencer the test dataloader's
    # pipeline (the demo overrides shrink only the latter's scale): each against its own.
    for source, pipeline in (('api', cfg.test_pipeline),
                             ('inferencer', cfg.test_dataloader.dataset.pipeline)):
        ref = own_test_step(model, pipeline, seg_run[2])
        logits, pred = got[f'{source}_logits'], got[f'{source}_pred']
        assert logits.shape == (150, HEIGHT, WIDTH) and pred.shape == (1, HEIGHT, WIDTH)
        np.testing.assert_allclose(logits, ref.seg_logits.data.numpy(), atol=1e-4)
        assert (pred == ref.pred_sem_seg.data.numpy()).mean() > 0.999
        assert (pred[0] == logits.argmax(0)).mean() > 0.999


@pytest.fixture(scope='module')
def det_run(tmp_path_factory):
    from twins_mm.demo_data.coco import make_coco
    tmp = tmp_path_factory.mktemp('det_demo')
    root = make_coco(str(tmp / 'data'), num_train=2, num_val=1, seed=0, size=(96, 64))
    args = demo_detection.parse_args(['--width', '96', '--height', '64', '--batch-size', '2',
                                      '--epochs', '1', '--warmup-iters', '1', '--workers', '1'])
    opts = demo_detection.demo_overrides(root, fake_imagenet(tmp / 'imagenet.pth'), args)
    dumped = train(demo_detection.CONFIGS['retinanet'], opts, tmp / 'work')
    # Two iterations leave RetinaNet's classifier near its prior (p = 0.01), below the
    # config's 0.05 threshold: keep every box so that there is something to compare.
    config = tmp / 'infer.py'
    config.write_text(f'_base_ = [{str(dumped)!r}]\nmodel = dict(test_cfg=dict(score_thr=0.0))\n')
    image = crop_image(next((Path(root) / 'val2017').glob('*.jpg')), tmp / 'image.png')
    return config, tmp / 'work' / 'epoch_1.pth', image


def test_mmdet_init_detector_and_inferencer_in_fresh_process(det_run, tmp_path):
    got, model, cfg = predict_both_ways('mmdet', DET_APIS, det_run, tmp_path, num_classes=80)
    # mmdet's inference_detector and DetInferencer both read the test dataloader's pipeline
    ref = own_test_step(model, cfg.test_dataloader.dataset.pipeline, det_run[2])
    expected = ref.pred_instances
    assert len(expected) == 100  # max_per_img of the config's test_cfg
    for source in ('api', 'inferencer'):
        bboxes, scores, labels = (got[f'{source}_{k}'] for k in ('bboxes', 'scores', 'labels'))
        assert bboxes.shape == (100, 4) and scores.shape == labels.shape == (100, )
        np.testing.assert_allclose(bboxes, expected.bboxes.numpy(), atol=1e-3)
        np.testing.assert_allclose(scores, expected.scores.numpy(), atol=1e-5)
        np.testing.assert_array_equal(labels, expected.labels.numpy())
        assert 0 <= labels.min() and labels.max() < 80
        # boxes in the input image's pixel frame (rescaled back from the test scale)
        assert bboxes[:, [0, 2]].max() <= WIDTH + 1 and bboxes[:, [1, 3]].max() <= HEIGHT + 1
