#!/usr/bin/env bash
# Train Latte on SLURM: one process per GPU (or per task) started by srun, rendezvous without ssh.
#
#   mkdir -p logs && sbatch [sbatch options] launch/slurm/train.sh CONFIG.yaml [--set key=value ...]
#
# Everything after the script goes to train.py (`--config CONFIG.yaml ...`). The #SBATCH lines below are
# defaults for 8-GPU nodes; options on the sbatch line win, e.g. 8 nodes: `sbatch --nodes=8 ...`, 4-GPU
# nodes: `--ntasks-per-node=4 --gpus-per-node=4`, CPU-only tasks: `--gpus-per-node=0 --ntasks-per-node=2
# --cpus-per-task=1` (how the tests run it). Submit from the directory relative paths (logs/, the config,
# train.results_dir) refer to; create logs/ first: SLURM does not, and a job without its log dir fails.
#
# Preemption and time limits: SLURM sends USR1 to this shell 180 s before the limit (--signal); the trap
# forwards it to every rank; the ranks agree on a step, checkpoint and exit 3; this script then requeues the
# job, which resumes from the latest checkpoint (train.resume=auto) with SLURM_RESTART_COUNT + 1. Exit codes
# of train.py: 0 finished (done), 2 config error (failed, not requeued), 3 preempted (requeued), anything
# else a crash (requeued while SLURM_RESTART_COUNT < LATTE_MAX_RESTARTS, default 3: no requeue loop).
# SIGTERM (scancel, the time limit itself, preemption) makes the ranks checkpoint too, but is never followed
# by a requeue from here: a user's scancel stays a cancel, and SLURM requeues what it preempts itself.
#
# Site settings (modules, env activation, caches, NCCL) go in launch/slurm/env.sh (see env.sh.example);
# the interpreter is $PYTHON, else the active env's python, else the repository's .venv, else python3.
#
# NCCL / InfiniBand (set them in env.sh or export them before sbatch; sbatch passes the environment on):
#   NCCL_SOCKET_IFNAME=ib0|eth0   the interface NCCL's bootstrap uses, when hosts have several
#   NCCL_IB_HCA=mlx5_0,mlx5_1     which IB adapters to use; NCCL_IB_DISABLE=1 forces TCP (no IB fabric)
#   NCCL_DEBUG=INFO               topology and transport choice in the log (WARN is quiet)
#   TORCH_NCCL_ASYNC_ERROR_HANDLING=1  a rank left in a collective by a crashed one errors out, not hangs
#   MASTER_ADDR / MASTER_PORT     override the rendezvous below (e.g. the IB hostname of the first node)
#
# (sbatch reads #SBATCH lines up to the first command; comments may sit between them.)
#SBATCH --job-name=latte
#SBATCH --nodes=1
# one task per GPU: srun starts one train.py per task, and each finds its GPU from SLURM_LOCALID
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
# decode/loader workers and host threads per rank (OMP_NUM_THREADS defaults to this)
#SBATCH --cpus-per-task=8
# USR1 to the batch shell (B:) 180 s before the time limit: time to checkpoint before the kill
#SBATCH --signal=B:USR1@180
# the job may be requeued (by this script after a preemption, or by SLURM on node failure / preemption)
#SBATCH --requeue
# a requeued job appends to its log instead of truncating it: one log per job id across restarts
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out

set -euo pipefail
here="$(dirname "${BASH_SOURCE[0]}")"
if [ ! -f "$here/common.sh" ]; then  # sbatch runs a copy in slurmd's spool; SLURM records the original
  cmd="$(scontrol show job "${SLURM_JOB_ID:-0}" | awk 'sub(/^ *Command=/, "") && !n++')"
  here="$(dirname "${cmd% "$*"}")"  # (the command is "script args...", once per task of an array)
fi
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$here/common.sh"

