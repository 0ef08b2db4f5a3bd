"""Train Latte: ``python train.py --config configs/tiny.yaml [--set train.max_steps=100 ...]``.

A thin entry point: parse the config, build model and diffusion, loop, report. The loop holds no noise or
loss math (``diffusion.training_losses`` does) and syncs with the host only every ``log_every`` steps.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import torch

from latte.builders import build_diffusion, build_model
from latte.config import Config, ConfigError, load_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML preset (configs/*.yaml); defaults when omitted")
    parser.add_argument(
        "--set",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="override config values, e.g. --set train.lr=2e-4 model.attention=sdpa",
    )
    return parser.parse_args(argv)


def lr_at(cfg: Config, step: int) -> float:
    """Linear warmup over ``warmup_steps`` optimizer steps, then constant."""
    warmup = cfg.train.warmup_steps
    return cfg.train.lr * min(1.0, (step + 1) / warmup) if warmup > 0 else cfg.train.lr


def make_run_dir(cfg: Config) -> Path:
    """results_dir/NNN-<model>: a fresh directory per job, holding the resolved config."""
    root = Path(cfg.train.results_dir)
    root.mkdir(parents=True, exist_ok=True)
    tag = re.sub(r"[^A-Za-z0-9]+", "-", cfg.model.name).strip("-")
    index = len([p for p in root.iterdir() if p.is_dir()])
    while True:
        run_dir = root / f"{index:03d}-{tag}"
        try:
            run_dir.mkdir()
            break
        except FileExistsError:
            index += 1
    cfg.save(run_dir / "config.yaml")
    return run_dir


def batches_for(cfg: Config):
    if cfg.data.index:
        raise ConfigError(
            f"data.index '{cfg.data.index}': streaming latent shards are not supported by this version; "
            "leave data.index empty to train on synthetic latents"
        )
    from data_pipeline.synthetic import synthetic_batches

    return synthetic_batches(
        cfg.train.seed,
        cfg.train.micro_batch_size,
        cfg.model.num_classes,
        cfg.data.num_frames,
        cfg.model.in_channels,
        cfg.data.latent_size,
    )


def train(cfg: Config) -> list[float]:
    """Run the loop; returns the mean loss of every logging interval."""
    torch.manual_seed(cfg.train.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.train.precision == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision fp16 needs a GPU; use fp32 or bf16 on CPU")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision)
    model = build_model(cfg).to(device).train()
    diffusion = build_diffusion(cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        params, lr=cfg.train.lr, betas=tuple(cfg.train.adam_betas), weight_decay=cfg.train.weight_decay
    )
    scaler = torch.amp.GradScaler(enabled=cfg.train.precision == "fp16")
    batches = batches_for(cfg)
    run_dir = make_run_dir(cfg)
    n_params = sum(p.numel() for p in params)
    size = f"{n_params / 1e6:.2f}M params"
    print(f"run dir {run_dir} | {cfg.model.name} {size} | {device} {cfg.train.precision}", flush=True)

    accum = cfg.train.gradient_accumulation_steps
    interval_loss = torch.zeros((), device=device)
    history: list[float] = []
    t0 = time.perf_counter()
    for step in range(cfg.train.max_steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step)
        for _ in range(accum):  # exactly `accum` micro-batches per optimizer step
            batch = next(batches)
            x = batch["latent"].to(device)  # (B, F, C, h, w)
            kwargs = {"y": batch["y"].to(device)} if "y" in batch else {}
            t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), device=device)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                loss = diffusion.training_losses(model, x, t, kwargs)["loss"].mean()
            scaler.scale(loss / accum).backward()
            interval_loss += loss.detach() / accum
        scaler.unscale_(opt)
        clip = cfg.train.clip_max_norm if step >= cfg.train.clip_start_step else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % cfg.train.log_every == 0 or step + 1 == cfg.train.max_steps:
            steps_in_interval = (step % cfg.train.log_every) + 1
            mean_loss = interval_loss.item() / steps_in_interval  # the one host sync per interval
            history.append(mean_loss)
            elapsed = time.perf_counter() - t0
            samples = steps_in_interval * accum * cfg.train.micro_batch_size
            print(
                f"step {step + 1:>7d} | loss {mean_loss:.4f} | grad norm {grad_norm.item():.3f} | "
                f"lr {lr_at(cfg, step):.2e} | {samples / elapsed:.1f} samples/s",
                flush=True,
            )
            interval_loss.zero_()
            t0 = time.perf_counter()
    return history


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        history = train(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if len(history) >= 2:
        print(f"loss {history[0]:.4f} (first interval) -> {history[-1]:.4f} (last interval)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
