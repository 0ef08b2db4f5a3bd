"""Train the tiny ``AutoencoderKL`` the demo uses (``assets/toy_vae/``) on frames of toy moving-square videos.

No real VAE's weights exist offline, and a random one decodes noise-like videos; this one is trained on what
the demo shows: frames of ``data_pipeline.toy_videos.synthetic_frames`` (64x64, a seeded gradient, a square
moving along a random direction, the frame marker), a few thousand seeds. It has the SD VAE's layout at toy
width: 4 blocks (downsampling 8, so 64 px frames -> the 8x8 latents of ``configs/tiny.yaml``), 4 latent
channels, weights stored in fp16 (< 1 MB). Loss: pixel MSE + L1 on a posterior sample, plus a small KL.
The config's ``scaling_factor`` is 1 / std of the latents on training frames (how the SD VAE's 0.18215 was
chosen), which the sharding job multiplies in and records in the dataset index. Held-out seeds (not trained
on; the demo's clips among them) are reported as reconstruction MSE and PSNR of the saved weights.

Reproduce (seeded, one torch thread; 3000 steps, about 12 minutes on one CPU core; the demo clips' seeds
0-3005 are held out):

    .venv/bin/python scripts/train_toy_vae.py --out assets/toy_vae

which printed: held-out (64 seeds x 12 frames) reconstruction MSE 33.34 (0-255 scale), PSNR 32.9 dB; the
demo's 24 clips (576 frames): MSE 24.35, PSNR 34.27 dB; scaling factor 1.0207; 261,079 parameters, 541 kB.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_pipeline.toy_videos import make_class_videos, synthetic_frames, tiny_vae  # noqa: E402

CHANNELS = (16, 16, 32, 32)  # 4 blocks: downsampling 8, as the SD VAE
# GroupNorm over all channels: a group of 2 channels normalised over a flat region keeps little more than
# their sign, and colours did not get through (grey reconstructions after 600 steps with 8 groups)
GROUPS = 1
INIT_LOGVAR = -6.0  # the posterior starts narrow (std e^-3): sampling noise must not drown the signal
SIZE = 64  # the demo's frame side
FRAMES = 24  # the demo clips' length: the square's positions are those of a 24-frame clip
TRAIN_SEEDS = range(10_000, 14_000)  # far from the demo's (1000 k + v) and the held-out ones
HELD_OUT_SEEDS = range(5_000, 5_064)


def build_vae():
    """The untrained toy ``AutoencoderKL``, its posterior's log-variance starting at ``INIT_LOGVAR``."""
    vae = tiny_vae(CHANNELS, GROUPS, SIZE)
    with torch.no_grad():  # quant_conv's output: (mean, logvar) x latent channels
        vae.quant_conv.bias[vae.config.latent_channels :] = INIT_LOGVAR
    return vae


def toy_frames(seeds: range, per_video: int, rng: np.random.Generator) -> torch.Tensor:
    """(len(seeds) * per_video, 3, S, S) float32 in [-1, 1]: ``per_video`` random frames of each seed's clip,
    each clip along a random direction."""
    out = []
    for seed in seeds:
        clip = synthetic_frames(FRAMES, (SIZE, SIZE), seed=seed, angle=float(rng.uniform(0, 2 * np.pi)))
        out.append(clip[rng.choice(FRAMES, per_video, replace=False)])
    pixels = torch.from_numpy(np.concatenate(out)).permute(0, 3, 1, 2)  # (N, H, W, 3) -> (N, 3, H, W)
    return pixels.float() / 127.5 - 1.0


def demo_frames() -> torch.Tensor:
    """Every frame of the demo's 24 class clips (their seeds are held out), as the sharding job reads them."""
    import tempfile

    from data_pipeline.video import ClipSpec, read_clips

    with tempfile.TemporaryDirectory() as tmp:
        paths = make_class_videos(tmp, num_classes=4, per_class=6, frames=FRAMES, size=SIZE)
        spec = ClipSpec(num_frames=FRAMES, frame_interval=1, clips_per_video=1, image_size=SIZE)
        return torch.cat([read_clips(str(p), spec).pixels[0] for p in paths])  # (24 * 24, 3, S, S)


