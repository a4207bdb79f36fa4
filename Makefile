# The two commands of the README. Both install first (idempotent: a second run reuses
# the environment in .venv, and pip's wheel cache keeps the compiled mmcv).
PY := .venv/bin/python

.PHONY: install test demo test-gpu

install:
	bash tools/install.sh

test: install
	$(PY) -m pytest tests

# The main job on data the project makes itself (no download): Twins-SVT-S Semantic FPN
# on demo ADE20K, then Twins-SVT-S RetinaNet on demo COCO. Outputs under demo_out/.
demo: install
	$(PY) tools/demo_segmentation.py
	$(PY) tools/demo_detection.py

# The GPU tier (tests marked cuda, tests/gpu; see docs/gpu.md): no install, no network.
# Uses .venv when the checkout has one, else python3 (a GPU machine with torch + CUDA).
# tools/gpu_check.sh runs it and records the device, versions and result.
# The test files that mark tests cuda are found by that marker, so that the rest of the suite (which
# imports mmcv, mmseg, mmdet) is not collected on a GPU machine without them.
GPU_PY ?= $(if $(wildcard .venv/bin/python),.venv/bin/python,python3)
GPU_TESTS ?= $(sort $(shell grep -rlE --include='test_*.py' 'pytest\.mark\.cuda' tests))

test-gpu:
	$(GPU_PY) -m pytest -m cuda $(GPU_TESTS)
