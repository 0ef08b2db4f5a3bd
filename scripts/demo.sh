#!/usr/bin/env bash
# The main job end to end on embedded defaults, on this machine (CPU ranks when there is no GPU):
# real mp4 clips -> VAE latents in WebDataset shards -> Latte-T/2 trained with DeepSpeed on 2 ranks.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
exec "${LATTE_VENV:-$ROOT/.venv}/bin/python" "$ROOT/scripts/demo.py" "$@"
