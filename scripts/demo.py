"""The main job end to end on embedded defaults, through the real command lines:

1. make real mp4 clips: 4 classes of a moving square, the class sets the direction (UCF101-style folders);
2. shard them: ``python -m data_pipeline.shard_latents`` with a tiny random VAE (or ``--vae``) into a local
   directory (WebDataset tars + index.json);
3. train ``Latte-T/2`` on them with DeepSpeed ZeRO-2 on 2 ranks (CPU gloo ranks without a GPU, every GPU
   with one), streaming the shards, and report the loss falling.

    python scripts/demo.py [--out demo_output] [--vae PATH_OR_HUB_ID] [--steps 200] [-- extra train.py --set]
"""

from __future__ import annotations

import argparse
import os
import re
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("LATTE_DEMO_DIR", str(REPO / "demo_output")))
    parser.add_argument("--vae", help="an AutoencoderKL directory or hub id; default: a tiny random one")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("overrides", nargs="*", help="extra train.py --set key=value overrides")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1"), PYTHONUNBUFFERED="1")

    import torch

    from data_pipeline.toy_videos import make_class_videos, make_tiny_vae

    start = time.perf_counter()
    videos = make_class_videos(out / "videos", num_classes=4, per_class=6, frames=24, size=64)
    print(f"[1/3] {len(videos)} mp4 clips (4 classes, 64x64, 24 frames) in {out / 'videos'}", flush=True)

    vae = args.vae or str(make_tiny_vae(out / "tiny_vae", downsample=8))
    latents = out / "latents"
    shard_cmd = [sys.executable, "-m", "data_pipeline.shard_latents", "--input", str(out / "videos"),
                 "--output", str(latents), "--vae", vae, "--num-frames", "4", "--frame-interval", "3",
                 "--clips-per-video", "4", "--image-size", "64", "--samples-per-shard", "24",
                 "--workers", "1", "--no-progress"]  # fmt: skip
    summary = run(shard_cmd, env, out / "shard.log").strip().splitlines()[-1]
    print(f"[2/3] sharded with VAE {vae}: {summary}", flush=True)

    gpus = torch.cuda.device_count()
    if not gpus:
        env["DS_ACCELERATOR"] = "cpu"
        env.setdefault("OMP_NUM_THREADS", "1")
    ranks = gpus or 2
    train_cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
                 "--master_port", str(free_port()), "train.py", "--config", "configs/tiny.yaml", "--set",
                 f"data.index={latents / 'index.json'}", f"train.max_steps={args.steps}",
                 "train.log_every=20", "train.zero_stage=2", f"train.results_dir={out / 'runs'}",
                 "train.resume=none", *args.overrides]  # fmt: skip
    device = f"{gpus} GPU(s)" if gpus else "2 CPU ranks (gloo)"
    print(f"[3/3] training Latte-T/2 with DeepSpeed ZeRO-2 on {device}, {args.steps} steps ...", flush=True)
    log = run(train_cmd, env, out / "train.log")
    losses = [float(x) for x in re.findall(r"\| loss ([0-9.]+) \|", log)]
    run_dir = re.search(r"run dir (\S+)", log)
    for line in log.splitlines():
        if re.search(r"step +\d+ \| loss", line):
            print("   ", re.sub(r"^\[[^\]]*\]\s*", "", line.split(": ", 1)[-1] if "]: " in line else line))
    print(f"\nloss {losses[0]:.4f} (first interval) -> {losses[-1]:.4f} (last interval)")
    print(f"dataset: {latents / 'index.json'}")
    if run_dir:
        print(f"run: {run_dir.group(1)} (TensorBoard: tensorboard --logdir {run_dir.group(1)}/tensorboard)")
    latest = out / "runs" / "checkpoints" / "latest"
    if latest.exists():
        tag = latest.read_text().strip()
        again = "bash scripts/demo.sh --steps 400 -- train.resume=auto"
        print(f"checkpoint: {latest.parent / tag} (continue the run: {again})")
    print(f"logs: {out / 'shard.log'}, {out / 'train.log'}; took {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
