"""Forward + backward of the text-to-video LatteT2V vs the class-conditional Latte of the same shape.

    python benchmarks/t2v_vs_latte.py [--width 384 --heads 6 --depth 12 --frames 8 --latent 16 --batch 2
                                       --caption-tokens 120 --caption-channels 4096 --rounds 5]

Both models are built with the same transformer shape (Latte-S/2's by default: 12 blocks = 6 spatial-temporal
pairs, 384 wide, 6 heads, patch 2), fp32, ``sdpa`` attention, and run forward + backward (sum of the output)
on the same latents; LatteT2V also reads a caption of ``--caption-tokens`` tokens of T5-XXL's width (half of
them real, through the mask). Rounds interleave the two models, so a noisy machine slows both alike; the table
gives the median time per step of each and their ratio, plus the FLOPs counted by ``latte.metrics``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from latte.metrics import flops_per_sample, t2v_flops_per_sample  # noqa: E402
from latte.models import Latte, LatteT2V  # noqa: E402
from latte.models.flavors import LatteArch, LatteT2VArch  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--depth", type=int, default=12, help="blocks, spatial and temporal together")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--latent", type=int, default=16)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--caption-tokens", type=int, default=120)
    p.add_argument("--caption-channels", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=5)
    return p.parse_args()


def main() -> None:
    a = parse_args()
    torch.manual_seed(0)
    common = dict(input_size=a.latent, patch_size=2, in_channels=4, hidden_size=a.width, num_heads=a.heads)
    latte = Latte(**common, depth=a.depth, num_frames=a.frames, num_classes=101, attention="sdpa")
    t2v = LatteT2V(
        **common,
        num_layers=a.depth // 2,
        caption_channels=a.caption_channels,
        num_frames=a.frames,
        attention="sdpa",
    )
    x = torch.randn(a.batch, a.frames, 4, a.latent, a.latent)  # (N, F, C, h, w)
    t = torch.randint(0, 1000, (a.batch,))
    y = torch.randint(0, 101, (a.batch,))
    text = torch.randn(a.batch, a.caption_tokens, a.caption_channels)  # (N, L, D)
    mask = torch.arange(a.caption_tokens)[None].expand(a.batch, -1) < a.caption_tokens // 2  # (N, L)
    steps = {
        "Latte (class-conditional)": lambda: latte(x, t, y).sum().backward(),
        "LatteT2V": lambda: t2v(x, t, text, mask).sum().backward(),
    }
    times: dict[str, list[float]] = {name: [] for name in steps}
    for step in steps.values():  # warm-up
        step()
    for _ in range(a.rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    arch = LatteArch(a.depth, a.width, a.heads, 2)
    flops = {
        "Latte (class-conditional)": flops_per_sample(arch, a.frames, a.latent).training,
        "LatteT2V": t2v_flops_per_sample(
            LatteT2VArch(a.depth // 2, a.width, a.heads, 2, a.caption_channels),
            a.frames,
            a.latent,
            a.caption_tokens,
        ).training,
    }
    base = statistics.median(times["Latte (class-conditional)"])
    print(
        f"fwd+bwd, {a.depth} blocks x {a.width} wide, {a.heads} heads, batch {a.batch} x {a.frames} "
        f"frames of {a.latent}^2 latents; T2V caption {a.caption_tokens} tokens x {a.caption_channels}; "
        f"median of {a.rounds} interleaved rounds ({torch.get_num_threads()} threads)\n"
    )
    print("| model | params | GFLOP/sample (fwd+bwd) | s/step | vs class-conditional |")
    print("|---|---|---|---|---|")
    for name, model in (("Latte (class-conditional)", latte), ("LatteT2V", t2v)):
        median = statistics.median(times[name])
        params = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"| {name} | {params:.1f}M | {flops[name] / 1e9:.1f} | {median:.3f} | {median / base:.2f}x |")


if __name__ == "__main__":
    main()
