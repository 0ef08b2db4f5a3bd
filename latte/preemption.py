"""Stop cleanly when asked: a signal or the launcher's death sets a flag; the ranks agree at a step boundary.

SLURM sends ``SIGUSR1`` ahead of a time limit or preemption (``#SBATCH --signal=B:USR1@180``, forwarded by
``launch/slurm/train.sh``) and ``SIGTERM`` when it ends a job; ``timeout`` and most schedulers send SIGTERM,
a terminal's Ctrl-C sends ``SIGINT`` to every process of the job. Any of them may reach one rank before the
others, or in the middle of a collective, so the handler only records it. A rank also stops when the
launcher that started it is gone (``deepspeed``'s runner killed by a signal leaves its ranks training as
orphans): ``LauncherWatch`` notices, and it counts as a stop request.

Every ``train.stop_check_every`` optimizer steps, outside any other collective, ``StopFlag.agreed()``
all-reduces the flag (MAX of one integer over the gloo control group of ``latte.rendezvous``: no GPU sync,
~0.1 ms on 2 ranks, tens of ms at hundreds); every rank gets the same answer at the same step, writes its
part of a checkpoint and exits with ``EXIT_PREEMPTED``, which the batch script turns into
``scontrol requeue``.

Launchers give their ranks a fixed time after a signal: deepspeed's ``launch`` and torchrun SIGTERM them and
SIGKILL them about 30 s later whatever they are doing. A checkpoint that takes longer needs the signal sent
to the ranks themselves (``pkill -USR1 -f train.py``, or SLURM's ``--signal=B:USR1@LEAD`` with a lead time
that covers a few steps and a save).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from latte.rendezvous import control_group

EXIT_PREEMPTED = 3  # checkpoint written after a stop request: requeue and resume (0 done, 1 crash, 2 config)
ORPHANED = 100  # the stop code of a rank whose launcher exited (signal numbers are below it)
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
# Command-line words of the processes that launch ranks: deepspeed's runner and launch, torchrun.
LAUNCHER_WORDS = ("deepspeed", "torchrun", "torch.distributed.run", "torch.distributed.launch")


def _stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, start time) of ``pid`` from /proc, or None when it is gone, a zombie that exited but was
    not reaped yet (its parent has not waited for it), or not on Linux."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else (int(fields[1]), fields[19])


def _is_launcher(pid: int) -> bool:
    try:
        words = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return False
    return any(w in word for word in words for w in LAUNCHER_WORDS)


class LauncherWatch:
    """The launcher processes above this rank (its parent and grandparent when they are deepspeed's runner and
    launch, or torchrun), remembered with their start times; ``gone()`` names one that has exited."""

    def __init__(self) -> None:
        self.parent = os.getppid()
        self.launchers: list[tuple[int, str]] = []
        pid = self.parent
        while pid > 1 and _is_launcher(pid):
            stat = _stat(pid)
            if stat is None:
                break
            self.launchers.append((pid, stat[1]))
            pid = stat[0]

    def gone(self) -> str | None:
        if self.launchers and os.getppid() != self.parent:
            return f"the launcher of this rank (pid {self.parent}) exited"
        for pid, started in self.launchers:
            stat = _stat(pid)
            if stat is None or stat[1] != started:
                return f"the launcher of this rank (pid {pid}) exited"
        return None


class StopFlag:
    """Installs handlers for ``STOP_SIGNALS`` (call early: USR1's default action kills the process, and
    SIGINT's raises KeyboardInterrupt wherever the rank is) and watches the launcher."""

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> None:
        self.received: str | None = None  # what asked for the stop: a signal's name or the launcher's exit
        self._code = 0  # the same as a number the ranks can all-reduce: the signal, or ORPHANED
        self.requested = False  # the ranks agreed to stop
        self.armed = False  # training has started: a stop now means a checkpoint (say so when it comes)
        self.stopped_at: int | None = None  # the step the run stopped at, its checkpoint written
        self.watch = LauncherWatch()
        for sig in signals:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame) -> None:
        self._request(f"received {signal.Signals(signum).name}", signum)

    def _request(self, why: str, code: int) -> None:
        if self.received is None:
            if self.armed:
                print(
                    f"{why}: stopping at the next step boundary with a checkpoint",
                    file=sys.stderr,
                    flush=True,
                )
            self.received, self._code = why, code

    def arm(self) -> None:
        """Training starts: a stop from now on ends with a checkpoint. A request that came earlier (during
        the build) is announced now; before this, e.g. while a rank waits out a config error, stop signals
        are recorded silently (that rank is ending anyway)."""
        self.armed = True
        if self.received is not None:
            print(
                f"{self.received} before training started: stopping at the first step boundary with a "
                f"checkpoint",
                file=sys.stderr,
                flush=True,
            )

    def agreed(self) -> bool:
        """True on every rank once any rank has received a stop signal or lost its launcher. A collective:
        all ranks call it at the same steps."""
        if self.requested:
            return True
        gone = self.watch.gone()
        if gone is not None:
            self._request(gone, ORPHANED)
        local = torch.tensor([self._code], dtype=torch.int32)
        group = control_group()  # CPU (gloo) even when training runs on NCCL; None in a world of one
        if group is not None:
            dist.all_reduce(local, op=dist.ReduceOp.MAX, group=group)
        code = int(local.item())
        self.requested = code > 0
        if self.requested and self.received is None:  # another rank's request: say what it was
            self.received = (
                "another rank's launcher exited"
                if code == ORPHANED
                else (f"received {signal.Signals(code).name}")
            )
        return self.requested