@torch.no_grad()
def reconstruction(vae, pixels: torch.Tensor) -> tuple[float, float]:
    """(MSE in 0-255 units², PSNR dB) of decode(posterior mean) against ``pixels``, on the uint8 scale the
    demo's videos have."""
    errors = []
    for chunk in pixels.split(64):
        out = vae.decode(vae.encode(chunk).latent_dist.mean).sample.clamp(-1, 1)
        rounded = ((out + 1) * 127.5).round()
        errors.append(((rounded - (chunk + 1) * 127.5) ** 2).flatten(1).mean(1))
    mse = float(torch.cat(errors).mean())
    return mse, 10 * np.log10(255.0**2 / mse)


@torch.no_grad()
def latent_std(vae, pixels: torch.Tensor) -> float:
    """The std of posterior samples over ``pixels`` (all elements), what diffusion training sees."""
    samples = [vae.encode(chunk).latent_dist.sample() for chunk in pixels.split(64)]
    return float(torch.cat(samples).std())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(REPO / "assets" / "toy_vae"))
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3, help="peak of a one-cycle schedule")
    p.add_argument("--kl-weight", type=float, default=1e-5, help="times the KL per latent element")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=250)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: the fastest on a busy machine)")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    start = time.perf_counter()
    train = toy_frames(TRAIN_SEEDS, 4, rng)
    held_out = toy_frames(HELD_OUT_SEEDS, FRAMES // 2, rng)
    demo = demo_frames()
    vae = build_vae()
    params = sum(p.numel() for p in vae.parameters())
    print(f"{len(train)} training frames, {params} parameters", flush=True)

    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.steps, pct_start=0.05)
    order = torch.Generator().manual_seed(args.seed)
    for step in range(1, args.steps + 1):
        batch = train[torch.randint(len(train), (args.batch_size,), generator=order)]
        posterior = vae.encode(batch).latent_dist
        out = vae.decode(posterior.sample(order)).sample  # a posterior sample: what diffusion trains on
        recon = F.mse_loss(out, batch) + F.l1_loss(out, batch)
        kl = posterior.kl().mean() / posterior.mean[0].numel()  # per latent element
        loss = recon + args.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % args.log_every == 0 or step == args.steps:
            print(
                f"step {step:5d} | recon {recon.item():.5f} | kl {kl.item():.3f} | "
                f"{time.perf_counter() - start:.0f} s",
                flush=True,
            )

    vae = vae.eval().requires_grad_(False).half().float()  # what the saved fp16 weights decode like
    vae.register_to_config(scaling_factor=round(1.0 / latent_std(vae, train[:2048]), 4))
    out = Path(args.out)
    vae.half().save_pretrained(out)
    vae.float()
    report = {"parameters": params, "scaling_factor": vae.config.scaling_factor}
    for name, pixels in (("held_out", held_out), ("demo_clips", demo)):
        mse, psnr = reconstruction(vae, pixels)
        report[name] = {"frames": len(pixels), "mse_255": round(mse, 2), "psnr_db": round(psnr, 2)}
    size = (out / "diffusion_pytorch_model.safetensors").stat().st_size
    print(json.dumps(report))
    print(
        f"wrote {out} ({size / 1e3:.0f} kB); scaling factor {vae.config.scaling_factor}; held-out "
        f"reconstruction MSE {report['held_out']['mse_255']} (0-255 scale), PSNR "
        f"{report['held_out']['psnr_db']} dB; the demo's clips: PSNR {report['demo_clips']['psnr_db']} dB; "
        f"took {time.perf_counter() - start:.0f} s"
    )


if __name__ == "__main__":
    main()
