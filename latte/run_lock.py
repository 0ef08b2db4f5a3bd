"""One run per checkpoint directory: a lock record that names its holder and is kept fresh while it runs.

Two trainings writing into one ``train.ckpt_dir`` overwrite each other's checkpoints (the later one's
weights end up under the earlier one's steps). So rank 0 claims the directory before anything is built:
``ckpt_dir/LOCK`` holds {host, pid, process start time, SLURM job id, token, heartbeat}; a thread rewrites
the heartbeat every ``HEARTBEAT_S`` seconds and the record is removed when the run ends normally.

Another run that finds the record stops with one line naming the directory and the holder, unless the record
is its own holder's, which it may take over at once:

* the same SLURM job (a requeued or restarted job keeps its id), or
* the same host, and the holder's process is gone (its pid is free, or belongs to a process that started
  at another time: pids are reused), e.g. a relaunch after kill -9, or
* another host, and the heartbeat is older than ``STALE_S`` (a node that died cannot clean up).

Plain files only: ``os.link`` to create (atomic and exclusive on NFS, Lustre and GPFS, where ``flock`` is not
reliable) and ``os.replace`` to take over or refresh; after a takeover the record is read back, so of two
runs taking over the same stale record at once only the one whose token stands continues.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

LOCK_NAME = "LOCK"
HEARTBEAT_S = 30.0
STALE_S = 600.0  # a record from another host with no heartbeat for 10 minutes is taken to be dead


class LockError(Exception):
    """The checkpoint directory is in use by another run; the message is one line naming both."""


@dataclass
class Holder:
    host: str
    pid: int
    started: float | None  # the process's start time (seconds since boot, from /proc), None if unknown
    slurm_job: str | None
    token: str
    heartbeat: float  # time.time() of the last refresh

    def describe(self, now: float) -> str:
        job = f", SLURM job {self.slurm_job}" if self.slurm_job else ""
        return f"host {self.host} pid {self.pid}{job}, last seen {max(0.0, now - self.heartbeat):.0f} s ago"


def _process_start(pid: int) -> float | None:
    """Start time of process ``pid`` in clock ticks since boot (field 22 of /proc/PID/stat), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return float(stat.rsplit(")", 1)[1].split()[19])  # fields after the command name, which may hold spaces


def _alive(holder: Holder) -> bool:
    """Whether the holder's process still runs on this host (the same pid AND the same start time)."""
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process with that pid: alive, but can it be the holder?
        pass
    started = _process_start(holder.pid)
    return holder.started is None or started is None or started == holder.started


def me() -> Holder:
    return Holder(
        socket.gethostname(),
        os.getpid(),
        _process_start(os.getpid()),
        os.environ.get("SLURM_JOB_ID"),
        uuid.uuid4().hex,
        time.time(),
    )


def _read(path: Path) -> Holder | None:
    try:
        return Holder(**json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError):  # unreadable or from another version: treat as stale
        return Holder("?", -1, None, None, "", 0.0)


def _write_new(path: Path, holder: Holder, replace: bool) -> bool:
    tmp = path.with_name(f".{path.name}.{holder.token}.tmp")
    tmp.write_text(json.dumps(asdict(holder)))
    try:
        if replace:
            os.replace(tmp, path)
            return True
        try:
            os.link(tmp, path)  # fails if the record exists: exclusive creation
            return True
        except FileExistsError:
            return False
    finally:
        tmp.unlink(missing_ok=True)


def takeover_reason(other: Holder, mine: Holder, now: float) -> str | None:
    """Why ``mine`` may take the record of ``other`` over (None: it may not)."""
    if other.slurm_job and other.slurm_job == mine.slurm_job:
        return f"the same SLURM job {other.slurm_job} (requeued)"
    if other.host == mine.host:
        return None if _alive(other) else f"its process {other.pid} on this host is gone"
    if now - other.heartbeat > STALE_S:
        return f"no heartbeat from {other.host} for {now - other.heartbeat:.0f} s (> {STALE_S:.0f} s)"
    return None


class RunLock:
    """``acquire()`` on rank 0 before building anything; ``release()`` when the run ends normally."""

    def __init__(self, ckpt_dir: Path, heartbeat_s: float = HEARTBEAT_S) -> None:
        self.path = Path(ckpt_dir) / LOCK_NAME
        self.holder = me()
        self.heartbeat_s = heartbeat_s
        self.took_over: str | None = None  # why an earlier holder's record was replaced
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a record that vanishes between the exclusive create and the read: try again
            if _write_new(self.path, self.holder, replace=False):
                break
            other = _read(self.path)
            if other is None:
                continue
            now = time.time()
            reason = takeover_reason(other, self.holder, now)
            if reason is None:
                raise LockError(
                    f"checkpoint directory {self.path.parent} is in use by another run "
                    f"({other.describe(now)}); stop it or give this run another train.results_dir / "
                    f"train.ckpt_dir (a record from another host expires {STALE_S:.0f} s after its last "
                    f"heartbeat; delete {self.path} only if that run is certainly gone)"
                )
            _write_new(self.path, self.holder, replace=True)
            time.sleep(0.2)  # another run taking over the same stale record at the same moment: who stands?
            now_held = _read(self.path)
            if now_held is None or now_held.token != self.holder.token:
                holder = now_held.describe(time.time()) if now_held else "?"
                raise LockError(
                    f"checkpoint directory {self.path.parent} was just claimed by another run ({holder})"
                )
            self.took_over = f"took over the lock of {other.describe(now)}: {reason}"
            break
        else:
            raise LockError(f"cannot claim {self.path.parent}: {self.path} keeps changing")
        self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            current = _read(self.path)
            if current is None or current.token != self.holder.token:
                return  # taken over (this host looked dead to another): stop refreshing someone else's record
            self.holder.heartbeat = time.time()
            try:
                _write_new(self.path, self.holder, replace=True)
            except OSError:
                pass  # a full or flaky file system: the next beat tries again

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        current = _read(self.path)
        if current is not None and current.token == self.holder.token:
            self.path.unlink(missing_ok=True)
