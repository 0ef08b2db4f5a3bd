"""Sampling on several ranks (``torchrun --nproc_per_node N -m latte.sample`` or ``srun``).

Batches of ``sample.batch_size`` samples are dealt round robin: batch j (samples jB .. jB + B - 1) runs on
rank j % world size, so with B = 1 sample i runs on rank i % world. A sample's noise depends only on
(seed, i) and its batch is fixed by B, so the videos are the same bits for any number of ranks.

Every rank decodes and writes its own samples' videos. The grid needs them all: rank 0 collects the decoded
frames with one ``gather_object`` over a gloo group (a single collective, and gloo handles CPU objects on GPU
and CPU machines alike; nothing runs through NCCL). The group is made only when the world has more than one
rank; its timeout is long because ranks with one sample more wait for the others at the gather.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch

from latte.rendezvous import cuda_device_index, rendezvous_env

GATHER_TIMEOUT = datetime.timedelta(hours=12)


@dataclass(frozen=True)
class Ranks:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        """This rank's GPU (local rank modulo the GPUs), else the CPU."""
        if torch.cuda.is_available():
            return torch.device("cuda", cuda_device_index(self.local_rank))
        return torch.device("cpu")


def ranks_from_env() -> Ranks:
    """The rank layout from torchrun's variables or SLURM's; a world of one without either."""
    os.environ.update(rendezvous_env())
    if "RANK" not in os.environ:
        return Ranks(0, 1, 0)
    return Ranks(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))


def batches_of(num_samples: int, batch_size: int, rank: int, world_size: int) -> list[list[int]]:
    """The sample indices of each batch that ``rank`` runs."""
    starts = range(0, num_samples, batch_size)
    mine = [s for j, s in enumerate(starts) if j % world_size == rank]
    return [list(range(s, min(s + batch_size, num_samples))) for s in mine]


def start_group(ranks: Ranks) -> None:
    """The gloo group for the final gather (env:// rendezvous); nothing for a world of one."""
    if ranks.world_size > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            "gloo", rank=ranks.rank, world_size=ranks.world_size, timeout=GATHER_TIMEOUT
        )


def gather_to_main(obj: Any, ranks: Ranks) -> list[Any] | None:
    """Every rank's ``obj`` on rank 0 (in rank order), None elsewhere."""
    if ranks.world_size == 1:
        return [obj]
    out: list[Any] | None = [None] * ranks.world_size if ranks.is_main else None
    torch.distributed.gather_object(obj, out, dst=0)
    return out


def end_group() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
