#!/usr/bin/env bash
# The main job end to end on embedded defaults, on this machine (CPU ranks when there is no GPU):
# real mp4 clips -> VAE latents in WebDataset shards -> Latte-T/2 trained with DeepSpeed on 2 ranks.
# With --t2v: the text-to-video path (captioned clips + a tiny T5 -> LatteT2V-T/2 -> videos from prompts).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
exec "${LATTE_VENV:-$ROOT/.venv}/bin/python" "$ROOT/scripts/demo.py" "$@"
