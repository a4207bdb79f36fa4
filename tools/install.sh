#!/usr/bin/env bash
# Builds a working twins_mm environment on a CPU-only machine with Python 3.11.
#
# Order matters (see docs/install.md): torch 2.13 declares setuptools>=77, while the
# mmcv 2.1.0 sdist imports pkg_resources (setuptools<70). One pip resolve of both fails,
# so torch goes in first, mmcv is compiled under the old setuptools without build
# isolation, then the new setuptools is restored. Re-running reuses what is installed;
# pip's wheel cache keeps the compiled mmcv wheel for fresh environments. setuptools stays
# below 81: mmengine resolves 'mmdet::' / 'mmseg::' config bases through pkg_resources,
# which setuptools 81 removed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${TWINS_MM_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"

if [ ! -x "$PY" ]; then
  echo "[install] creating virtual environment $VENV"
  python3 -m venv "$VENV"
  "$PY" -m pip install -q --upgrade "pip>=24"
fi
PIP=("$PY" -m pip install -q)

have() { "$PY" - "$@" <<'PYEOF' >/dev/null 2>&1
import sys
from importlib.metadata import version
for spec in sys.argv[1:]:
    name, _, want = spec.partition("==")
    assert version(name) == want, spec
PYEOF
}

# 1. torch first, pinned: a bare 'torch' would pull a multi-GB CUDA build.
have torch==2.13.0 mmengine==0.10.7 || "${PIP[@]}" -r "$ROOT/requirements/torch.txt"

# 2. mmcv with its compiled ops (NMS, RoIAlign, ...), at the version of requirements/mmcv.txt;
#    no wheel exists for torch 2.13.
MMCV_VERSION="$(sed -n 's/^mmcv==//p' "$ROOT/requirements/mmcv.txt")"
if ! "$PY" -c "import mmcv, mmcv.ops; from mmcv.ops import nms; assert mmcv.__version__ == '$MMCV_VERSION'" >/dev/null 2>&1; then
  echo "[install] building mmcv $MMCV_VERSION with ops (about 9 minutes on 2 cores unless pip's wheel cache has it)"
  "${PIP[@]}" "setuptools<70" wheel ninja
  MMCV_WITH_OPS=1 MAX_JOBS="${MAX_JOBS:-2}" "${PIP[@]}" --no-build-isolation -r "$ROOT/requirements/mmcv.txt"
  "${PIP[@]}" "setuptools>=77.0.3,<81"
fi

# 3. The downstream libraries and twins_mm itself (editable).
"$PY" -c "import pkg_resources" >/dev/null 2>&1 || "${PIP[@]}" "setuptools>=77.0.3,<81"
"${PIP[@]}" -r "$ROOT/requirements/runtime.txt" -r "$ROOT/requirements/tests.txt"
"${PIP[@]}" --no-deps -r "$ROOT/requirements/tests_no_deps.txt"
# twins_mm without its dependencies: setup.py states ranges for users' environments; the
# exact stack above is what runs here.
"${PIP[@]}" --no-deps --no-build-isolation -e "$ROOT"

"$PY" -c "import twins_mm, mmcv, mmseg, mmdet; from mmcv.ops import nms, roi_align; print('[install] ok: twins_mm', twins_mm.__version__, '| mmcv', mmcv.__version__, '| mmseg', mmseg.__version__, '| mmdet', mmdet.__version__)"
