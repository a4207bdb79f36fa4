#!/usr/bin/env bash
# Runs the GPU tier (`make test-gpu`: the tests marked `cuda`) and records what
# ran where: device, driver, torch / CUDA / Python versions, which OpenMMLab libraries were
# importable, pass/fail and pytest's summary. No network, no install into the environment.
#
#   bash tools/gpu_check.sh                 # record under $OUT (if set) or work_dirs/gpu_check
#   bash tools/gpu_check.sh --fetch-wheels  # (on a machine with a package index) download the
#                                           # pure-Python wheels below into .whl/gpu
#
# Python: .venv/bin/python when the repo has a .venv, else python3. A bare GPU machine
# (torch + CUDA, no mmengine, no pytest) needs mmengine and pytest: carry .whl/gpu (an
# ignored path, about 3 MB) and this script unpacks those wheels into a temporary folder
# on PYTHONPATH. twins_mm imports mmengine.runner, which imports cv2; where OpenCV is not
# installed (its wheel is 60 MB) a stub `cv2` that fails on any use is put on the path and
# the record says so: no test of the GPU tier calls OpenCV.
# The training tests of tests/gpu (mmengine Runner on real configs) also need mmcv with its
# compiled CUDA ops, mmseg and mmdet; without them they are skipped with the reason.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
WHEELS="$ROOT/.whl/gpu"
# mmengine as in requirements; the others in their newest versions for the oldest Python the
# GPU machine may have (GPU_PYTHON_VERSION, default 3.10), which newer Pythons also run.
GPU_WHEELS=(mmengine==0.10.7 addict yapf termcolor rich markdown-it-py mdurl pygments pytest
            pluggy iniconfig packaging platformdirs exceptiongroup tomli)

if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY=python3; fi

if [ "${1:-}" = "--fetch-wheels" ]; then
  mkdir -p "$WHEELS"
  exec "$PY" -m pip download --no-deps --only-binary=:all: --implementation py --abi none \
    --platform any --python-version "${GPU_PYTHON_VERSION:-3.10}" -d "$WHEELS" "${GPU_WHEELS[@]}"
fi

RECORD_DIR="${OUT:-$ROOT/work_dirs/gpu_check}"
mkdir -p "$RECORD_DIR"
RECORD="$RECORD_DIR/gpu_check.txt"
LOG="$RECORD_DIR/test-gpu.log"
: > "$RECORD"
note() { echo "$*" | tee -a "$RECORD"; }

note "# twins_mm GPU tier check, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
if git -C "$ROOT" rev-parse --git-dir >/dev/null 2>&1; then
  note "commit: $(git -C "$ROOT" rev-parse --short HEAD)$(git -C "$ROOT" diff --quiet HEAD -- 2>/dev/null || echo ' (with uncommitted changes)')"
else
  note "commit: unknown (not a git checkout)"
fi
note "python: $PY ($("$PY" -c 'import sys; print(sys.version.split()[0])' 2>&1))"

# Dependencies missing here (mmengine, pytest, ...): the carried wheels, unpacked.
if ! "$PY" -c "import mmengine, pytest" >/dev/null 2>&1; then
  if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    DEPS="$(mktemp -d "${TMPDIR:-/tmp}/twins_mm_gpu_deps.XXXXXX")"
    "$PY" - "$DEPS" "$WHEELS"/*.whl <<'PYEOF'
import sys
import zipfile
for wheel in sys.argv[2:]:
    zipfile.ZipFile(wheel).extractall(sys.argv[1])
PYEOF
    export PYTHONPATH="$DEPS${PYTHONPATH:+:$PYTHONPATH}"
    note "dependencies: unpacked $(ls "$WHEELS"/*.whl | wc -l) wheels of .whl/gpu into $DEPS"
  else
    note "dependencies: mmengine or pytest missing and no wheels in .whl/gpu (run --fetch-wheels where an index is reachable and carry .whl/gpu)"
  fi
fi
if ! "$PY" -c "import cv2" >/dev/null 2>&1; then
  STUB="$(mktemp -d "${TMPDIR:-/tmp}/twins_mm_cv2_stub.XXXXXX")"
  mkdir -p "$STUB/cv2"
  cat > "$STUB/cv2/__init__.py" <<'PYEOF'
"""Stand-in for OpenCV on a machine without it (tools/gpu_check.sh): imports, fails on use."""


def __getattr__(name):
    raise AttributeError(f'cv2.{name}: OpenCV is not installed on this machine (stub module '
                         'of tools/gpu_check.sh)')
PYEOF
  export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$STUB"
  note "cv2: not installed; a stub that fails on use is on the path (mmengine.runner imports cv2)"
fi

"$PY" - <<'PYEOF' 2>&1 | tee -a "$RECORD"
import importlib
import subprocess

import torch

print(f'torch: {torch.__version__}, CUDA build {torch.version.cuda}, cuDNN '
      f'{torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}')
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f'device: {p.name}, {p.total_memory / 2**30:.0f} GiB, compute capability '
          f'{p.major}.{p.minor}, bf16 {torch.cuda.is_bf16_supported()}, '
          f'{torch.cuda.device_count()} device(s)')
    try:
        smi = subprocess.run(['nvidia-smi', '--query-gpu=name,driver_version',
                              '--format=csv,noheader'], capture_output=True, text=True,
                             timeout=30).stdout.strip()
        print(f'nvidia-smi: {smi}')
    except Exception as e:  # no nvidia-smi
        print(f'nvidia-smi: unavailable ({e})')
else:
    print('device: no CUDA device visible to torch (the cuda tests will be skipped)')
for name in ('mmengine', 'mmcv', 'mmcv.ops', 'mmseg', 'mmdet', 'timm', 'twins_mm'):
    try:
        module = importlib.import_module(name)
        print(f'{name}: {getattr(module, "__version__", "importable")}')
    except Exception as e:
        print(f'{name}: not importable ({type(e).__name__}: {str(e).splitlines()[0][:120]})')
PYEOF

CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
START=$(date +%s)
if command -v make >/dev/null 2>&1; then
  CMD=(make --no-print-directory test-gpu "GPU_PY=$PY")
else  # the Makefile's test-gpu command
  mapfile -t FILES < <(grep -rlE --include='test_*.py' 'pytest\.mark\.cuda' tests | sort)
  CMD=("$PY" -m pytest -m cuda "${FILES[@]}")
fi
note "command: ${CMD[*]}"
PYTEST_ADDOPTS="${PYTEST_ADDOPTS:-} --junitxml=$RECORD_DIR/junit.xml" \
  timeout "${GPU_CHECK_TIMEOUT:-540}" "${CMD[@]}" 2>&1 | tee "$LOG"
RC=${PIPESTATUS[0]}
ELAPSED=$(( $(date +%s) - START ))

note "pytest summary: $(grep -E '^=+ .*(passed|failed|skipped|error|no tests ran).* =+$' "$LOG" | tail -1)"
grep -E '^(SKIPPED|FAILED|ERROR)' "$LOG" | sed 's/^/  /' | tee -a "$RECORD"
case $RC in
  0) if [ "$CUDA" = 1 ]; then RESULT=PASS; else RESULT="NOT RUN on a GPU (no CUDA device: the cuda tests were skipped)"; fi ;;
  124) RESULT="FAIL (timed out after ${GPU_CHECK_TIMEOUT:-540} s)" ;;
  *) RESULT="FAIL (exit code $RC)" ;;
esac
note "result: $RESULT in ${ELAPSED} s"
note "full log: $LOG"
exit $RC
