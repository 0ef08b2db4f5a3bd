"""FVD16 and FID of generated videos against a dataset's, measured as the Latte paper measured them.

    python -m latte.evaluate --dataset ucf101 --reals /data/UCF-101 --real-stats stats/ucf101.npz \\
        --i3d i3d_torchscript.pt --checkpoint results/checkpoints --num-videos 2048 --cfg-scale 7
    python -m latte.evaluate --dataset ucf101 --real-stats stats/ucf101.npz --i3d i3d_torchscript.pt \\
        --fakes samples/ [--metrics fvd,fid --inception inception-2015-12-05.pt] [--out result.json]
    torchrun --nproc_per_node 8 -m latte.evaluate ...      (each rank measures its share of the videos)

The real statistics are computed from ``--reals`` once and cached in ``--real-stats`` with their protocol
(``latte.evaluation.protocol``); a cache of another protocol is refused. The fakes are a directory
(``latte.sample`` latents with ``--save-latents``, frame folders, ``.npy`` frames; mp4s are accepted but the
result says it is not comparable to the paper) or sampled here from ``--checkpoint``. Bad input (a detector
file of the wrong kind, videos too short for the protocol, a cache of another protocol) ends the run with
one ``error:`` line, exit 2. The result is printed and, with ``--out``, written as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from itertools import islice
from pathlib import Path

import numpy as np
import torch

from latte.config import ConfigError, add_set_argument
from latte.evaluation import EvaluationError
from latte.evaluation.clips import choose_reals, fake_frames, fake_frames_needed, real_frames
from latte.evaluation.detectors import Detector, load_detector
from latte.evaluation.features import Item, Meter, capped_takes, combine, measure, measure_made
from latte.evaluation.frechet import frechet_distance
from latte.evaluation.protocol import DATASETS, METRICS, PAPER_FVD16, Protocol, protocol_for
from latte.evaluation.stats import RealStats, load_stats, save_stats
from latte.evaluation.video_sets import VideoSet, fake_videos, real_videos
from latte.files import atomic_write
from latte.rendezvous import World, world_from_env
from latte.sampling.progress import Progress
from latte.sampling.ranks import batches_of, end_group, start_group
from latte.vae import VaeError

DETECTOR_FLAGS = {"i3d": "--i3d", "inception": "--inception"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", required=True, choices=sorted(DATASETS), help="whose protocol and reals")
    p.add_argument("--metrics", default="fvd", help="comma-separated: fvd (FVD16, I3D), fid (Inception)")
    p.add_argument("--i3d", help="the I3D TorchScript file (i3d_torchscript.pt) for fvd")
    p.add_argument("--inception", help="the Inception TorchScript file (inception-2015-12-05.pt) for fid")
    p.add_argument("--reals", help="the dataset's videos (or frame folders), to compute --real-stats from")
    p.add_argument("--real-stats", required=True, help=".npz cache of the real statistics (made if absent)")
    p.add_argument("--fakes", help="generated videos: a latte.sample output directory or frame folders")
    p.add_argument(
        "--checkpoint", help="sample the fakes here from this checkpoint (as latte.sample reads it)"
    )
    p.add_argument("--num-videos", type=int, help="with --checkpoint: videos to sample (default 2048)")
    p.add_argument("--config", help="with --checkpoint: its config, for a weights file")
    add_set_argument(p, "sample.total_frames=16")  # with --checkpoint: the sampling config's overrides
    p.add_argument("--weights", choices=("ema", "model"), default="ema", help="with --checkpoint")
    p.add_argument("--vae", help="the VAE that decodes latents (default: the one the run recorded)")
    p.add_argument("--steps", help="with --checkpoint: sampling steps, e.g. 250 (the reference) or ddim50")
    p.add_argument("--cfg-scale", type=float, help="with --checkpoint: guidance scale (Latte's UCF101: 7)")
    p.add_argument("--seed", type=int, help="with --checkpoint: sample i's noise is drawn from (seed, i)")
    p.add_argument(  # text-to-video checkpoints: what latte.sample takes
        "--prompt", action="append", help="with a text-to-video --checkpoint: a prompt (repeat; cycled)"
    )
    p.add_argument("--prompts", help="with a text-to-video --checkpoint: a file of prompts, one per line")
    p.add_argument(
        "--text-encoder", help="with a text-to-video --checkpoint: the T5 (default: the dataset's)"
    )
    p.add_argument("--prompt-embeds", help="with a text-to-video --checkpoint: prompt embeddings (.pt)")
    p.add_argument("--batch-size", type=int, default=8, help="videos per sampling batch and detector call")
    p.add_argument("--out", help="write the result as JSON here")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


class PyAvReader:
    """Encoded videos through ``data_pipeline.video``'s PyAV decoder (``VideoReader`` of the evaluation)."""

    def __init__(self) -> None:
        from data_pipeline.video import VIDEO_EXTENSIONS

        self.extensions = VIDEO_EXTENSIONS

    def count(self, path: str) -> int:
        from data_pipeline.video import VideoError, count_frames

        try:
            return count_frames(path)
        except VideoError as exc:
            raise EvaluationError(f"{path}: {exc}") from None

    def read(self, path: str, indices: list[int]) -> np.ndarray:
        from data_pipeline.video import VideoError, decode_frames

        try:
            frames, decoded, _ = decode_frames(path, set(indices))
        except VideoError as exc:
            raise EvaluationError(f"{path}: {exc}") from None
        if len(frames) < len(set(indices)):
            raise EvaluationError(f"video {path} has {decoded} frames, fewer than its header says")
        return np.stack([frames[i] for i in indices])


