#!/usr/bin/env bash
# The whole test suite: lint (ruff) and tests (pytest), in the project's virtual environment.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
bash "$ROOT/scripts/install_slurm.sh"  # a one-node SLURM for tests/test_slurm.py; never fatal (they skip)
cd "$ROOT"
PY="${LATTE_VENV:-$ROOT/.venv}/bin"
export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
"$PY/ruff" check .
"$PY/ruff" format --check .
"$PY/python" -m pytest --durations=15 "$@"
