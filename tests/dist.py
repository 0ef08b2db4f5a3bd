"""Run a function on N CPU ranks (gloo) inside a test: torch.multiprocessing spawn + env rendezvous."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from latte.rendezvous import free_port


def free_ports(count: int, accept: Callable[[int], bool] = lambda port: True) -> list[int]:
    """``count`` distinct free ports that pass ``accept`` (e.g. a server that also binds port + 10000)."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports and accept(port):
            ports.append(port)
    return ports


def _rank_entry(rank: int, world_size: int, port: int, fn: Callable, args: tuple, out_dir: str) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        DS_ACCELERATOR="cpu",
    )
    torch.set_num_threads(1)  # two ranks on two cores
    result = fn(*args)
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    # Skip interpreter teardown: a C++ thread of the (destroyed) process group occasionally aborts it
    # ("terminate called without an active exception"), failing a rank whose work is done and saved.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(fn: Callable, world_size: int, args: tuple, out_dir: Path) -> list[Any]:
    """``fn(*args)`` on every rank (each in a fresh process); returns the ranks' results in rank order."""
    out_dir.mkdir(parents=True, exist_ok=True)
    mp.spawn(
        _rank_entry, args=(world_size, free_port(), fn, args, str(out_dir)), nprocs=world_size, join=True
    )
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
