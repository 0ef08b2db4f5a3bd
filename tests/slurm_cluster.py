"""A real one-node SLURM cluster on localhost for tests: Debian's slurmctld + slurmd (22.05), no munge.

Everything lives in a temporary directory (config, state, spool, daemon logs); the ports are chosen free, so
two clusters (or a cluster and another test's servers) never collide. ``AuthType=auth/none`` and
``CredType=cred/none`` need no munge daemon: root submits, root runs. Clients find the cluster through
``SLURM_CONF`` (``env()``); jobs inherit it (sbatch's default ``--export=ALL``).

    cluster = SlurmCluster(tmp_dir); cluster.start()
    job = cluster.sbatch(["--ntasks=2", "launch/slurm/train.sh", "configs/tiny.yaml"], cwd=REPO)
    info = cluster.wait(job)          # {"JobState": "COMPLETED", "ExitCode": "0:0", "Restarts": "0", ...}
    cluster.stop()                    # the daemons, by pid
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

from dist import free_ports

COMMANDS = ("slurmctld", "slurmd", "sbatch", "srun", "scontrol", "scancel", "squeue", "sinfo")
FINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "DEADLINE",
    "BOOT_FAIL",
    "PREEMPTED",
}


def missing_commands() -> list[str]:
    return [c for c in COMMANDS if shutil.which(c) is None]


class SlurmError(RuntimeError):
    pass


class SlurmCluster:
    """slurmctld + one slurmd (node ``localhost``, partition ``debug``) with everything under ``root``."""

    def __init__(self, root: Path, cpus: int = 4, memory_mb: int = 8000) -> None:
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"
        self.cpus, self.memory_mb = cpus, memory_mb
        self.procs: dict[str, subprocess.Popen] = {}

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """``base`` (default: this process's environment) without SLURM job variables, pointing at us."""
        env = {
            k: v
            for k, v in (os.environ if base is None else base).items()
            if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))
        }
        return dict(env, SLURM_CONF=str(self.conf))

    def write_config(self) -> None:
        ctld_port, slurmd_port = free_ports(2)
        for sub in ("state", "spool"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        r = self.root
        self.conf.write_text(f"""\
ClusterName=lattetest
# job ids (and so train.sh's MASTER_PORT = 20000 + id % 20000) differ between clusters started side by side
FirstJobId={random.randrange(1000, 1_000_000)}
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/none
CredType=cred/none
# a requeued job may start again only once its launch credential expired: 5 s (the least 22.05 takes), not 120
AuthInfo=cred_expire=5
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/slurmctld.log
SlurmdLogFile={r}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=sched_interval=1,bf_interval=1
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
ReturnToService=2
MailProg=/bin/true
# SIGTERM (scancel) -> SIGKILL: time for the ranks' checkpoint on a busy machine
KillWait=15
# the node may claim more CPUs than the machine has: two 2-task jobs run side by side
SlurmdParameters=config_overrides
NodeName=localhost CPUs={self.cpus} RealMemory={self.memory_mb} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
""")

    def start(self, timeout: float = 30.0) -> None:
        self.write_config()
        env = self.env()
        for name, cmd in (
            ("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)]),
            ("slurmd", ["slurmd", "-D", "-N", "localhost", "-f", str(self.conf)]),
        ):
            with open(self.root / f"{name}.out", "ab") as out:
                self.procs[name] = subprocess.Popen(
                    cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
                )
        deadline = time.monotonic() + timeout
        while True:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    self.stop()
                    raise SlurmError(f"{name} exited with code {proc.returncode}: {self.daemon_log_tail()}")
            out = self.run(["sinfo", "-h", "-N", "-o", "%T"], check=False)
            if out.returncode == 0 and out.stdout.strip() == "idle":
                return
            if time.monotonic() > deadline:
                self.stop()
                raise SlurmError(f"node not idle after {timeout:.0f} s ({out.stdout.strip() or out.stderr})")
            time.sleep(0.2)

    def daemon_log_tail(self, lines: int = 20) -> str:
        text = ""
        for name in ("slurmctld", "slurmd"):
            for path in (self.root / f"{name}.log", self.root / f"{name}.out"):
                if path.exists():
                    text += f"\n--- {path}\n" + "\n".join(path.read_text().splitlines()[-lines:])
        return text

    def stop(self) -> None:
        """Cancel the jobs left and wait until they are gone (slurmstepd outlives slurmd and would keep their
        processes), then stop the daemons (SIGTERM, then SIGKILL), each by its pid."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run(["scancel", "--full", "--user", "root"], check=False)
            try:
                self.wait_for(
                    lambda: not self.run(["squeue", "-h"], check=False).stdout.strip(),
                    "the cancelled jobs to end",
                    timeout=30,
                )
            except SlurmError:
                pass
        for name in ("slurmd", "slurmctld"):
            proc = self.procs.pop(name, None)
            if proc is None:
                continue
            for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
                try:
                    os.killpg(proc.pid, sig)
                    proc.wait(timeout=wait)
                    break
                except ProcessLookupError:
                    break
                except subprocess.TimeoutExpired:
                    continue

    # ------------------------------------------------------------------------------------------------------
    # clients
    # ------------------------------------------------------------------------------------------------------

    def run(self, cmd: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("env", self.env())
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, **kw)
        if check and done.returncode != 0:
            raise SlurmError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}")
        return done

    def sbatch(self, args: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> int:
        """``sbatch --parsable ARGS`` (from ``cwd``, with ``env`` plus ``SLURM_CONF``): the job id."""
        done = self.run(["sbatch", "--parsable", *args], cwd=cwd, env=self.env(env))
        return int(done.stdout.strip().split(";")[0])

    def job(self, job_id: int | str) -> dict[str, str] | None:
        """``scontrol show job`` as a dict (the first record: an array's first task), or None if unknown."""
        done = self.run(["scontrol", "-o", "show", "job", str(job_id)], check=False)
        if done.returncode != 0 or not done.stdout.strip():
            return None
        line = done.stdout.splitlines()[0]
        return dict(re.findall(r"(\w+(?:/\w+)?)=(\S*)", line))

    def jobs(self, job_id: int | str) -> list[dict[str, str]]:
        """Every record ``scontrol show job`` gives for ``job_id`` (all tasks of an array)."""
        done = self.run(["scontrol", "-o", "show", "job", str(job_id)], check=False)
        return (
            [
                dict(re.findall(r"(\w+(?:/\w+)?)=(\S*)", line))
                for line in done.stdout.splitlines()
                if line.strip()
            ]
            if done.returncode == 0
            else []
        )

    def wait(self, job_id: int | str, timeout: float = 180.0, poll: float = 0.5) -> dict[str, str]:
        """Block until every record of ``job_id`` is in a final state (a requeued job is PENDING again in
        between, so a requeue is not an end); returns the first record."""
        deadline = time.monotonic() + timeout
        while True:
            records = self.jobs(job_id)
            if records and all(r.get("JobState") in FINAL_STATES for r in records):
                return records[0]
            if time.monotonic() > deadline:
                states = [r.get("JobState") for r in records]
                raise SlurmError(f"job {job_id} not finished after {timeout:.0f} s: {states}")
            time.sleep(poll)

    def wait_for(self, predicate, what: str, timeout: float = 120.0, poll: float = 0.1) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise SlurmError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(poll)

    def log(self, job_id: int | str) -> str:
        """The job's output file (``StdOut`` of its first record), or "" while it does not exist."""
        record = self.job(job_id)
        path = Path(record["StdOut"]) if record and record.get("StdOut") else None
        return path.read_text(errors="replace") if path and path.exists() else ""
