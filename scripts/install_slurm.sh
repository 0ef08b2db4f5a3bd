#!/usr/bin/env bash
# Install Debian's SLURM (slurmctld, slurmd, the client commands) and munge for tests/test_slurm.py, which
# starts a one-node cluster on localhost. Idempotent and quiet: does nothing when the commands are there.
# Never fatal: without root or a package mirror it says so on one line and the SLURM tests skip (loudly).
set -uo pipefail

need=()
for cmd in sbatch srun scontrol scancel squeue sinfo slurmctld slurmd; do
  command -v "$cmd" >/dev/null 2>&1 || need+=("$cmd")
done
[ ${#need[@]} -eq 0 ] && exit 0

if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "[slurm] not installed (${need[*]} missing) and cannot install it here (needs root and apt-get);" \
    "the SLURM tests will be skipped" >&2
  exit 0
fi
echo "[slurm] installing slurmctld slurmd slurm-client munge (about 10-30 s)"
log="$(mktemp)"
if { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
       slurmctld slurmd slurm-client munge; } >"$log" 2>&1; then
  rm -f "$log"
else
  echo "[slurm] apt-get failed (last lines below); the SLURM tests will be skipped" >&2
  tail -n 5 "$log" >&2
  rm -f "$log"
fi
exit 0
