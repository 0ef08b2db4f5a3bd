#!/usr/bin/env bash
# The main job end to end on embedded defaults, on this machine (CPU when there is no GPU):
# a tiny class-conditional Latte trained on synthetic latent clips; prints the loss falling.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
OUT="${LATTE_DEMO_DIR:-$ROOT/demo_output}"
exec "${LATTE_VENV:-$ROOT/.venv}/bin/python" train.py --config configs/tiny.yaml \
  --set train.max_steps=200 train.log_every=20 "train.results_dir=$OUT" "$@"
