"""Predict one image with a trained segmentor or detector and write an overlay picture.

    python tools/inference.py CONFIG CHECKPOINT IMAGE --out OUT.png [--device cpu]

Segmentation configs (default_scope mmseg) use ``mmseg.apis.init_model`` /
``inference_model`` and draw the label map over the image; detection configs (mmdet) use
``mmdet.apis.init_detector`` / ``inference_detector`` and draw boxes and masks.
"""
import argparse
import os
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

import mmcv  # noqa: E402
import torch  # noqa: E402
from mmengine.config import DictAction  # noqa: E402

import twins_mm  # noqa: E402,F401
from twins_mm.launch import (read_config, require_library,  # noqa: E402
                             silence_upstream_deprecation_noise)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('config')
    parser.add_argument('checkpoint')
    parser.add_argument('image')
    parser.add_argument('--out', required=True, help='overlay picture to write (.png/.jpg)')
    parser.add_argument('--device', default='cuda:0' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--opacity', type=float, default=0.5, help='segmentation overlay')
    parser.add_argument('--score-thr', type=float, default=0.3, help='detection boxes shown')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    return parser.parse_args(argv)


def segment(cfg, args) -> None:
    from mmseg.apis import inference_model, init_model, show_result_pyplot
    model = init_model(cfg, args.checkpoint, device=args.device)
    result = inference_model(model, args.image)
    show_result_pyplot(model, args.image, result, opacity=args.opacity, show=False,
                       out_file=args.out, draw_gt=False)


def detect(cfg, args) -> None:
    from mmdet.apis import inference_detector, init_detector
    from mmdet.registry import VISUALIZERS
    model = init_detector(cfg, args.checkpoint, device=args.device)
    result = inference_detector(model, args.image)
    visualizer = VISUALIZERS.build(model.cfg.visualizer)
    visualizer.dataset_meta = model.dataset_meta
    image = mmcv.imread(args.image, channel_order='rgb')
    visualizer.add_datasample('result', image, data_sample=result, draw_gt=False, show=False,
                              out_file=args.out, pred_score_thr=args.score_thr)


def main(argv=None):
    silence_upstream_deprecation_noise()
    args = parse_args(argv)
    for path, what in ((args.config, 'config'), (args.checkpoint, 'checkpoint'),
                       (args.image, 'image')):
        if not osp.isfile(path):
            sys.exit(f'error: {what} {path!r} does not exist.')
    cfg = read_config(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    scope = cfg.get('default_scope')
    if scope not in ('mmseg', 'mmdet'):
        sys.exit(f'error: the config sets default_scope={scope!r}; expected mmseg or mmdet.')
    require_library(scope)
    os.makedirs(osp.dirname(osp.abspath(args.out)), exist_ok=True)
    (segment if scope == 'mmseg' else detect)(cfg, args)
    print(f'overlay written to {args.out}')


if __name__ == '__main__':
    main()
