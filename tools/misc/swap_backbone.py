#!/usr/bin/env python
"""Write a config that puts a Twins backbone into an existing mmdet / mmseg config.

    python tools/misc/swap_backbone.py mmdet::dino/dino-4scale_r50_8xb2-12e_coco.py \\
        --backbone twins_svt_s --out configs/my/dino_twins_svt_s.py

SRC is a config path or an upstream name (mmdet::FOLDER/FILE.py, mmseg::FOLDER/FILE.py,
resolved in the installed package). The output inherits SRC and changes only what the swap
needs: the backbone (same levels, the variant's ImageNet weights, twins_mm's drop path),
every channel key that reads the backbone's maps, a caffe-style input normalisation, and
Twins' no-decay rules merged into optim_wrapper.paramwise_cfg.custom_keys. Its comments say
what changed and why (docs/use_in_your_model.md). A source the tool cannot map ends it with
one line naming the key and what to do, and no output file.
"""
import argparse
import sys

from twins_mm.swap import VARIANTS, SwapError, swap_backbone


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('src', help='source config: a path, or mmdet::FOLDER/FILE.py / '
                        'mmseg::FOLDER/FILE.py')
    parser.add_argument('--backbone', required=True, metavar='NAME',
                        help=f'Twins variant: {", ".join(VARIANTS)}')
    parser.add_argument('--out', required=True, help='the config file to write')
    parser.add_argument('--allow-stride-change', action='store_true',
                        help='convert a dilated ResNet (stride-8/16 last stages) anyway: the '
                        'head gets the same stages of Twins at strides 4/8/16/32')
    parser.add_argument('--backbone-key', default=None,
                        help='which backbone to replace where the model has several, e.g. '
                        'model.detector.backbone')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        result = swap_backbone(args.src, args.backbone, args.out, args.allow_stride_change,
                               args.backbone_key)
    except SwapError as err:
        sys.exit(f'error: {err}')
    print(f'wrote {args.out} (inherits {result.source_ref}):')
    for change in result.changes:
        print(f'  - {change}')


if __name__ == '__main__':
    main()