def check_args(args: argparse.Namespace) -> list[str]:
    """The metrics asked for ("fvd", "fid"); ConfigError for flags that do not go together."""
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    bad = [m for m in metrics if m not in METRICS]
    if bad or not metrics:
        raise ConfigError(f"--metrics {args.metrics!r}: choose from {', '.join(METRICS)}")
    if (args.fakes is None) == (args.checkpoint is None):
        raise ConfigError("give the fakes as --fakes DIR or --checkpoint CKPT (one of them)")
    if args.num_videos is not None and args.checkpoint is None:
        raise ConfigError("--num-videos is the number of videos to sample from --checkpoint")
    prompted = args.prompt or args.prompts or args.text_encoder or args.prompt_embeds
    if prompted and args.checkpoint is None:
        raise ConfigError("--prompt, --prompts, --text-encoder and --prompt-embeds sample from --checkpoint")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, not {args.batch_size}")
    return metrics


def load_detectors(
    args: argparse.Namespace, protocols: list[Protocol], device: torch.device
) -> list[Detector]:
    out = []
    for p in protocols:
        path = getattr(args, p.detector)
        if not path:
            raise EvaluationError(
                f"{p.metric} needs the {p.detector} detector: pass {DETECTOR_FLAGS[p.detector]}"
            )
        out.append(load_detector(path, p.detector, p.feature_dim, device))
    return out


def cached_reals(args: argparse.Namespace, protocols: list[Protocol]) -> dict[str, RealStats | None]:
    """The cached real statistics of each metric (None: to compute from --reals)."""
    path = Path(args.real_stats)
    cached = {p.metric: load_stats(path, p) if path.is_file() else None for p in protocols}
    missing = [m for m, s in cached.items() if s is None]
    if missing and not args.reals:
        what = "does not exist" if not path.is_file() else f"holds no {', '.join(missing)} statistics"
        raise EvaluationError(f"--real-stats {path} {what}: give --reals DIR to compute them")
    return cached


