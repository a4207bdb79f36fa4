#!/usr/bin/env bash
# Runs the GPU test tier (`make test-gpu`: the tests marked `cuda`) and records what ran
# where: device, driver, torch / CUDA / Python versions, which OpenMMLab libraries were
# importable, pass/fail and pytest's summary. Installs nothing, needs no network.
#
#   bash tools/gpu_check.sh [--out DIR]    # record in DIR (default work_dirs/gpu_check):
#                                          # gpu_check.txt, test-gpu.log, junit.xml
#
# Python: .venv/bin/python when the checkout has a .venv, else python3 (GPU_PY overrides).
# It needs torch with CUDA, mmengine and pytest; the training tests of tests/gpu also need
# mmcv with its compiled CUDA ops, mmseg and mmdet, and are skipped with the reason where
# those do not import. GPU_CHECK_TIMEOUT (seconds, default 3600) stops a hung run.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; }

RECORD_DIR="$ROOT/work_dirs/gpu_check"
while [ $# -gt 0 ]; do
  case "$1" in
    --out) [ $# -ge 2 ] || { echo "error: --out needs a folder, e.g. --out work_dirs/gpu_check" >&2; exit 2; }
           RECORD_DIR="$2"; shift 2 ;;
    --out=*) RECORD_DIR="${1#--out=}"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "error: unknown argument '$1'; usage: bash tools/gpu_check.sh [--out DIR]" >&2; exit 2 ;;
  esac
done

if [ -n "${GPU_PY:-}" ]; then PY="$GPU_PY"
elif [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"
else PY=python3; fi

if ! "$PY" -c "import torch, mmengine, pytest" >/dev/null 2>&1; then
  echo "error: $PY cannot import torch, mmengine and pytest; install them (pip install mmengine pytest, torch with CUDA) or point GPU_PY at the Python that has them." >&2
  exit 2
fi

mkdir -p "$RECORD_DIR" || { echo "error: cannot create the record folder $RECORD_DIR; pass a writable one with --out DIR" >&2; exit 2; }
RECORD_DIR="$(cd "$RECORD_DIR" && pwd)"
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
TIMEOUT="${GPU_CHECK_TIMEOUT:-3600}"
PYTEST_ADDOPTS="${PYTEST_ADDOPTS:-} --junitxml=$RECORD_DIR/junit.xml" \
  timeout "$TIMEOUT" "${CMD[@]}" 2>&1 | tee "$LOG"
RC=${PIPESTATUS[0]}
ELAPSED=$(( $(date +%s) - START ))

note "pytest summary: $(grep -E '^=+ .*(passed|failed|skipped|error|no tests ran).* =+$' "$LOG" | tail -1)"
grep -E '^(SKIPPED|FAILED|ERROR)' "$LOG" | sed 's/^/  /' | tee -a "$RECORD"
case $RC in
  0) if [ "$CUDA" = 1 ]; then RESULT=PASS; else RESULT="NOT RUN on a GPU (no CUDA device: the cuda tests were skipped)"; fi ;;
  124) RESULT="FAIL (timed out after $TIMEOUT s; raise GPU_CHECK_TIMEOUT)" ;;
  *) RESULT="FAIL (exit code $RC)" ;;
esac
note "result: $RESULT in ${ELAPSED} s"
note "full log: $LOG"
exit $RC
