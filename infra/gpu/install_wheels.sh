#!/usr/bin/env sh
# On the GPU machine (no network): put the wheels of infra/gpu/wheels into a private site
# directory (default /tmp/glm-gpu-site) without touching the system Python; then run with
#   PYTHONPATH=/tmp/glm-gpu-site:$PWD python3 benchmarks/gpu_suite.py
# pip is used when present (--no-index --no-deps --target), else the wheels are unpacked
# (a wheel is a zip of the installed files).
set -eu
cd "$(dirname "$0")/../.."
SITE=${1:-/tmp/glm-gpu-site}
PY=${GPU_PYTHON:-python3}
WHEELS=infra/gpu/wheels
ls "$WHEELS"/*.whl >/dev/null 2>&1 || { echo "no wheels in $WHEELS: run infra/gpu/prepare_wheels.sh where PyPI is reachable" >&2; exit 1; }
mkdir -p "$SITE"
if "$PY" -m pip --version >/dev/null 2>&1; then
    "$PY" -m pip install --quiet --disable-pip-version-check --no-index --no-deps --no-compile --upgrade \
        --target "$SITE" "$WHEELS"/*.whl
else
    for w in "$WHEELS"/*.whl; do "$PY" -m zipfile -e "$w" "$SITE"; done
fi
echo "wheels installed into $SITE"
