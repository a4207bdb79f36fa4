"""Write a small synthetic dataset in the ADE20K or COCO layout.

    python tools/make_demo_data.py ade20k --out data/ade    # -> data/ade/ADEChallengeData2016
    python tools/make_demo_data.py coco --out data/coco
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest='layout', required=True)
    ade = sub.add_parser('ade20k', help='ADEChallengeData2016 layout (semantic segmentation)')
    ade.add_argument('--out', default='data/ade', help='folder that gets ADEChallengeData2016/')
    ade.add_argument('--num-train', type=int, default=64)
    ade.add_argument('--num-val', type=int, default=16)
    ade.add_argument('--size', type=int, default=128, help='image side in pixels')
    ade.add_argument('--seed', type=int, default=0)
    coco = sub.add_parser('coco', help='COCO 2017 layout (detection, instance masks)')
    coco.add_argument('--out', default='data/coco', help='folder that gets annotations/ etc.')
    coco.add_argument('--num-train', type=int, help="default: make_coco's")
    coco.add_argument('--num-val', type=int, help="default: make_coco's")
    coco.add_argument('--seed', type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.layout == 'ade20k':
        from twins_mm.demo_data.ade20k import make_ade20k
        root = make_ade20k(args.out, num_train=args.num_train, num_val=args.num_val,
                           size=args.size, seed=args.seed)
    else:
        from twins_mm.demo_data.coco import make_coco
        counts = {k: v for k, v in (('num_train', args.num_train), ('num_val', args.num_val))
                  if v is not None}
        make_coco(args.out, seed=args.seed, **counts)
        root = args.out
    print(f'{args.layout} demo data written to {root}')


if __name__ == '__main__':
    main()
