#!/usr/bin/env bash
# The sharding job (videos -> VAE latents -> WebDataset shards) as a SLURM array, then one index job.
#
#   mkdir -p logs && sbatch --array=0-(N-1) launch/slurm/shard.sh SRC DST [shard_latents options]
#
# Array task i of N runs `python -m data_pipeline.shard_latents --input SRC --output DST [options]`, which
# takes its share from SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN and SLURM_ARRAY_TASK_COUNT (so use a
# contiguous range; a `%K` throttle is fine). Each task writes its own shards and part file; the last task to
# finish already merges them into DST/index.json. Task 0 also submits one job that runs after every task
# succeeded (afterok on the array; cancelled if one fails) and merges the parts again with
# `python -m data_pipeline.build_index DST`: it checks that no task's part is missing and is the one job to
# depend on (`sbatch --dependency=afterok:<index job> launch/slurm/train.sh ...`); its id is in task 0's log.
#
# Restarts: a rerun of the same command (or a requeue after preemption) skips the shards a task finished and
# redoes the rest, so resubmitting the array finishes what a killed one left. Defaults: one GPU per task (the
# VAE); CPU-only: `--gpus-per-node=0`. Several GPUs per task: `--gpus-per-node=K --devices cuda:0,...`.
# Site settings and the interpreter: as for train.sh (launch/slurm/env.sh, $PYTHON).
#
# (sbatch reads #SBATCH lines up to the first command; comments may sit between them.)
#SBATCH --job-name=latte-shard
#SBATCH --ntasks=1
#SBATCH --gpus-per-node=1
# video decode workers (--workers) and their threads
#SBATCH --cpus-per-task=8
# on preemption or node failure SLURM may requeue a task: it redoes only its unfinished shards
#SBATCH --requeue
#SBATCH --open-mode=append
# %A the array's job id, %a the task's index in it
#SBATCH --output=logs/%x-%A_%a.out

set -euo pipefail
here="$(dirname "${BASH_SOURCE[0]}")"
if [ ! -f "$here/common.sh" ]; then  # sbatch runs a copy in slurmd's spool; SLURM records the original
  cmd="$(scontrol show job "${SLURM_JOB_ID:-0}" | awk 'sub(/^ *Command=/, "") && !n++')"
  here="$(dirname "${cmd% "$*"}")"  # (the command is "script args...", once per task of an array)
fi
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$here/common.sh"

USAGE="sbatch --array=0-(N-1) launch/slurm/shard.sh SRC DST [data_pipeline.shard_latents options]"
[ -n "${SLURM_JOB_ID:-}" ] || usage "$USAGE  (run it with sbatch, not bash)"
if [ "${1:-}" = "--index" ]; then  # the dependent job task 0 submits: merge the parts, check none is missing
  [ $# -eq 2 ] || usage "sbatch launch/slurm/shard.sh --index DST"
  latte_site_env
  say "index job $SLURM_JOB_ID: merging the parts of $2"
  exec "$PYTHON" -m data_pipeline.build_index "$2"
fi
if [ $# -lt 2 ] || [ "${1#-}" != "$1" ] || [ "${2#-}" != "$2" ]; then usage "$USAGE"; fi
src="$1"
dst="$2"
shift 2
latte_site_env

task="${SLURM_ARRAY_TASK_ID:-0}"
first="${SLURM_ARRAY_TASK_MIN:-0}"
say "job $SLURM_JOB_ID: array ${SLURM_ARRAY_JOB_ID:-none} task $((task - first)) of" \
  "${SLURM_ARRAY_TASK_COUNT:-1} on $(hostname), restart ${SLURM_RESTART_COUNT:-0}, started $(date '+%F %T')"
say "input $src; output $dst; options: $*"
say "python $PYTHON; repository $LATTE_ROOT"

# Task 0, on its first run, submits the index job: same partition and account, no GPU, its log beside this
# task's. (A requeued task 0 does not: its first run's index job still waits on the same array.)
if [ -n "${SLURM_ARRAY_JOB_ID:-}" ] && [ "$task" = "$first" ] && [ "${SLURM_RESTART_COUNT:-0}" = 0 ]; then
  log_dir="$(dirname "$(job_field StdOut)")"
  index_job="$(sbatch --parsable --dependency="afterok:$SLURM_ARRAY_JOB_ID" --kill-on-invalid-dep=yes \
    --job-name="$SLURM_JOB_NAME-index" --output="$log_dir/%x-%j.out" --ntasks=1 --cpus-per-task=1 \
    --gpus-per-node=0 ${SLURM_JOB_PARTITION:+--partition="$SLURM_JOB_PARTITION"} \
    ${SLURM_JOB_ACCOUNT:+--account="$SLURM_JOB_ACCOUNT"} "$LATTE_ROOT/launch/slurm/shard.sh" --index "$dst")"
  say "index job $index_job runs once every task of array $SLURM_ARRAY_JOB_ID succeeded (afterok)"
fi
exec "$PYTHON" -m data_pipeline.shard_latents --input "$src" --output "$dst" "$@"
