"""LoRA vs full fine-tuning of the same flavor: trainable parameters, optimizer state per rank, step time,
peak memory, on one machine.

    python benchmarks/lora_vs_full.py [--model Latte-S/2 --frames 8 --image-size 128 --batch 2 --rank 8
                                       --zero 2 --precision fp32 --steps 8 --rounds 2]

Both variants train through the project's own path (``latte.training.build_training``: the DeepSpeed engine
with ZeRO ``--zero``, AdamW, the sharded EMA; ``diffusion.training_losses``), from the same base weights
(a random init saved as ``model.init_from``), on one rank. Each run is its own process, so its peak memory is
its own (CUDA: ``max_memory_allocated``; CPU: the process's peak RSS, which includes the interpreter and
libraries, ~0.5 GB); the runs alternate (full, LoRA, full, LoRA, ...) and the step time is the median over
all timed steps of a variant. Optimizer state = what the optimizer holds on the rank: its fp32 master
partition and both Adam moments. EMA = this rank's fp32 EMA shard.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="Latte-S/2")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--image-size", type=int, default=128, help="pixels (latents: / 8)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (alpha = rank)")
    p.add_argument("--zero", default="2", choices=("2", "3"))
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--steps", type=int, default=8, help="timed steps per run (after 2 warm-up steps)")
    p.add_argument("--rounds", type=int, default=2, help="runs of each variant, alternating")
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: "full" or "lora", base weights path
    return p.parse_args(argv)


def _overrides(a: argparse.Namespace, variant: str, base: str) -> list[str]:
    out = [
        f"model.name={a.model}",
        "model.num_classes=101",
        f"model.init_from={base}",
        f"data.num_frames={a.frames}",
        f"data.image_size={a.image_size}",
        f"train.micro_batch_size={a.batch}",
        f"train.zero_stage={a.zero}",
        f"train.precision={a.precision}",
        "train.lr=1e-4",
    ]
    return out + ([f"model.lora.rank={a.rank}"] if variant == "lora" else [])


def optimizer_bytes(engine) -> int:
    """Bytes the optimizer holds on this rank: its parameters (ZeRO's fp32 master partitions) and states."""
    import torch

    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)  # the torch AdamW inside ZeRO's wrapper
    total = 0
    for group in inner.param_groups:
        for p in group["params"]:
            total += p.numel() * p.element_size()
            total += sum(
                v.numel() * v.element_size() for v in inner.state.get(p, {}).values() if torch.is_tensor(v)
            )
    return total


def child(a: argparse.Namespace) -> dict:
    """One run in this process: build, warm up, time ``--steps`` steps; the numbers as a dict."""
    import torch

    from latte.config import load_config
    from latte.engine import setup_distributed
    from latte.training import build_training

    variant, base = a.child.split(",", 1)
    cfg = load_config(None, _overrides(a, variant, base))
    world = setup_distributed(cfg)
    training = build_training(cfg, world)
    engine, ema, diffusion, device = training.engine, training.ema, training.diffusion, world.device
    g = torch.Generator().manual_seed(0)
    latent = cfg.data.latent_size
    x = torch.randn(a.batch, a.frames, 4, latent, latent, generator=g).to(device)  # (B, F, C, h, w)
    y = torch.randint(0, 101, (a.batch,), generator=g).to(device)

    def sync() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def step() -> tuple[float, float]:
        """(forward + backward, optimizer step + EMA) seconds."""
        start = sync()
        t = torch.randint(0, diffusion.num_timesteps, (a.batch,), generator=g).to(device)
        loss = diffusion.training_losses(training.model_fn, x, t, {"y": y})["loss"].mean()
        engine.backward(loss)
        middle = sync()
        engine.step()
        ema.update()
        return middle - start, sync() - middle

    for _ in range(2):
        step()
    split = [step() for _ in range(a.steps)]
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
        peak_what = "CUDA max allocated"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
        peak_what = "peak RSS"
    return {
        "variant": variant,
        "trainable": training.n_params,
        "total": training.n_total,
        "optimizer_bytes": optimizer_bytes(engine),
        "ema_bytes": ema.local_bytes(),
        "times": [f + o for f, o in split],
        "fwd_bwd": [f for f, _ in split],
        "opt": [o for _, o in split],
        "peak_gb": peak,
        "peak_what": peak_what,
        "device": str(device),
    }


def run_child(a: argparse.Namespace, variant: str, base: str, argv: list[str]) -> dict:
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu" if not _cuda() else env.get("DS_ACCELERATOR", "cuda"))
    cmd = [sys.executable, __file__, *argv, "--child", f"{variant},{base}"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{variant} run failed:\n{(done.stdout + done.stderr)[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    if a.child:
        print(json.dumps(child(a)))
        return
    import torch

    from latte.builders import build_model
    from latte.config import load_config

    with tempfile.TemporaryDirectory() as tmp:
        base = str(Path(tmp) / "base.pt")
        torch.manual_seed(0)
        cfg = load_config(None, [o for o in _overrides(a, "full", "") if not o.startswith("model.init_from")])
        torch.save({"ema": build_model(cfg).state_dict()}, base)
        runs: dict[str, list[dict]] = {"full": [], "lora": []}
        for _ in range(a.rounds):
            for variant in runs:
                runs[variant].append(run_child(a, variant, base, argv))
    full, lora = runs["full"][0], runs["lora"][0]

    def median(v: str, key: str) -> float:
        return statistics.median([t for r in runs[v] for t in r[key]])

    step = {v: median(v, "times") for v in runs}
    peak = {v: max(r["peak_gb"] for r in rs) for v, rs in runs.items()}
    print(
        f"{a.model}, {a.frames} frames of {a.image_size}px (latents {a.image_size // 8}^2), micro-batch "
        f"{a.batch}, ZeRO-{a.zero}, {a.precision}, 1 rank on {full['device']} ({torch.get_num_threads()} "
        f"threads); LoRA rank {a.rank} on attn.qkv/attn.proj/mlp.fc1/mlp.fc2; median step of "
        f"{a.rounds} x {a.steps} steps per variant, runs alternating; peak memory: {full['peak_what']}\n"
    )
    print(
        "| | trainable params | optimizer state / rank | EMA / rank | s/step | (fwd+bwd, optimizer+EMA) "
        "| peak memory |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, r in (("full fine-tuning", full), ("LoRA", lora)):
        v = r["variant"]
        print(
            f"| {name} | {r['trainable'] / 1e6:.3f}M of {r['total'] / 1e6:.1f}M | "
            f"{r['optimizer_bytes'] / 2**20:.1f} MiB | {r['ema_bytes'] / 2**20:.1f} MiB | {step[v]:.3f} | "
            f"({median(v, 'fwd_bwd'):.3f}, {median(v, 'opt'):.3f}) | {peak[v]:.2f} GiB |"
        )
    ratio = {k: lora[k] / full[k] for k in ("trainable", "optimizer_bytes", "ema_bytes")}
    ratio.update(step=step["lora"] / step["full"], peak=peak["lora"] / peak["full"])
    print(
        f"| LoRA / full | {ratio['trainable']:.4f}x | {ratio['optimizer_bytes']:.4f}x | "
        f"{ratio['ema_bytes']:.4f}x | {ratio['step']:.2f}x | "
        f"({median('lora', 'fwd_bwd') / median('full', 'fwd_bwd'):.2f}x, "
        f"{median('lora', 'opt') / median('full', 'opt'):.2f}x) | {ratio['peak']:.2f}x |"
    )


if __name__ == "__main__":
    main()
