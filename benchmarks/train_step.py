"""Training-step time of our DeepSpeed engine vs a bare PyTorch step of the same model and batch, one run.

    python benchmarks/train_step.py [--model Latte-S/2 --frames 16 --latent 32 --batch 2 --steps 3 --warmup 1
                                     --precision fp32|bf16 --attention auto --images 0]

Rows: ``bare`` (model.train(); AdamW; loss.backward(); clip; step: no DeepSpeed), then ``zero2`` and
``zero3`` through ``latte.engine.build_engine`` (the exact path train.py uses). All rows see the same
weights, data, timesteps and noise; the step is forward + backward + optimizer, timed with perf_counter
(CUDA-synchronised on GPU) after ``--warmup`` steps, median over ``--steps``. ``--images K``: video-image
joint training, K single-frame images (with their labels) after each clip's frames. Runs as a world of one
(launch with torchrun for more ranks). On GPU the MFU column uses ``latte.metrics`` (FLOPs per sample from the
config, peak by device).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from latte.builders import build_diffusion, build_model  # noqa: E402
from latte.config import load_config, resolved_arch  # noqa: E402
from latte.engine import build_engine, set_grad_clip, setup_distributed  # noqa: E402
from latte.metrics import flops_per_sample, peak_flops  # noqa: E402
from latte.precision import DTYPES  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="Latte-S/2")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--latent", type=int, default=32, help="latent size (image size / 8)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--attention", default="auto")
    p.add_argument("--stages", nargs="+", default=["2", "3"])
    p.add_argument("--images", type=int, default=0, help="K images per clip (video-image joint training)")
    return p.parse_args()


def timed(step_fn, steps: int, warmup: int, device: torch.device) -> float:
    """Median seconds of ``step_fn()`` over ``steps`` after ``warmup`` untimed calls."""
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step_fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    args = parse_args()
    overrides = [
        f"model.name={args.model}",
        "model.num_classes=101",
        f"model.attention={args.attention}",
        f"data.num_frames={args.frames}",
        f"data.image_size={args.latent * 8}",
        "train.clip_start_step=0",
        f"train.micro_batch_size={args.batch}",
        f"train.precision={args.precision}",
    ]
    cfg = load_config(None, overrides)
    world = setup_distributed(cfg)
    dev = world.device
    dtype = DTYPES[args.precision]
    diffusion = build_diffusion(cfg)
    torch.manual_seed(0)
    reference = build_model(cfg)
    g = torch.Generator().manual_seed(0)
    k = args.images
    x = torch.randn(args.batch, args.frames + k, 4, args.latent, args.latent, generator=g).to(dev)
    y = torch.randint(0, 101, (args.batch,), generator=g).to(dev)
    t = torch.randint(0, 1000, (args.batch,), generator=g).to(dev)
    noise = torch.randn(x.shape, generator=g).to(dev)
    conditions: dict = {"y": y}
    if k:  # the images' own labels; the model runs them through the spatial blocks only
        conditions.update(
            y_image=torch.randint(0, 101, (args.batch, k), generator=g).to(dev), use_image_num=k
        )

    def loss_of(model) -> torch.Tensor:
        def model_fn(x_t, ts, **kw):
            return model(x_t.to(dtype), ts, **kw).float()

        return diffusion.training_losses(model_fn, x, t, conditions, noise=noise)["loss"].mean()

    def bare_step_time() -> float:
        bare = copy.deepcopy(reference).to(device=dev, dtype=dtype).train()
        opt = torch.optim.AdamW([p for p in bare.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)

        def bare_step() -> None:
            loss_of(bare).backward()
            torch.nn.utils.clip_grad_norm_(bare.parameters(), cfg.train.clip_max_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)

        return timed(bare_step, args.steps, args.warmup, dev)

    rows = [("bare torch", bare_step_time())]
    for stage in args.stages:
        stage_cfg = load_config(None, [*overrides, f"train.zero_stage={stage}"])
        engine = build_engine(stage_cfg, copy.deepcopy(reference), world)
        set_grad_clip(engine, stage_cfg.train.clip_max_norm)

        def ds_step(engine=engine) -> None:
            engine.backward(loss_of(engine))
            engine.step()

        rows.append((f"deepspeed zero{stage}", timed(ds_step, args.steps, args.warmup, dev)))
        del engine

    flops = flops_per_sample(resolved_arch(cfg), args.frames, args.latent, images=k).training
    peak, name = peak_flops(dev, args.precision)
    shape = f"({args.batch}, {args.frames}{f' + {k} images' if k else ''}, 4, {args.latent}, {args.latent})"
    print(
        f"\n{args.model}, x = {shape}, {args.precision}, attention {args.attention}, device {name}, "
        f"torch {torch.__version__}, median of {args.steps}"
    )
    print("| step | ms | ratio vs bare | samples/s | MFU |")
    print("|---|---|---|---|---|")
    base = rows[0][1]
    for label, seconds in rows:
        samples = args.batch / seconds
        mfu = f"{100 * flops * samples / peak:.1f}%" if peak else "n/a"
        print(f"| {label} | {1000 * seconds:.1f} | {seconds / base:.3f} | {samples:.2f} | {mfu} |")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
