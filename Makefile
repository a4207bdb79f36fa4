# The two commands of the README. Both install first (idempotent: a second run reuses
# the environment in .venv, and pip's wheel cache keeps the compiled mmcv).
PY := .venv/bin/python

.PHONY: install test demo

install:
	bash tools/install.sh

test: install
	$(PY) -m pytest tests

# The main job on data the project makes itself (no download): Twins-SVT-S Semantic FPN
# on demo ADE20K, then Twins-SVT-S RetinaNet on demo COCO. Outputs under demo_out/.
demo: install
	$(PY) tools/demo_segmentation.py
	$(PY) tools/demo_detection.py
