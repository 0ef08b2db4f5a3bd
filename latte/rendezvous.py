"""Where this process sits among the ranks, which GPU it drives, and the CPU group the ranks agree over.

* ``world_from_env()``: this process's ``World`` (rank, world size, local rank, device) from the launcher's
  variables or SLURM's, a world of one without either; training (``latte.engine.setup_distributed``) and
  sampling both start from it.
* ``rendezvous_env()``: RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT from SLURM's variables when no
  launcher (torchrun, deepspeed) set them: ``srun python train.py``.
* ``cuda_device_index(local_rank)`` / ``local_device(local_rank)``: the GPU of a rank, ``local_rank %
  visible GPUs``. Sites that bind one GPU per task (``--gpus-per-task=1``, cgroups) show every rank a single
  device 0, so ``set_device(local_rank)`` would fail on ranks >= 1 with "invalid device ordinal".
* ``free_port()``: a free TCP port on this host (a world of one's MASTER_PORT; tests and the demo).
* ``control_group()``: a gloo group for the few host-side agreements of a run (the stop flag, the checkpoint
  manager's decisions). Gloo runs on the CPU, so agreeing never syncs a GPU; its timeout is long because
  rank 0 may spend a long time inside such an agreement (converting a checkpoint for another world size on a
  slow file system) while the others wait, and the default 30 minutes would end them spuriously. A rank that
  dies still ends the job: the launcher (torchrun, deepspeed, srun) stops the others.

Never imports DeepSpeed. Multi-node gloo binds to the address the hostname resolves to (often 127.0.1.1):
set ``GLOO_SOCKET_IFNAME`` beside ``NCCL_SOCKET_IFNAME`` (``launch/slurm/env.sh.example``).
"""

from __future__ import annotations

import datetime
import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass

import torch

CONTROL_TIMEOUT = datetime.timedelta(days=7)
_control: tuple[object, object] | None = None  # (the world group it was made in, the gloo group)


@dataclass(frozen=True)
class World:
    """This process's place among the ranks and the device it drives."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def first_host(nodelist: str) -> str:
    """The first host of a SLURM nodelist: "gpu[03-05,09],cpu1" -> "gpu03" (scontrol when available)."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(
                ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=10
            )
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.split()[0]
        except (OSError, subprocess.TimeoutExpired):
            pass
    first = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if first is None:
        from latte.config import ConfigError

        raise ConfigError(f"cannot parse SLURM_JOB_NODELIST '{nodelist}'")
    prefix, _, ranges = first.groups()
    if not ranges:
        return prefix
    start = ranges.split(",")[0].split("-")[0]
    return f"{prefix}{start}"


def rendezvous_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT, derived from SLURM's variables when the launcher
    did not set them (``srun python train.py``). Returns only the variables to add."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return {}
    if "SLURM_PROCID" not in env or "SLURM_NTASKS" not in env:
        return {}
    job_id = int(env.get("SLURM_JOB_ID", "0") or 0)
    return {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": env["SLURM_NTASKS"],
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "MASTER_ADDR": env.get("MASTER_ADDR") or first_host(env.get("SLURM_JOB_NODELIST", "localhost")),
        "MASTER_PORT": env.get("MASTER_PORT") or str(20000 + job_id % 20000),
    }


def world_from_env(alone_env: bool = False) -> World:
    """This process's ``World`` from torchrun's/deepspeed's variables, else SLURM's (added to ``os.environ``
    for an env:// rendezvous); a world of one without either. ``alone_env``: a world of one also gets the
    variables a process group of one is initialised from (RANK 0, WORLD_SIZE 1, a free MASTER_PORT)."""
    os.environ.update(rendezvous_env())
    if "RANK" not in os.environ:  # plain `python train.py`: a world of one, no launcher
        if not alone_env:
            return World(0, 1, 0, local_device(0))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), local_rank, local_device(local_rank))


def free_port() -> int:
    """A TCP port that is free on this host now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cuda_device_index(local_rank: int, device_count: int | None = None) -> int:
    """The visible GPU this rank drives: ``local_rank % device_count`` (one GPU per task shows each rank a
    single device 0; all GPUs visible to every task gives rank r device r)."""
    count = torch.cuda.device_count() if device_count is None else device_count
    if count < 1:
        raise RuntimeError("no CUDA device is visible to this process")
    return local_rank % count


def local_device(local_rank: int) -> torch.device:
    """The device of the rank with ``local_rank``: its GPU (``cuda_device_index``) when CUDA is available,
    else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", cuda_device_index(local_rank))
    return torch.device("cpu")


def control_group():
    """The gloo group for host-side agreements, with a long timeout. Made once, collectively: every rank
    calls this at the same point the first time (``latte.engine.setup_distributed`` does, right after the
    world's init). None without a process group or in a world of one."""
    global _control
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    world = dist.group.WORLD
    if _control is None or _control[0] is not world:  # none yet, or made in a world since destroyed
        _control = (world, dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT))
    return _control[1]
