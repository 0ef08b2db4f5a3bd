"""Stop cleanly when the cluster asks: a signal sets a flag, the ranks agree at a step boundary.

SLURM sends ``SIGUSR1`` ahead of a time limit or preemption (``#SBATCH --signal=B:USR1@180``, forwarded by
``launch/slurm/train.sh``) and ``SIGTERM`` when it ends a job. Either may reach one rank before the others,
or in the middle of a collective, so the handler only records it. Once per optimizer step, outside any other
collective, ``StopFlag.agreed()`` all-reduces the flag (MAX of one integer over a CPU gloo group: no GPU
sync, ~0.1 ms); every rank gets the same answer at the same step, writes its part of a checkpoint and exits
with ``EXIT_PREEMPTED``, which the batch script turns into ``scontrol requeue``.
"""

from __future__ import annotations

import signal
import sys

import torch
import torch.distributed as dist

from latte.rendezvous import control_group

EXIT_PREEMPTED = 3  # checkpoint written after a stop request: requeue and resume (0 done, 1 crash, 2 config)
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopFlag:
    """Installs handlers for ``STOP_SIGNALS`` (call early: USR1's default action kills the process)."""

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> None:
        self.received: int | None = None
        self.requested = False  # the ranks agreed to stop
        for sig in signals:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame) -> None:
        if self.received is None:
            print(f"received {signal.Signals(signum).name}: stopping at the next step boundary with a "
                  f"checkpoint", file=sys.stderr, flush=True)  # fmt: skip
        self.received = signum

    def agreed(self) -> bool:
        """True on every rank once any rank has received a stop signal. A collective: all ranks call it at
        the same point of every step."""
        if self.requested:
            return True
        local = torch.tensor([int(self.received is not None)], dtype=torch.int32)
        group = control_group()  # CPU (gloo) even when training runs on NCCL; None in a world of one
        if group is not None:
            dist.all_reduce(local, op=dist.ReduceOp.MAX, group=group)
        self.requested = bool(local.item())
        return self.requested