USAGE="sbatch [sbatch options] launch/slurm/train.sh CONFIG.yaml [--set key=value ...]"
[ -n "${SLURM_JOB_ID:-}" ] || usage "$USAGE  (run it with sbatch, not bash)"
if [ $# -lt 1 ] || [ -z "$1" ] || [ "${1#-}" != "$1" ]; then usage "$USAGE"; fi
config="$1"
shift
latte_site_env

# Rendezvous: rank 0 listens on the first host of the allocation, on a port derived from the job id (the
# same rule as latte/engine.py's rendezvous_env; a requeued job keeps its id, so its port). train.py maps
# SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID to RANK / WORLD_SIZE / LOCAL_RANK itself; variables of another
# launcher, inherited from the submitting shell, would override those, so they are dropped.
unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE
export MASTER_ADDR="${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | awk 'NR == 1')}"
export MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
restarts="${SLURM_RESTART_COUNT:-0}"
max_restarts="${LATTE_MAX_RESTARTS:-3}"

say "job $SLURM_JOB_ID ($SLURM_JOB_NAME) restart $restarts, started $(date '+%F %T')"
say "nodes $SLURM_JOB_NUM_NODES ($SLURM_JOB_NODELIST), tasks ${SLURM_NTASKS:-?}, CPUs per task" \
  "${SLURM_CPUS_PER_TASK:-1}, GPUs per node ${SLURM_GPUS_PER_NODE:-0}; rendezvous $MASTER_ADDR:$MASTER_PORT"
say "config $config; train.py args: $*"
say "python $PYTHON; repository $LATTE_ROOT; working directory $PWD"

stop_signal=""
# shellcheck disable=SC2317  # (called by the traps)
forward() {  # a preemption or time-limit warning: every rank (the job's steps, not this shell) gets it
  stop_signal="$1"
  say "got SIG$1: asking the ranks to checkpoint and exit"
  scancel --signal="$1" "$SLURM_JOB_ID" || true
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

requeue() {
  say "$1; requeueing job $SLURM_JOB_ID (it resumes from the latest checkpoint)"
  if scontrol requeue "$SLURM_JOB_ID"; then
    exit 0
  fi
  say "error: scontrol requeue failed (job not requeueable?); resubmit the same command to resume"
  exit "$rc"
}
ended_by_slurm() {  # TERM: scancel, the time limit itself, or preemption (SLURM requeues those itself)
  say "SLURM is ending this job (SIGTERM: scancel, time limit or preemption); not requeued here (exit code" \
    "$rc); the same sbatch command resumes from the latest checkpoint"
  exit "$rc"
}
if [ -n "$stop_signal" ]; then  # the signal came before any rank could hear it: nothing to save
  rc=3
  [ "$stop_signal" = TERM ] && ended_by_slurm
  requeue "stopped by SIG$stop_signal before training started"
fi

# srun inherits the allocation (nodes, tasks, and every GPU of a node for each task: train.py picks
# cuda:LOCAL_RANK, so no --gpus-per-task / --gpu-bind). --cpus-per-task: srun of SLURM 22.05 no longer takes
# it from the allocation. --kill-on-bad-exit=0 + --wait=60: once one rank exits, the others get 60 s to exit
# too (ranks leave together after a checkpoint; peers of a crashed rank, stuck in a collective, are then
# killed); killing them at once would turn the ranks' exit codes 2 or 3 into signals and lose the reason
# (srun exits with the highest code of its tasks).
srun --kill-on-bad-exit=0 --wait=60 ${SLURM_CPUS_PER_TASK:+--cpus-per-task=$SLURM_CPUS_PER_TASK} \
  "$PYTHON" -u "$LATTE_ROOT/train.py" --config "$config" "$@" &
srun_pid=$!
while true; do  # a trapped signal interrupts `wait` (status > 128) while srun still runs: wait again
  rc=0
  wait "$srun_pid" || rc=$?
  if [ "$rc" -gt 128 ] && kill -0 "$srun_pid" 2>/dev/null; then continue; fi
  break
done
trap '' USR1 TERM  # every rank has exited; requeueing makes SLURM signal this shell: nothing to forward now

case "$rc" in
  0) say "training finished"; exit 0 ;;
  2) say "error: configuration error (the error: line above); not requeued"; exit 2 ;;
esac
[ "$stop_signal" = TERM ] && ended_by_slurm  # requeueing would undo a user's scancel
[ "$rc" = 3 ] && requeue "preempted: the ranks saved a checkpoint"
if [ "$stop_signal" = USR1 ]; then  # the ranks died of the forwarded signal before their handler was set
  requeue "stopped by SIGUSR1 (exit code $rc)"
fi
if [ "$restarts" -lt "$max_restarts" ]; then
  requeue "crashed (exit code $rc), restart $((restarts + 1)) of at most $max_restarts"
fi
say "error: crashed (exit code $rc) after $restarts restarts (LATTE_MAX_RESTARTS=$max_restarts); not requeued"
exit "$rc"
