#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv: the CPU torch 2.13.0 wheel first, then the
# package with its dev extras. Idempotent: a stamp records what was installed. Source it or run it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LATTE_VENV:-$ROOT/.venv}"
TORCH_SPEC="${LATTE_TORCH_SPEC:-torch==2.13.0}"  # GPU users: set LATTE_TORCH_SPEC to their CUDA build
STAMP="$VENV/.latte-installed"
WANT="$(cat "$ROOT/setup.py" "$ROOT/scripts/setup_env.sh" | sha256sum | cut -c1-16) $TORCH_SPEC"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment $VENV"
  python3 -m venv "$VENV"
fi
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  echo "[setup] installing $TORCH_SPEC, then the package with [dev] extras (about 1-2 minutes)"
  # (grep drops pip's notes about find-links folders that this machine kind may lack)
  pip_install() { "$VENV/bin/pip" install --quiet "$@" 2>&1 | { grep -v "is ignored: it is neither" || true; }; }
  pip_install --upgrade pip
  pip_install "$TORCH_SPEC"
  torch_before="$("$VENV/bin/python" -W ignore -c 'import torch; print(torch.__version__)')"
  pip_install -e "$ROOT[dev]"
  torch_after="$("$VENV/bin/python" -W ignore -c 'import torch; print(torch.__version__)')"
  if [ "$torch_before" != "$torch_after" ]; then
    echo "[setup] error: installing the package replaced torch $torch_before with $torch_after" >&2
    exit 1
  fi
  echo "$WANT" > "$STAMP"
fi
versions='from importlib.metadata import version as v; print("torch", v("torch") + ", deepspeed", v("deepspeed"))'
echo "[setup] ready: $("$VENV/bin/python" -c "$versions")"
