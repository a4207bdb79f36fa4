"""Small synthetic datasets in the exact ADE20K and COCO layouts, for demos and tests.

``twins_mm.demo_data.ade20k.make_ade20k`` and ``twins_mm.demo_data.coco.make_coco``;
the command line is ``tools/make_demo_data.py {ade20k,coco}``.
"""