def real_items(reals: VideoSet, protocol: Protocol, root: str) -> tuple[list[Item], dict]:
    """The real videos measured for ``protocol`` and what the statistics record of them."""
    lengths = [v.length for v in reals.videos]
    chosen = choose_reals(lengths, protocol)
    short = sum(n < protocol.real_frames_needed for n in lengths)
    if not chosen:
        raise EvaluationError(
            f"no real video under {root} has the {protocol.real_frames_needed} frames "
            f"{protocol.metric} needs ({protocol.num_frames} frames, one every {protocol.real_frame_stride})"
        )
    items = []
    for pos in chosen:
        frames = real_frames(lengths[pos], pos, protocol)
        items.append(Item(reals.videos[pos], frames, (len(frames),)))
    info = {
        "source": reals.source,
        "videos_found": len(reals.videos),
        "videos_measured": len(chosen),
        "shorter_than_needed": short,
        "unreadable": reals.unreadable[:20],
        "unreadable_count": len(reals.unreadable),
    }
    return items, info


def compute_reals(
    args: argparse.Namespace,
    protocol: Protocol,
    detector: Detector,
    world: World,
    plan: tuple[list[Item], dict],
) -> RealStats | None:
    """The real statistics of ``protocol`` from --reals (every rank its share); saved by rank 0."""
    items, info = plan
    meter = Meter(protocol, detector)
    mine = sum(len(b) for b in batches_of(len(items), args.batch_size, world.rank, world.world_size))
    with Progress(mine, world.is_main and not args.no_progress, f"{protocol.metric} reals") as bar:
        measure(items, [meter], args.batch_size, world, bar.update)
    total = combine([meter], world)
    if total is None:
        return None
    mu, sigma = total[0].mean_cov()
    stats = RealStats(mu, sigma, total[0].count, info)
    save_stats(args.real_stats, protocol, stats)
    print(
        f"{protocol.metric}: real statistics of {info['videos_measured']} videos saved to {args.real_stats}"
    )
    return stats


def fake_takes(lengths: list[int], protocols: list[Protocol]) -> list[tuple[int, ...]]:
    """Frames of each fake video each metric takes: FVD16 the first 16 of the first 2048 videos, FID every
    frame up to 50,000 in all."""
    per_metric = []
    for p in protocols:
        if p.num_frames > 1:
            per_metric.append(
                [len(fake_frames(n, p)) if i < p.num_fakes else 0 for i, n in enumerate(lengths)]
            )
        else:
            per_metric.append(capped_takes(lengths, p.num_fakes))
    return list(zip(*per_metric, strict=True))


def check_fake_lengths(names: list[str], lengths: list[int], protocols: list[Protocol], hint: str) -> None:
    for p in protocols:
        need = fake_frames_needed(p)
        short = next(((n, k) for n, k in zip(names, lengths, strict=True) if k < need), None)
        if short is not None:
            raise EvaluationError(
                f"fake video {short[0]} has {short[1]} frames; {p.metric} measures the first {need} "
                f"frames of every video{hint}"
            )


def latent_decoder(args: argparse.Namespace, device: torch.device):
    """For a latte.sample manifest: its latents' decoder (its VAE, or --vae, and its scaling factor)."""

    def make(record: dict):
        from latte.sample import Decoder
        from latte.vae import load_autoencoder

        vae_id = args.vae or record.get("vae")
        if not vae_id or record.get("scaling_factor") is None:
            raise EvaluationError("samples.json names no VAE or scaling factor: pass --vae")
        vae, _ = load_autoencoder(vae_id, device, "fp32")
        decoder = Decoder(vae, vae_id, "--vae" if args.vae else "samples.json", record["scaling_factor"], "")
        return lambda latents: decoder(torch.from_numpy(latents))  # (T, C, h, w) -> (T, H, W, 3) uint8

    return make


