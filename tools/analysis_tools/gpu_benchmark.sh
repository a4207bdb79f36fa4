#!/usr/bin/env bash
# The GPU benchmark in one command: benchmark.py --preset gpu, i.e. bf16 autocast tables of
# all six backbones (training batch 2/8/32, inference batch 1/8/32) beside mmseg's and
# timm's Twins, whole models in mmengine's training loop, torch.compile sections and an fp32
# (TF32) table. Installs nothing, needs no network.
#
#   bash tools/analysis_tools/gpu_benchmark.sh [--out DIR] [benchmark.py flags ...]
#
# The output goes to DIR/benchmark_gpu.txt (default work_dirs/benchmark_gpu). Flags after
# --out go to benchmark.py and override the preset, e.g. --arch svt-s pcpvt-s, --runs 20,
# --amp fp32, --budget-s 600 (skip sections once that many seconds are spent; default: run
# them all). Python: .venv/bin/python when the checkout has a .venv, else python3 (GPU_PY
# overrides). A reference that cannot be built (mmseg or mmdet without mmcv's compiled ops,
# no timm) is dropped with the reason printed.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; }

RESULT_DIR="$ROOT/work_dirs/benchmark_gpu"
case "${1:-}" in
  --out) [ $# -ge 2 ] || { echo "error: --out needs a folder, e.g. --out work_dirs/benchmark_gpu" >&2; exit 2; }
         RESULT_DIR="$2"; shift 2 ;;
  --out=*) RESULT_DIR="${1#--out=}"; shift ;;
  -h|--help) usage; exit 0 ;;
esac

if [ -n "${GPU_PY:-}" ]; then PY="$GPU_PY"
elif [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"
else PY=python3; fi

if ! "$PY" -c "import torch, mmengine" >/dev/null 2>&1; then
  echo "error: $PY cannot import torch and mmengine; install them (torch with CUDA, pip install mmengine) or point GPU_PY at the Python that has them." >&2
  exit 2
fi
if [ "$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null)" != 1 ]; then
  echo "error: torch ($PY) sees no CUDA GPU; this benchmark measures a GPU. For the CPU tables run python tools/analysis_tools/benchmark.py (docs/benchmark.md)." >&2
  exit 2
fi

mkdir -p "$RESULT_DIR" || { echo "error: cannot create the output folder $RESULT_DIR; pass a writable one with --out DIR" >&2; exit 2; }
LOG="$(cd "$RESULT_DIR" && pwd)/benchmark_gpu.txt"

{
  echo "# twins_mm GPU benchmark, $(date -u +%Y-%m-%dT%H:%M:%SZ), python $PY"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -1
} | tee "$LOG"
PYTHONUNBUFFERED=1 "$PY" tools/analysis_tools/benchmark.py --preset gpu "$@" 2>&1 | tee -a "$LOG"
RC=${PIPESTATUS[0]}
echo "exit code: $RC; output in $LOG" | tee -a "$LOG"
exit "$RC"
