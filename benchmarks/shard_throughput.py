"""Throughput of the sharding job vs the bare VAE encode of the same frames, in the same run.

    python benchmarks/shard_throughput.py [--videos 4 --frames 64 --size 320x240 --num-frames 16
                                           --frame-interval 3 --clips-per-video 2 --image-size 128
                                           --workers 0 1 2 --repeats 5 --device cpu]

Makes real h264 videos (UCF101-like 320x240) and the tiny random VAE, then times (on ``--device``):
- **bare encode**: the clips decoded beforehand and held in memory, only ``LatentEncoder.encode_clips``
  (the job's own call, same frames, same batches);
- **whole job**: ``run_task`` of the sharding job (decode + resize in ``--workers`` DataLoader workers,
  encode, fp16 samples into tar shards, publish, part index) into a fresh local directory.
Rows are interleaved over ``--repeats`` rounds and each keeps its best round (the machine may be shared).
The ratio job / bare says how much of decoding, resizing and writing the job hides behind the encode.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_pipeline.shard_latents import build_parser, prepare, run_task  # noqa: E402
from data_pipeline.toy_videos import make_tiny_vae, make_video  # noqa: E402
from data_pipeline.video import read_clips  # noqa: E402


def decode_all(job) -> tuple[list[torch.Tensor], float]:
    """The job's clips decoded serially in this process, and the time it took."""
    start = time.perf_counter()
    decoded = [read_clips(v.path, job.spec).pixels for v in job.inputs]  # each (K, F, 3, S, S)
    return decoded, time.perf_counter() - start


def bare_encode_seconds(job, decoded: list[torch.Tensor]) -> float:
    """Seconds the job's encoder takes over the clips, already decoded and in memory."""
    start = time.perf_counter()
    for pixels in decoded:
        job.encoder.encode_clips(pixels, job.flip)
    return time.perf_counter() - start


def make_job(root: Path, out: str, workers: int, args: argparse.Namespace):
    """A prepared single-task job over ``root/videos`` with the tiny VAE, writing to ``out``."""
    options = {
        "--input": root / "videos",
        "--output": out,
        "--vae": root / "vae",
        "--device": args.device,
        "--num-frames": args.num_frames,
        "--frame-interval": args.frame_interval,
        "--clips-per-video": args.clips_per_video,
        "--image-size": args.image_size,
        "--workers": workers,
    }
    argv = [x for k, v in options.items() for x in (k, str(v))] + ["--no-progress", "--no-merge"]
    return prepare(build_parser().parse_args(argv))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--videos", type=int, default=4)
    p.add_argument("--frames", type=int, default=64, help="frames per video")
    p.add_argument("--size", default="320x240", help="video WIDTHxHEIGHT")
    p.add_argument("--num-frames", type=int, default=16)
    p.add_argument("--frame-interval", type=int, default=3)
    p.add_argument("--clips-per-video", type=int, default=2)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument(
        "--device", default="cpu", help="where the VAE encodes: cpu, cuda (results come back to the CPU)"
    )
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds; the best of each row is kept")
    args = p.parse_args()
    width, height = map(int, args.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        for i in range(args.videos):
            make_video(
                root / "videos" / f"class{i % 4}" / f"v{i:03d}.mp4", args.frames, (width, height), seed=i
            )
        make_tiny_vae(root / "vae")
        elapsed = time.perf_counter() - start
        print(f"made {args.videos} videos of {args.frames} frames at {args.size} in {elapsed:.1f} s")

        reference = make_job(root, str(root / "out-bare"), 0, args)
        read_clips(reference.inputs[0].path, reference.spec)  # warm-up (codec and interpolation set-up)
        decoded, decode_seconds = decode_all(reference)
        clips = sum(p.shape[0] for p in decoded)
        bare_encode_seconds(reference, decoded[:1])  # warm-up (oneDNN primitive caches)
        rates: dict[str, list[float]] = {"bare": [], **{str(w): [] for w in args.workers}}
        for r in range(args.repeats):  # interleaved, so a noisy neighbour hurts every row alike
            rates["bare"].append(clips / bare_encode_seconds(reference, decoded))
            for workers in args.workers:
                summary = run_task(make_job(root, str(root / f"out-{r}-w{workers}"), workers, args))
                assert summary.clips == clips, (summary.clips, clips)
                rates[str(workers)].append(summary.clips / summary.seconds)
    best = {name: max(values) for name, values in rates.items()}
    print(
        f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, image size {args.image_size}, "
        f"{args.num_frames} frames x interval {args.frame_interval}, "
        f"{args.clips_per_video} clips/video\n"
    )
    print(f"decode + resize alone (serial, in this process): {clips / decode_seconds:.2f} clips/s\n")
    print(f"| run | decode workers | clips | clips/s (best of {args.repeats}) | ratio vs bare encode |")
    print("|---|---|---|---|---|")
    print(f"| bare VAE encode (clips in memory) | - | {clips} | {best['bare']:.2f} | 1.00 |")
    for workers in args.workers:
        rate = best[str(workers)]
        ratio = rate / best["bare"]
        print(f"| whole job (decode, encode, write) | {workers} | {clips} | {rate:.2f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