class Sampler:
    """Fakes made here from --checkpoint, with ``latte.sample``'s loading and ``latte.sampling``'s loops."""

    def __init__(self, args: argparse.Namespace, world: World) -> None:
        from latte.builders import build_diffusion
        from latte.sample import dataset_facts, load_decoder, load_model, prompt_conditioning
        from latte.sample import parse_args as sample_args

        argv = [args.checkpoint, "--weights", args.weights, "--num-samples", str(args.num_videos or 2048)]
        argv += ["--batch-size", str(args.batch_size)]
        given = {"--config": args.config, "--vae": args.vae, "--steps": args.steps, "--prompts": args.prompts}
        given.update({"--text-encoder": args.text_encoder, "--prompt-embeds": args.prompt_embeds})
        for flag, value in given.items():
            argv += [flag, value] if value else []
        for prompt in args.prompt or ():
            argv += ["--prompt", prompt]
        for flag, value in (("--cfg-scale", args.cfg_scale), ("--seed", args.seed)):
            argv += [flag, str(value)] if value is not None else []
        self.args = sample_args(argv + (["--set", *args.set] if args.set else []))  # latte.sample's flags
        self.world = world
        self.model, self.cfg, self.weights, recorded = load_model(self.args, world.device)
        facts = dataset_facts(self.cfg)
        self.conditioning = prompt_conditioning(self.args, self.cfg, facts, recorded, world.device)
        self.decoder = load_decoder(self.args, self.cfg, world.device, recorded, facts)
        self.diffusion = build_diffusion(self.cfg, sampling=True)

    @property
    def num_videos(self) -> int:
        return self.cfg.sample.num_samples

    def frames_per_video(self) -> int:
        from latte.sampling.generate import total_frames

        return total_frames(self.cfg)

    def batches(self, on_step):
        """This rank's videos, batch by batch: [(index, frames (T, H, W, 3) uint8), ...]."""
        from latte.sampling.generate import rank_samples

        s, w = self.cfg.sample, self.world
        made = rank_samples(
            self.model, self.diffusion, self.cfg, w.rank, w.world_size, w.device, on_step, self.conditioning
        )
        for indices in batches_of(s.num_samples, s.batch_size, w.rank, w.world_size):
            yield [(i, self.decoder(latent)) for i, latent in islice(made, len(indices))]

    def describe(self) -> str:
        s = self.cfg.sample
        prompts = getattr(self.conditioning, "prompts", ())
        cycled = f", {len(prompts)} prompts cycled, the first {prompts[0]!r}" if prompts else ""
        return (
            f"{s.num_samples} videos sampled from {self.weights} ({self.cfg.diffusion.sampling_steps} steps, "
            f"cfg scale {s.cfg_scale:g}, seed {s.seed}{cycled}), decoded by {self.decoder.vae_id}"
        )

    def steps(self) -> int:
        from latte.sampling.generate import steps_per_batch

        s, w = self.cfg.sample, self.world
        return len(batches_of(s.num_samples, s.batch_size, w.rank, w.world_size)) * steps_per_batch(
            self.cfg, self.diffusion
        )


