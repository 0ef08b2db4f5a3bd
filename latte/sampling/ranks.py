"""Sampling on several ranks (``torchrun --nproc_per_node N -m latte.sample`` or ``srun``).

Batches of ``sample.batch_size`` samples are dealt round robin: batch j (samples jB .. jB + B - 1) runs on
rank j % world size, so with B = 1 sample i runs on rank i % world. A sample's noise depends only on
(seed, i) and its batch is fixed by B, so the videos are the same bits for any number of ranks.

Every rank decodes and writes its own samples' videos. The grid needs them all: rank 0 collects the decoded
frames with one ``gather_object`` over a gloo group (a single collective, and gloo handles CPU objects on GPU
and CPU machines alike; nothing runs through NCCL). The group is made only when the world has more than one
rank; its timeout is long because ranks with one sample more wait for the others at the gather.

Where this process sits among the ranks (and which GPU it drives) is ``latte.rendezvous.world_from_env()``,
as in training.
"""

from __future__ import annotations

import datetime
from typing import Any

import torch

from latte.rendezvous import World

GATHER_TIMEOUT = datetime.timedelta(hours=12)


def batches_of(num_samples: int, batch_size: int, rank: int, world_size: int) -> list[list[int]]:
    """The sample indices of each batch that ``rank`` runs."""
    starts = range(0, num_samples, batch_size)
    mine = [s for j, s in enumerate(starts) if j % world_size == rank]
    return [list(range(s, min(s + batch_size, num_samples))) for s in mine]


def start_group(ranks: World) -> None:
    """The gloo group for the final gather (env:// rendezvous); nothing for a world of one."""
    if ranks.world_size > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            "gloo", rank=ranks.rank, world_size=ranks.world_size, timeout=GATHER_TIMEOUT
        )


def gather_to_main(obj: Any, ranks: World) -> list[Any] | None:
    """Every rank's ``obj`` on rank 0 (in rank order), None elsewhere."""
    if ranks.world_size == 1:
        return [obj]
    out: list[Any] | None = [None] * ranks.world_size if ranks.is_main else None
    torch.distributed.gather_object(obj, out, dst=0)
    return out


def end_group() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
