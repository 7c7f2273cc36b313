#!/usr/bin/env bash
# Prepare the wheels DeepSpeed needs on the GPU machine (Python 3.12, x86-64, torch / numpy /
# triton already there, no network, no Ray / MLflow) into infra/gpu/wheels/ (git-ignored):
#
#   1. DeepSpeed's own wheel, pure Python (DS_BUILD_OPS=0: no prebuilt CUDA ops; the engine's
#      ZeRO-2 path with a torch optimizer needs none), built here from the PyPI sdist;
#   2. its dependencies the GPU image lacks, as CPython 3.12 manylinux x86-64 (or pure) wheels,
#      at the versions pinned in requirements.lock.
#
# Usage (on a machine with PyPI access and the project's .venv):
#   bash infra/gpu/prepare_wheels.sh [OUT_DIR]        # default infra/gpu/wheels
# Then carry OUT_DIR with the repository and, on the GPU machine, run
#   bash infra/gpu/install_wheels.sh && PYTHONPATH=/tmp/glm-gpu-site:$PWD python3 benchmarks/gpu_suite.py
# (or `make bench-gpu`, which does both). See docs/benchmarks.md, "Measuring on a GPU".
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-infra/gpu/wheels}
PY=${PYTHON:-.venv/bin/python}
PYVER=${GPU_PYTHON_VERSION:-3.12}
ABI=cp${PYVER/./}

pin() {  # the exact pin of a package in requirements.lock
    local line
    line=$(grep -i -E "^$1==" requirements.lock) || { echo "no pin for $1 in requirements.lock" >&2; exit 1; }
    echo "$line"
}

rm -rf "$OUT"
mkdir -p "$OUT"
echo "[wheels] building $(pin deepspeed) (pure Python, no ops) ..."
DS_BUILD_OPS=0 DS_BUILD_STRING="" "$PY" -m pip wheel --quiet --disable-pip-version-check --no-deps \
    --no-build-isolation --wheel-dir "$OUT" "$(pin deepspeed)"

# DeepSpeed's requirements without torch / numpy (on the GPU machine), with their own dependencies.
DEPS=(einops hjson msgpack ninja packaging psutil py-cpuinfo pydantic pydantic_core annotated-types
      typing-inspection typing_extensions tqdm)
PINS=()
for d in "${DEPS[@]}"; do PINS+=("$(pin "$d")"); done
echo "[wheels] downloading ${PINS[*]} for CPython $PYVER x86-64 ..."
"$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version "$PYVER" --implementation cp --abi "$ABI" --abi abi3 --abi none \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 --platform any \
    --dest "$OUT" "${PINS[@]}"

# Every requirement of the DeepSpeed wheel must be satisfied by a wheel here or by the GPU image.
"$PY" - "$OUT" <<'PYCHECK'
import sys, zipfile, pathlib, re
out = pathlib.Path(sys.argv[1])
wheels = sorted(out.glob("*.whl"))
have = {re.split(r"-", w.name)[0].lower().replace("_", "-") for w in wheels}
image = {"torch", "numpy", "triton"}  # on the GPU machine
ds = next(w for w in wheels if w.name.startswith("deepspeed-"))
with zipfile.ZipFile(ds) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    reqs = [l.split(":", 1)[1].strip() for l in z.read(meta).decode().splitlines() if l.startswith("Requires-Dist:")]
names = {re.split(r"[ ;<>=!~\[(]", r)[0].lower().replace("_", "-") for r in reqs if "extra ==" not in r}
missing = sorted(names - have - image)
if missing:
    sys.exit(f"[wheels] missing wheels for {missing}")
size = sum(w.stat().st_size for w in wheels)
print(f"[wheels] {len(wheels)} wheels, {size / 2**20:.1f} MiB in {out}: " + ", ".join(w.name for w in wheels))
PYCHECK
