"""Train a segmentor (mmseg config) or a detector (mmdet config) with mmengine's Runner.

The config's ``default_scope`` decides which library's registries, hooks and visualizer
are used; the flags are those of mmseg's and mmdet's ``tools/train.py``.
"""
import argparse
import logging
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from mmengine.device import (is_cuda_available, is_mlu_available,  # noqa: E402
                             is_musa_available, is_npu_available)
from mmengine.logging import print_log  # noqa: E402

import twins_mm  # noqa: E402,F401  (registers the backbones, safe checkpoint loading)
from twins_mm.launch import (add_common_args, build_runner, check_data_or_exit,  # noqa: E402
                             config_scope, load_config, parse_with_local_rank,
                             end_distributed, prepare_cpu_distributed,
                             silence_upstream_deprecation_noise)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Train a Twins segmentor or detector')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--work-dir', help='the dir to save logs and models')
    parser.add_argument(
        '--resume', nargs='?', type=str, const='auto',
        help='resume from the latest checkpoint in the work_dir (no value), or from the '
        'given checkpoint file')
    parser.add_argument('--amp', action='store_true', help='automatic mixed precision')
    parser.add_argument(
        '--auto-scale-lr', action='store_true',
        help='scale the LR by the actual batch size over auto_scale_lr.base_batch_size')
    add_common_args(parser)
    return parse_with_local_rank(parser, argv)


# What AmpOptimWrapper takes beyond OptimWrapper's arguments.
AMP_ONLY_KEYS = ('loss_scale', 'dtype', 'use_fsdp')


def amp_device_available() -> bool:
    """The devices mmengine's AmpOptimWrapper accepts (it asserts one of them)."""
    return (is_cuda_available() or is_npu_available() or is_mlu_available()
            or is_musa_available())


def enable_amp(cfg) -> None:
    if not amp_device_available():
        sys.exit('error: --amp needs a GPU (mmengine\'s AmpOptimWrapper does not run on CPU); '
                 'drop --amp on this machine.')
    wrapper = cfg.optim_wrapper.get('type', 'OptimWrapper')
    if wrapper == 'AmpOptimWrapper':
        print_log('AMP training is already enabled in your config.', logger='current',
                  level=logging.WARNING)
        return
    if wrapper != 'OptimWrapper':
        sys.exit(f'error: --amp needs optim_wrapper.type OptimWrapper, the config has {wrapper}.')
    cfg.optim_wrapper.type = 'AmpOptimWrapper'
    cfg.optim_wrapper.loss_scale = 'dynamic'


def amp_config_to_fp32_without_gpu(cfg) -> None:
    """A config with AmpOptimWrapper (the Mask R-CNN 3x ones: official fp16, loss scale 512)
    trains in fp32 with OptimWrapper where no GPU is present, instead of failing inside
    mmengine. The optimizer, clipping and paramwise rules are kept."""
    wrapper = cfg.get('optim_wrapper') or {}
    if str(wrapper.get('type', '')).split('.')[-1] != 'AmpOptimWrapper' or amp_device_available():
        return
    dropped = {k: wrapper.pop(k) for k in AMP_ONLY_KEYS if k in wrapper}
    wrapper.type = 'OptimWrapper'
    dropped = ', '.join(f'{k}={v!r}' for k, v in dropped.items()) or 'no AMP-only keys'
    print_log('No GPU: the config asks for mixed precision (AmpOptimWrapper), which mmengine '
              f'runs only on a GPU; training in fp32 with OptimWrapper instead (dropped '
              f'{dropped}). Results can differ from the official fp16 training.',
              logger='current', level=logging.WARNING)


def enable_auto_scale_lr(cfg) -> None:
    auto = cfg.get('auto_scale_lr') or {}
    if 'base_batch_size' not in auto:
        sys.exit('error: --auto-scale-lr needs auto_scale_lr=dict(base_batch_size=...) in the '
                 'config.')
    cfg.auto_scale_lr.enable = True


def main(argv=None):
    silence_upstream_deprecation_noise()
    args = parse_args(argv)
    cfg = load_config(args)
    config_scope(cfg)
    if args.amp:
        enable_amp(cfg)
    amp_config_to_fp32_without_gpu(cfg)
    if args.auto_scale_lr:
        enable_auto_scale_lr(cfg)
    if args.resume == 'auto':
        cfg.resume, cfg.load_from = True, None
    elif args.resume is not None:
        cfg.resume, cfg.load_from = True, args.resume
    check_data_or_exit(cfg, ('train', 'val') if cfg.get('val_cfg') else ('train', ))
    prepare_cpu_distributed(cfg)
    runner = build_runner(cfg)
    runner.train()
    end_distributed()


if __name__ == '__main__':
    main()
