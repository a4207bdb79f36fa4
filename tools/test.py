"""Test (and evaluate) a segmentor (mmseg config) or a detector (mmdet config).

The flags are those of mmseg's and mmdet's ``tools/test.py``; where the two differ the
config's ``default_scope`` decides: ``--out`` is a folder of prediction PNGs for mmseg and a
.pkl file of results for mmdet, as upstream.
"""
import argparse
import copy
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from mmengine.config import ConfigDict  # noqa: E402

import twins_mm  # noqa: E402,F401  (registers the backbones, safe checkpoint loading)
from twins_mm.launch import (add_common_args, build_runner, check_data_or_exit,  # noqa: E402
                             config_scope, load_config, parse_with_local_rank,
                             end_distributed, prepare_cpu_distributed,
                             silence_upstream_deprecation_noise)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Test a Twins segmentor or detector')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--work-dir', help='the dir to save the metrics (json)')
    parser.add_argument(
        '--out', help='mmseg: folder for the predicted label maps; mmdet: .pkl results file')
    parser.add_argument('--show', action='store_true', help='show prediction results')
    parser.add_argument('--show-dir', help='folder for painted prediction images')
    parser.add_argument('--wait-time', type=float, default=2, help='the interval of show (s)')
    parser.add_argument('--tta', action='store_true', help='test-time augmentation')
    add_common_args(parser)
    return parse_with_local_rank(parser, argv)


def enable_visualization(cfg, args, scope: str) -> None:
    hook = cfg.default_hooks.get('visualization')
    if hook is None:
        sys.exit('error: --show/--show-dir need default_hooks.visualization in the config.')
    hook['draw'] = True
    # The hooks' default draws every 50th image only; paint all unless the config says.
    hook.setdefault('interval', 1)
    if args.show:
        hook['show'] = True
        hook['wait_time'] = args.wait_time
    if args.show_dir:
        if scope == 'mmdet':
            hook['test_out_dir'] = args.show_dir
        else:
            cfg.visualizer['save_dir'] = args.show_dir


def default_det_tta(cfg, dataset) -> None:
    """mmdet's test.py fallback: horizontal-flip TTA merged by NMS."""
    cfg.setdefault('tta_model', dict(
        type='DetTTAModel', tta_cfg=dict(nms=dict(type='nms', iou_threshold=0.5),
                                         max_per_img=100)))
    if 'tta_pipeline' not in cfg:
        pipeline = copy.deepcopy(dataset.pipeline)
        pipeline[-1] = dict(type='TestTimeAug', transforms=[
            [dict(type='RandomFlip', prob=1.), dict(type='RandomFlip', prob=0.)],
            [dict(type='PackDetInputs', meta_keys=(
                'img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor', 'flip',
                'flip_direction'))]])
        cfg.tta_pipeline = pipeline


def enable_tta(cfg, scope: str) -> None:
    dataset = cfg.test_dataloader.dataset
    while 'dataset' in dataset:
        dataset = dataset['dataset']
    if scope == 'mmdet':
        default_det_tta(cfg, dataset)
    if 'tta_model' not in cfg or 'tta_pipeline' not in cfg:
        sys.exit('error: --tta needs tta_model and tta_pipeline in the config.')
    cfg.model = ConfigDict(**cfg.tta_model, module=cfg.model)
    dataset.pipeline = cfg.tta_pipeline


def add_result_dump(cfg, runner, out: str, scope: str) -> None:
    if scope == 'mmdet':
        if not out.endswith(('.pkl', '.pickle')):
            sys.exit(f'error: --out must name a .pkl file for detection configs, got {out!r}.')
        from mmdet.evaluation import DumpDetResults
        runner.test_evaluator.metrics.append(DumpDetResults(out_file_path=out))


def main(argv=None):
    silence_upstream_deprecation_noise()
    args = parse_args(argv)
    cfg = load_config(args)
    scope = config_scope(cfg)
    if not osp.isfile(args.checkpoint) and '://' not in args.checkpoint:
        sys.exit(f'error: checkpoint {args.checkpoint!r} does not exist.')
    cfg.load_from = args.checkpoint
    if args.show or args.show_dir:
        enable_visualization(cfg, args, scope)
    if args.tta:
        enable_tta(cfg, scope)
    if args.out is not None and scope == 'mmseg':
        cfg.test_evaluator['output_dir'] = args.out
        cfg.test_evaluator['keep_results'] = True
    check_data_or_exit(cfg, ('test', ))
    prepare_cpu_distributed(cfg)
    runner = build_runner(cfg)
    if args.out is not None:
        add_result_dump(cfg, runner, args.out, scope)
    runner.test()
    end_distributed()


if __name__ == '__main__':
    main()
