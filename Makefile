# The two commands of the README. Both install first (idempotent: a second run reuses
# the environment in .venv, and pip's wheel cache keeps the compiled mmcv).
PY := .venv/bin/python

.PHONY: install test demo

install:
	bash tools/install.sh

test: install
	$(PY) -m pytest tests

demo: install
	$(PY) tools/demo.py
