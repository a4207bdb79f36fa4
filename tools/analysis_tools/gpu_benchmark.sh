#!/usr/bin/env bash
# The GPU benchmark of issue #10 in one command: every backbone table (bf16 targets at
# training batch 2/8/32 and inference batch 1/8/32, all six variants, beside timm and
# mmseg), the whole-model loop, torch.compile sections and the fp32 baseline, within a
# 285-second budget (benchmark.py --preset gpu; sections that do not fit are skipped and
# named). No network, no install into the environment. Output: $OUT/benchmark_gpu.txt
# (or work_dirs/benchmark_gpu/benchmark_gpu.txt).
#
#   bash tools/analysis_tools/gpu_benchmark.sh                 # on the GPU machine
#   bash tools/analysis_tools/gpu_benchmark.sh --fetch-wheels  # here, before: the wheels
#   bash tools/analysis_tools/gpu_benchmark.sh --arch svt-s    # extra flags go to benchmark.py
#
# Wheels (ignored paths; carry both): .whl/gpu (mmengine and friends, tools/gpu_check.sh
# --fetch-wheels) and .whl/bench (mmcv-lite 2.1.0 and mmsegmentation 1.2.2, pure Python,
# about 3 MB). mmcv-lite has no compiled ops, so mmseg's package cannot be imported; the
# benchmark then loads mmseg's backbones/twins.py alone (see benchmark.mmseg_twins). The
# whole-model loop needs mmcv's compiled ops (mmseg's and mmdet's models import them) and
# is reported as dropped where they are missing.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
BENCH_WHEELS="$ROOT/.whl/bench"
if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY=python3; fi

if [ "${1:-}" = "--fetch-wheels" ]; then
  bash "$ROOT/tools/gpu_check.sh" --fetch-wheels || exit
  mkdir -p "$BENCH_WHEELS"
  exec "$PY" -m pip download --no-deps --only-binary=:all: -d "$BENCH_WHEELS" \
    mmcv-lite==2.1.0 mmsegmentation==1.2.2
fi

OUT_DIR="${OUT:-$ROOT/work_dirs/benchmark_gpu}"
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/benchmark_gpu.txt"

# Missing pure-Python dependencies: the carried wheels, unpacked onto PYTHONPATH.
WHEELS=()
"$PY" -c "import mmengine" >/dev/null 2>&1 || WHEELS+=("$ROOT"/.whl/gpu/*.whl)
"$PY" -c "import mmcv, mmseg" >/dev/null 2>&1 || WHEELS+=("$BENCH_WHEELS"/*.whl)
if [ ${#WHEELS[@]} -gt 0 ]; then
  DEPS="$(mktemp -d "${TMPDIR:-/tmp}/twins_mm_bench_deps.XXXXXX")"
  "$PY" - "$DEPS" "${WHEELS[@]}" <<'PYEOF'
import os
import sys
import zipfile
for wheel in sys.argv[2:]:
    if os.path.exists(wheel):
        zipfile.ZipFile(wheel).extractall(sys.argv[1])
PYEOF
  export PYTHONPATH="$DEPS${PYTHONPATH:+:$PYTHONPATH}"
fi

{
  echo "# twins_mm GPU benchmark, $(date -u +%Y-%m-%dT%H:%M:%SZ), python $PY"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -1
} | tee "$LOG"
PYTHONUNBUFFERED=1 timeout "${BENCH_TIMEOUT:-420}" "$PY" \
  tools/analysis_tools/benchmark.py --preset gpu "$@" 2>&1 | tee -a "$LOG"
RC=${PIPESTATUS[0]}
echo "exit code: $RC" | tee -a "$LOG"
exit "$RC"
