"""Checkpoint save/load time vs plain file I/O of the same bytes, and EMA bytes per rank, in one run.

    python benchmarks/checkpoint_io.py [--model Latte-S/2 --stages 2 3 --worlds 1 2 --dir /tmp/ckpt_bench]

For each ZeRO stage and world size, CPU gloo ranks (tests/dist.py) build the engine train.py builds, take one
optimizer step (so Adam's moments exist), then time, barrier to barrier:
``save``: ``CheckpointManager.save`` (DeepSpeed engine state, per-rank EMA shard + RNG + data state, the
consolidated EMA, meta, COMPLETE manifest, ``latest``); ``plain write``: every rank writing exactly the bytes
it wrote in ``save`` (its ``wchar`` in /proc/self/io) from a ready memory buffer to one file (64 MiB
writes, no fsync, like torch.save); ``load``: ``CheckpointManager.load`` into the built engine; ``plain
read``: every rank reading the bytes it read in ``load`` (``rchar``) from the checkpoint's files. Reads hit
the page cache in both columns (the files were just written). The EMA column is each rank's EMA bytes over
the full fp32 EMA (expect 1 / world size). Each time is the best of 3 rounds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / "tests"))

from dist import run_ranks  # noqa: E402

REPEATS = 3


def _barrier_time(fn, *args) -> float:
    """Seconds from a barrier before ``fn()`` to a barrier after it (the slowest rank's time). Dirty pages
    are flushed first, so no column pays for the previous one's write-back."""
    os.sync()
    torch.distributed.barrier()
    start = time.perf_counter()
    fn(*args)
    torch.distributed.barrier()
    return time.perf_counter() - start


def _io_bytes(field: str) -> int:
    """This process's ``rchar`` / ``wchar`` so far (bytes passed to read/write calls, cached or not)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/io")


def _counted(field: str, fn, *args) -> tuple[float, int]:
    """(barrier-to-barrier seconds of ``fn()``, bytes this rank read or wrote in it)."""
    before = _io_bytes(field)
    seconds = _barrier_time(fn, *args)
    return seconds, _io_bytes(field) - before


def _plain_write(path: Path, buffer: np.ndarray) -> None:
    """``buffer`` to ``path`` in 64 MiB writes (one huge write() is ~4x slower on Linux: not a fair base)."""
    view, step = memoryview(buffer), 64 << 20
    with open(path, "wb") as f:
        for start in range(0, len(view), step):
            f.write(view[start : start + step])


def _plain_read(paths: list[Path], nbytes: int) -> None:
    """Read ``nbytes`` from ``paths`` in turn (in 64 MiB reads), wrapping around if they hold fewer."""
    left, i = nbytes, 0
    while left > 0:
        with open(paths[i % len(paths)], "rb") as f:
            while left > 0 and (chunk := f.read(min(left, 64 << 20))):
                left -= len(chunk)
        i += 1


def rank_main(model: str, zero: str, ckpt_dir: str) -> dict[str, float]:
    from data_pipeline.synthetic import SyntheticStream
    from latte.checkpoint import CheckpointManager, TrainState, tag_for
    from latte.config import load_config
    from latte.engine import setup_distributed
    from latte.training import build_training

    cfg = load_config(
        None,
        [
            f"model.name={model}",
            "model.num_classes=101",
            "data.num_frames=16",
            "data.image_size=256",
            "train.micro_batch_size=1",
            f"train.zero_stage={zero}",
            f"train.ckpt_dir={ckpt_dir}",
            "train.keep_last=10",
            "train.seed=0",
        ],
    )
    world = setup_distributed(cfg)
    training = build_training(cfg, world)
    engine, ema, diffusion = training.engine, training.ema, training.diffusion
    full_ema_bytes = 4 * training.n_params
    data = SyntheticStream(0, 1, 101, 16, 4, 32, rank=world.rank, world_size=world.world_size)
    x = torch.randn(1, 16, 4, 32, 32)  # (B, F, C, h, w)
    loss = diffusion.training_losses(engine, x, torch.tensor([500]), {"y": torch.tensor([3])})["loss"].mean()
    engine.backward(loss)
    engine.step()
    ema.update()

    manager = CheckpointManager(cfg, world)
    state = TrainState(engine, ema, data)
    saves, writes, loads, reads = [], [], [], []
    for rep in range(REPEATS):  # alternating; best of each (timeit): page-cache write-back noise is large
        saves.append(_counted("wchar", manager.save, rep + 1, state))
        step_dir = Path(ckpt_dir) / tag_for(rep + 1)
        written = saves[-1][1]
        buffer = np.ones(written, dtype=np.uint8)  # allocated and touched before the clock starts
        scratch = Path(ckpt_dir) / f"plain_{world.rank}.bin"
        writes.append(_barrier_time(_plain_write, scratch, buffer))
        scratch.unlink()
        manager.find()
        loads.append(_counted("rchar", manager.load, step_dir, state))
        files = sorted((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: -p.stat().st_size)
        read = loads[-1][1]
        reads.append(_barrier_time(_plain_read, files[world.rank :: world.world_size], read))
    total = sum(p.stat().st_size for p in files)
    save_s, load_s = min(t for t, _ in saves), min(t for t, _ in loads)
    write_s, read_s = min(writes), min(reads)
    torch.distributed.destroy_process_group()
    return {
        "save": save_s,
        "write": write_s,
        "load": load_s,
        "read": read_s,
        "bytes": total,
        "written": written,
        "read_bytes": read,
        "ema": ema.local_bytes() / full_ema_bytes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="Latte-S/2")
    parser.add_argument("--stages", nargs="+", default=["2", "3"])
    parser.add_argument("--worlds", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--dir", default=None, help="scratch directory (default: a temp dir)")
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    scratch = Path(args.dir or tempfile.mkdtemp(prefix="ckpt_bench_"))
    rows = []
    for zero in args.stages:
        for world in args.worlds:
            out = scratch / f"zero{zero}_w{world}"
            shutil.rmtree(out, ignore_errors=True)
            results = run_ranks(rank_main, world, (args.model, zero, str(out / "ckpt")), out / "results")
            rows.append((zero, world, results))
            shutil.rmtree(out, ignore_errors=True)
    print(
        f"\n{args.model} (101 classes), CPU gloo ranks, torch {torch.__version__}; times barrier to barrier"
    )
    print(
        "| ZeRO | ranks | checkpoint MB | MB written / read per rank | save s | plain write s | save / write "
        "| load s | plain read s | load / read | EMA bytes per rank / full |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for zero, world, results in rows:
        r = results[0]
        ema = " / ".join(f"{x['ema']:.3f}" for x in results)
        save, load = r["save"] / r["write"], r["load"] / r["read"]
        io = " / ".join(f"{x['written'] / 1e6:.0f}/{x['read_bytes'] / 1e6:.0f}" for x in results)
        print(
            f"| {zero} | {world} | {r['bytes'] / 1e6:.0f} | {io} | {r['save']:.2f} | {r['write']:.2f} | "
            f"{save:.1f}x | {r['load']:.2f} | {r['read']:.2f} | {load:.1f}x | {ema} |"
        )


if __name__ == "__main__":
    main()