def not_comparable(
    protocols: list[Protocol], reals: dict[str, RealStats], fakes_lossy: bool, fake_counts: dict[str, int]
) -> list[str]:
    """Why the result cannot be set beside the paper's (empty: it can)."""
    why = []
    if fakes_lossy:
        why.append("the fakes were decoded from lossy videos (mp4): give their frames or latents instead")
    for p in protocols:
        if p.dataset == "custom":
            why.append("a custom dataset: the paper has no value for it")
            break
    for p in protocols:
        found = reals[p.metric].info.get("videos_found")
        if p.real_videos_expected and found != p.real_videos_expected:
            why.append(
                f"{found} real videos found, the protocol's {p.dataset} set has {p.real_videos_expected}"
            )
        if p.num_frames > 1 and fake_counts[p.metric] < p.num_fakes:
            why.append(f"{fake_counts[p.metric]} fake videos, the protocol measures {p.num_fakes}")
    return list(dict.fromkeys(why))  # once each, whichever metrics share the reason


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    metrics = check_args(args)
    protocols = [protocol_for(m, args.dataset) for m in metrics]
    world = world_from_env()
    say = print if world.is_main else (lambda *a, **k: None)
    detectors = load_detectors(args, protocols, world.device)
    cached = cached_reals(args, protocols)
    reader = PyAvReader()
    if args.fakes:
        fakes = fake_videos(args.fakes, reader, latent_decoder(args, world.device))
        names, lengths = [v.name for v in fakes.videos], [v.length for v in fakes.videos]
        check_fake_lengths(names, lengths, protocols, "")
        source, lossy = fakes.source, fakes.lossy
    else:
        sampler = Sampler(args, world)
        lengths = [sampler.frames_per_video()] * sampler.num_videos
        hint = ": sample longer videos with --set sample.total_frames=16"
        check_fake_lengths(["(sampled)"], lengths[:1], protocols, hint)
        source, lossy = sampler.describe(), False
    takes = fake_takes(lengths, protocols)
    plans = {}
    if any(s is None for s in cached.values()):
        listed = real_videos(args.reals, reader)
        plans = {p.metric: real_items(listed, p, args.reals) for p in protocols if cached[p.metric] is None}
    start_group(world)  # every check has passed on every rank: nothing below is a user error
    reals = {}
    for p, detector in zip(protocols, detectors, strict=True):
        reals[p.metric] = cached[p.metric] or compute_reals(args, p, detector, world, plans[p.metric])
        if cached[p.metric] is not None:
            say(f"{p.metric}: real statistics from {args.real_stats} ({cached[p.metric].count} features)")
    meters = [Meter(p, d) for p, d in zip(protocols, detectors, strict=True)]
    if args.fakes:
        items = [Item(v, list(range(max(t))), t) for v, t in zip(fakes.videos, takes, strict=True) if max(t)]
        mine = sum(len(b) for b in batches_of(len(items), args.batch_size, world.rank, world.world_size))
        with Progress(mine, world.is_main and not args.no_progress, "fakes") as bar:
            measure(items, meters, args.batch_size, world, bar.update)
    else:
        with Progress(sampler.steps(), world.is_main and not args.no_progress, "denoising") as bar:
            measure_made(sampler.batches(bar.update), meters, lambda i: takes[i])
    totals = combine(meters, world)
    end_group()
    if totals is None:
        return 0
    results, counts = {}, {}
    for p, moments in zip(protocols, totals, strict=True):
        mu, sigma = moments.mean_cov()
        real = reals[p.metric]
        results[p.metric] = frechet_distance(mu, sigma, real.mu, real.sigma)
        counts[p.metric] = moments.count
    why = not_comparable(protocols, reals, lossy, counts)
    seconds = time.perf_counter() - start
    for p in protocols:
        say(
            f"{p.metric} {results[p.metric]:.4f} ({reals[p.metric].count} real / {counts[p.metric]} fake "
            f"{'clips' if p.num_frames > 1 else 'frames'}, {p.dataset}: {p.real_split})"
        )
    say(f"fakes: {source}")
    say("comparable to the paper" if not why else f"not comparable to the paper: {'; '.join(why)}")
    say(f"evaluated in {seconds:.1f} s on {world.world_size} rank(s)")
    result = {
        "results": results,
        "comparable_to_paper": not why,
        "not_comparable": why,
        "dataset": args.dataset,
        "paper_fvd16_latte": PAPER_FVD16.get(args.dataset),
        "protocols": {p.metric: p.to_dict() for p in protocols},
        "reals": {p.metric: {"features": reals[p.metric].count, **reals[p.metric].info} for p in protocols},
        "fakes": {"source": source, "lossy": lossy, "features": counts},
        "real_stats": str(args.real_stats),
        "world_size": world.world_size,
        "seconds": round(seconds, 2),
    }
    if args.out:
        atomic_write(args.out, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1)))
        say(f"wrote {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except (
        EvaluationError,
        ConfigError,
        VaeError,
    ) as exc:  # CheckpointError and SourceError are ConfigErrors
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
