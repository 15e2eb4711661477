#!/usr/bin/env bash
# One command on a GPU machine that can fetch nothing: install the wheels carried in .whl/ (make gpu-wheels) into a
# private folder with pip --no-index, then run benchmarks/gpu_check.py with the arguments given (docs/gpu_check.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SITE=${GPU_CHECK_SITE:-/tmp/distseg-gpu-site}
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
    export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    echo "gpu_check.sh: no wheels in .whl/ (make gpu-wheels); using the packages installed here" >&2
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
exec "$PY" benchmarks/gpu_check.py "$@"
