#!/usr/bin/env python
"""Convert a Twins checkpoint (official, timm, mmseg 1.x or twins_mm layout) to twins_mm's.

    python tools/convert_checkpoint.py pcpvt_small.pth pcpvt_small_twins_mm.pth

The layout and the variant are detected from the keys; the classification head and the
final norm are dropped. The output holds ``state_dict`` and a ``meta`` with what was found.

The source may be a timm ``model.safetensors`` (read by the safetensors library, whatever the
torch version). A source that is no readable checkpoint ends the tool with one line naming
the file and the problem.
"""
import argparse
import sys

import torch

import twins_mm  # noqa: F401  (safe checkpoint loading)
from twins_mm.checkpoints import (CheckpointLayoutError, arch_label, convert_to_twins_mm,
                                  read_checkpoint)
from twins_mm.compat import UntrustedCheckpointError


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('src', help='source checkpoint: a path or URL')
    parser.add_argument('dst', help='where to write the converted checkpoint')
    parser.add_argument('--prefix', default=None,
                        help='take only keys under this prefix (default: "backbone." if any)')
    return parser.parse_args()


def main():
    args = parse_args()
    try:
        raw = read_checkpoint(args.src, map_location='cpu')
        state, info = convert_to_twins_mm(raw, args.prefix)
    except (CheckpointLayoutError, UntrustedCheckpointError, RuntimeError, OSError) as err:
        message = str(err) if args.src in str(err) else f'{args.src}: {err}'
        sys.exit(f'error: {message}')
    meta = dict(source=args.src, source_layout=info['layout'], family=info['family'],
                arch=info['arch'], dropped=info['dropped'])
    torch.save(dict(state_dict=state, meta=meta), args.dst)
    print(f'{args.src}: {info["layout"]} layout, {arch_label(info)}; wrote {len(state)} keys '
          f'to {args.dst} (dropped {len(info["dropped"])} classification keys)')


if __name__ == '__main__':
    main()
