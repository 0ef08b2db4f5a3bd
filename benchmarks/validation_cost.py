"""What the validation loss costs, in training steps: one run, one machine.

    python benchmarks/validation_cost.py [--model Latte-S/2 --frames 8 --latent 16 --batch 5 --clips 8
                                          --buckets 10 --rounds 3]

Times (median of ``--rounds``) a bare training step (forward + loss, backward, AdamW; micro-batch
``--batch``) and one weight set's validation (``latte.evaluation.validation_loss`` on ``--clips`` clips x
``--buckets`` timesteps, in forwards of 2 x batch, as ``train.py`` runs it), on the same model and machine.
Training validates two weight sets (raw and EMA), so one validation costs ``2 x val / step`` steps on one
rank; spread over W ranks it costs ``2 x val / step / W`` steps of wall time (plus the EMA's consolidation,
one all-gather of the weights, not timed here). The last column is the overhead at ``train.val_every``
1000 on one rank for ``train.val_clips`` 64 (scaled from the clips timed).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from latte.builders import build_diffusion, build_model  # noqa: E402
from latte.conditioning import conditioning_of  # noqa: E402
from latte.config import load_config  # noqa: E402
from latte.evaluation.validation_loss import validation_loss  # noqa: E402
from latte.precision import call_in  # noqa: E402


class _Clips:
    """Random latents and labels standing in for a ``ValidationSet`` (the cost does not depend on them)."""

    index_url, skipped = "<random>", 0

    def __init__(self, n: int, shape: tuple[int, ...], classes: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.latents = torch.randn(n, *shape, generator=g)  # (n, F, C, h, w)
        self.labels = torch.randint(0, classes, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.latents)

    def batch(self, positions):
        return {"latent": self.latents[positions], "y": self.labels[positions]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="Latte-S/2")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--latent", type=int, default=16)
    p.add_argument("--batch", type=int, default=5)
    p.add_argument("--clips", type=int, default=8)
    p.add_argument("--buckets", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    cfg = load_config(
        None,
        [
            f"model.name={args.model}",
            "model.num_classes=101",
            f"data.num_frames={args.frames}",
            f"data.image_size={args.latent * 8}",
            "model.class_dropout_prob=0.1",
        ],
    )
    torch.manual_seed(0)
    model = build_model(cfg)
    for q in model.parameters():  # adaLN-Zero: a fresh model is the identity per block
        if q.requires_grad and not q.any():
            q.data.normal_(0.0, 0.02)
    diffusion, conditioning = build_diffusion(cfg), conditioning_of(cfg.model, None)
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)
    shape = (args.frames, cfg.model.in_channels, args.latent, args.latent)
    clips = _Clips(args.clips, shape, 101)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, *shape, generator=g)
    t = torch.randint(0, diffusion.num_timesteps, (args.batch,), generator=g)
    y = torch.randint(0, 101, (args.batch,), generator=g)

    def fn(x_t, ts, **kw):
        return call_in(model, torch.float32, x_t, ts, **kw)

    def step() -> None:
        loss = diffusion.training_losses(fn, x, t, {"y": y})["loss"].mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def validate() -> None:
        cpu = torch.device("cpu")
        validation_loss(fn, diffusion, conditioning, clips, 0, 1, cpu, args.buckets, 2 * args.batch)

    def median_s(work, reps: int) -> float:
        work()  # warm-up
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            work()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    step_s = median_s(step, 3 * args.rounds)
    val_s = median_s(validate, args.rounds)
    steps = 2 * val_s / step_s  # raw + EMA
    per_64 = steps * 64 / args.clips
    threads = torch.get_num_threads()
    print(f"{args.model}, {args.frames}x{args.latent}² latents, micro-batch {args.batch}, {threads} threads")
    columns = [
        "clips x buckets",
        "train step s",
        "one weight set's validation s",
        "validation (raw + EMA) in steps",
        "overhead at val_every 1000, 64 clips, 1 rank",
    ]
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    row = [
        f"{args.clips} x {args.buckets}",
        f"{step_s:.3f}",
        f"{val_s:.2f}",
        f"{steps:.1f}",
        f"{per_64 / 10:.1f}%",
    ]
    print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
