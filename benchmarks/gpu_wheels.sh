#!/usr/bin/env bash
# Wheels that benchmarks/gpu_check.py needs on a GPU machine that has CUDA torch but no network and no
# DeepSpeed (the lent H200 image: Python 3.12, torch 2.11+cu130, einops/numpy/psutil/pyyaml/tqdm present):
# DeepSpeed built here as a pure-Python wheel (no ops: we use torch's AdamW, nothing JIT-compiles) and the
# few of its requirements that image lacks. About 5 MB, into .whl/ (git-ignored). On the GPU machine:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
#   PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out OUT
# flash-attn and xformers wheels are CUDA/torch-specific builds of hundreds of MB: bring them only where
# they match the machine's torch; without them gpu_check measures torch SDPA's own kernels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
PYVER="${GPU_PYTHON_VERSION:-3.12}"
mkdir -p .whl
"$PY" -m pip wheel --quiet --no-deps -w .whl "deepspeed==0.19.8"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection
ls -1 .whl
