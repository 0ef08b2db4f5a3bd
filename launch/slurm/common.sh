# shellcheck shell=bash
# Set-up shared by the sbatch scripts in this folder (sourced, not run): the repository, the site's env.sh,
# the Python to run, one "[latte]" line per fact. All training and sharding logic lives in Python.

# This file is sourced from the repository (the scripts locate it through `scontrol show job`, because sbatch
# runs a copy of the script from slurmd's spool directory), so its own path gives the repository.
LATTE_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

say() { echo "[latte] $*"; }

usage() {  # one line on stderr, exit code 2 (the jobs' "bad input" code; never requeued)
  echo "usage: $1" >&2
  exit 2
}

# The site's settings: modules, a virtualenv or conda env, caches, NCCL/IB variables, S3 endpoint (see
# env.sh.example). Sourced with `set -u` off: module and conda scripts read unset variables.
latte_site_env() {
  local site="$LATTE_ROOT/launch/slurm/env.sh"
  if [ -f "$site" ]; then
    set +u
    # shellcheck source=/dev/null
    source "$site"
    set -u
    say "sourced $site"
  fi
  # The interpreter: $PYTHON (from the environment sbatch exported, or env.sh), else the activated
  # virtualenv/conda env's python, else the repository's .venv (scripts/setup_env.sh), else python3.
  if [ -z "${PYTHON:-}" ]; then
    if [ -n "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ]; then
      PYTHON=python
    elif [ -x "$LATTE_ROOT/.venv/bin/python" ]; then
      PYTHON="$LATTE_ROOT/.venv/bin/python"
    else
      PYTHON=python3
    fi
  fi
  if ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "error: python '$PYTHON' not found (set PYTHON=... or activate an env in launch/slurm/env.sh)" >&2
    exit 2
  fi
  export PYTHON
  # the repository importable from any working directory (`python -m data_pipeline...`), installed or not
  export PYTHONPATH="$LATTE_ROOT${PYTHONPATH:+:$PYTHONPATH}"
  # CPU threads per rank: what SLURM gave the task, unless the user chose
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
}

job_field() {  # one field of this job in `scontrol show job` (of its first record: an array lists each task)
  scontrol show job "$SLURM_JOB_ID" | awk -v pat="^ *$1=" 'sub(pat, "") && !n++'
}
