"""Sample videos from a trained Latte: EMA weights -> DDPM/DDIM (+ guidance) -> VAE decode ÷ factor -> mp4.

    python -m latte.sample CKPT_DIR_OR_STEP_DIR --vae VAE --out samples/ [--num-samples 8] [--classes 3,77]
    python -m latte.sample weights.pt --config configs/ucf101.yaml --vae VAE --cfg-scale 7
    python -m latte.sample CKPT --vae VAE --sampler ddim --steps 50 --total-frames 64 --overlap 4
    python -m latte.sample BASE --lora ADAPTER_DIR_OR_LORA_CKPT --lora-scale 0.8 --vae VAE ...
    torchrun --nproc_per_node 8 -m latte.sample ...        (or srun: samples are split among the ranks)

The config is the checkpoint's own (``meta.json``) unless ``--config`` is given; ``--set key=value`` and the
flags below override it (they set ``sample.*`` / ``diffusion.sampling_steps``). Writes one
``sample_XXXX.mp4`` per sample, ``grid.mp4`` + ``grid.gif`` of all of them, ``samples.json`` (what was
sampled, how) and with ``--save-latents`` the latents ``sample_XXXX.npy`` (T, C, h, w), scaled as the model
sees them. Mistakes (a bad class, weights that do not fit the config, a missing VAE) end the run before any
sampling with one ``error:`` line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from latte import lora
from latte.builders import attention_line, build_diffusion, build_model
from latte.checkpoint import base_changed
from latte.conditioning import TextCaptions, conditioning_of
from latte.config import Config, ConfigError, add_set_argument, caption_channels_of, sampler_of
from latte.engine import configure_cuda_numerics
from latte.errors import first_line
from latte.files import atomic_write
from latte.models import Latte
from latte.parallel.sequence import check_divides, data_place
from latte.precision import DTYPES
from latte.rendezvous import world_from_env
from latte.sampling import decoding, media
from latte.sampling.generate import rank_samples, steps_per_batch, total_frames
from latte.sampling.progress import Progress
from latte.sampling.prompts import PromptError, load_prompt_embeds, read_prompt_file
from latte.sampling.ranks import batches_of, end_group, gather_to_main, start_group
from latte.sampling.weights import WEIGHTS, check_fits, load_source
from latte.vae import VaeError, decode, load_autoencoder

FLAGS = {  # flag -> the config key it sets
    "num_samples": "sample.num_samples",
    "images": "sample.images",
    "seed": "sample.seed",
    "sampler": "sample.sampler",
    "steps": "diffusion.sampling_steps",
    "eta": "sample.eta",
    "cfg_scale": "sample.cfg_scale",
    "precision": "sample.precision",
    "batch_size": "sample.batch_size",
    "fps": "sample.fps",
    "total_frames": "sample.total_frames",
    "overlap": "sample.overlap",
    "sequence_parallel": "sample.sequence_parallel",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "checkpoint",
        help="a checkpoint dir (its newest complete step), a step_XXXXXXXX dir, or "
        "an exported .pt / .safetensors (then --config is needed)",
    )
    p.add_argument("--config", help="YAML config (default: the one saved in the checkpoint's meta.json)")
    add_set_argument(p)
    p.add_argument("--weights", choices=WEIGHTS, default="ema", help="EMA (default) or the raw model weights")
    p.add_argument("--vae", help="diffusers AutoencoderKL: local dir or hub id (default: the dataset's VAE)")
    p.add_argument("--out", default="samples", help="output directory (default: ./samples)")
    p.add_argument("--num-samples", type=int, help="videos to generate (sample.num_samples)")
    p.add_argument("--classes", help="comma-separated class indices, cycled over the samples, e.g. 3,77")
    p.add_argument("--prompt", action="append", help="text-to-video: a prompt (repeat for more; cycled)")
    p.add_argument("--prompts", help="text-to-video: a file of prompts, one per line")
    p.add_argument("--negative-prompt", help="text-to-video: the null condition of guidance (default '')")
    p.add_argument("--text-encoder", help="text-to-video: the T5 encoder (default: the dataset's)")
    p.add_argument("--prompt-embeds", help="text-to-video: precomputed prompt embeddings instead of T5 (.pt)")
    p.add_argument(
        "--images",
        action="store_const",
        const=True,
        help="text-to-video models: text-to-image (one frame, temporal blocks off), PNGs",
    )
    p.add_argument("--seed", type=int, help="sample i's noise depends on (seed, i) only")
    p.add_argument("--sampler", choices=("ddpm", "ddim"), help="default: ddim for 'ddimN' steps, else ddpm")
    p.add_argument("--steps", help="sampling steps: a respacing such as 250, ddim50 or 10,10,10")
    p.add_argument("--eta", type=float, help="DDIM noise (0 = deterministic)")
    p.add_argument("--cfg-scale", type=float, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), help="model compute (fp16: GPU only)")
    p.add_argument("--batch-size", type=int, help="samples per forward pass on a rank")
    p.add_argument("--fps", type=int, help="frame rate of the videos")
    p.add_argument(
        "--total-frames",
        type=int,
        help="frames per video; beyond the model's clip length the video is extended clip by clip",
    )
    p.add_argument("--overlap", type=int, help="latent frames each clip shares with the previous one")
    p.add_argument(
        "--sequence-parallel",
        type=int,
        help="ranks that denoise each clip together (frames split over them); the groups share the samples",
    )
    p.add_argument(
        "--lora",
        help="apply a LoRA adapter to the model: a folder from `latte.export --adapter` or a LoRA run's "
        "checkpoint dir (its EMA adapter)",
    )
    p.add_argument(
        "--lora-scale", type=float, help="scale of the LoRA adapter's contribution (default 1; 0 = the base)"
    )
    p.add_argument("--save-latents", action="store_true", help="also write the latents as .npy")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def overrides_of(args: argparse.Namespace) -> list[str]:
    """--set, then the flags (which win)."""
    out = list(args.set)
    for name, key in FLAGS.items():
        value = getattr(args, name)
        if value is not None:
            out.append(f"{key}={value}")
    if args.classes is not None:
        try:
            classes = [int(c) for c in args.classes.split(",") if c.strip()]
        except ValueError:
            raise ConfigError(f"--classes '{args.classes}' must be comma-separated class indices") from None
        out.append(f"sample.classes=[{','.join(map(str, classes))}]")
    return out


def load_model(args: argparse.Namespace, device: torch.device) -> tuple[Latte, Config, str, dict | None]:
    """The model with the checkpoint's weights, its config, a description of where both came from, and the
    dataset record of its checkpoint (None for weights files and older checkpoints)."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed's first import (--weights model)
    source = load_source(args.checkpoint, args.weights, args.config, overrides_of(args))
    cfg = source.cfg
    if cfg.sample.precision == "fp16" and device.type != "cuda":
        raise ConfigError("precision fp16 needs a GPU; use bf16 or fp32 on the CPU")
    model = build_model(cfg)  # a LoRA run's: its base (model.init_from) with empty adapters
    d = cfg.data
    what = f"{cfg.model.name} ({cfg.model.num_classes} classes, {d.num_frames} frames of {d.latent_size}²)"
    description = source.description
    if lora.enabled(cfg.model.lora):
        changed = base_changed(source.base, cfg)
        if changed:
            raise ConfigError(f"{args.checkpoint} {changed}")
        lora.load_adapter_state(model, source.state_dict, source.weights_file)
        description += f", LoRA rank {cfg.model.lora.rank} on {cfg.model.init_from}"
    else:
        check_fits(model, source.state_dict, source.weights_file, what)
        model.load_state_dict(source.state_dict, strict=True)
    if args.lora:
        description += f"; {lora.apply_adapter(model, args.lora)}"
    if args.lora_scale is not None:
        if not lora.lora_layers(model):
            raise ConfigError(
                "--lora-scale scales a LoRA adapter: give --lora PATH or a LoRA run's checkpoint"
            )
        lora.set_scale(model, args.lora_scale)
        description += f", scale {args.lora_scale:g}"
    return model.to(device).eval().requires_grad_(False), cfg, description, source.dataset


def prompt_conditioning(
    args: argparse.Namespace,
    cfg: Config,
    facts: decoding.IndexFacts | None,
    recorded: dict | None,
    device: torch.device,
):
    """The model's conditioning; for a text-to-video model with the prompts (--prompt, --prompts, else
    sample.prompts) encoded by T5 (--text-encoder, sample.text_encoder, else the dataset's), or read from
    --prompt-embeds, and the negative prompt's embedding as the null condition. ``facts``: the config's
    dataset (``dataset_facts``), read once per run."""
    conditioning = conditioning_of(cfg.model)
    given = args.prompt or args.prompts or args.prompt_embeds
    if not isinstance(conditioning, TextCaptions):
        if given:
            raise ConfigError(f"prompts given, but {cfg.model.name} is not a text-to-video model")
        return conditioning
    try:
        if args.prompt_embeds:
            embeds = load_prompt_embeds(args.prompt_embeds, conditioning.caption_channels)
            prompts, states, negative = embeds.prompts, embeds.embeds, embeds.negative
            if negative is None and (args.negative_prompt or cfg.sample.negative_prompt):
                raise PromptError(
                    "--negative-prompt needs the text encoder; put negative_prompt_embeds in the file"
                )
        else:
            prompts = (args.prompt or []) + (read_prompt_file(args.prompts) if args.prompts else [])
            prompts = tuple(prompts or cfg.sample.prompts)
            if not prompts:
                raise PromptError(
                    "a text-to-video model samples from prompts: give --prompt or --prompts FILE"
                )
            negative_text = (
                args.negative_prompt if args.negative_prompt is not None else cfg.sample.negative_prompt
            )
            encoded = encode_prompts(args, cfg, facts, recorded, device, [*prompts, negative_text])
            states, negative = tuple(encoded[:-1]), encoded[-1]
    except PromptError as exc:
        raise ConfigError(str(exc)) from None
    if negative is None:  # a prompt-embeds file without a negative prompt: the dataset's empty prompt
        negative = dataset_null_caption(facts)
    return dataclasses.replace(
        conditioning, null_caption=negative, prompts=tuple(prompts), prompt_embeds=states
    )


def encode_prompts(
    args, cfg: Config, facts: decoding.IndexFacts | None, recorded: dict | None, device, texts: list[str]
) -> list:
    """``texts`` through the T5 encoder: (L_i, D) float32 tensors (real tokens only)."""
    from data_pipeline.text_encoder import TextEncoderError, load_text_encoder

    known = facts.facts if facts is not None and facts.facts is not None else None
    name = (
        args.text_encoder
        or cfg.sample.text_encoder
        or (known.text_encoder if known is not None else "")
        or (recorded or {}).get("text_encoder", "")
    )
    if not name:
        raise PromptError(
            "the T5 text encoder is unknown: pass --text-encoder PATH (or --prompt-embeds FILE), or set "
            "sample.text_encoder"
        )
    max_length = known.max_caption_tokens if known is not None and known.max_caption_tokens else 120
    try:
        encoder = load_text_encoder(name, device=device, max_length=max_length)
    except TextEncoderError as exc:
        raise PromptError(str(exc)) from None
    if encoder.width != caption_channels_of(cfg.model):
        raise PromptError(
            f"the text encoder '{name}' gives embeddings of width {encoder.width}, the model takes "
            f"{caption_channels_of(cfg.model)}"
        )
    embeds, truncated = encoder.encode(texts)
    if truncated:
        print(f"warning: {truncated} prompt(s) cut to {max_length} tokens", file=sys.stderr, flush=True)
    return [torch.from_numpy(e).float() for e in embeds]


def dataset_null_caption(facts: decoding.IndexFacts | None):
    """The empty prompt's embedding recorded with the config's dataset; a ConfigError when there is none."""
    from data_pipeline.index import load_null_caption

    null = None
    if facts is not None and facts.facts is not None:
        null = load_null_caption(facts.url, facts.facts)
    if null is None:
        raise ConfigError(
            "--prompt-embeds has no negative_prompt_embeds and no dataset records the empty prompt's "
            "embedding: add negative_prompt_embeds to the file"
        )
    return torch.from_numpy(null).float()


def index_facts(url: str) -> decoding.IndexFacts:
    """The facts of the dataset index at ``url`` (a dataset root or its index.json), read by the dataset's
    one reader, ``data_pipeline.index``; never raises (sampling can go on without them)."""
    from data_pipeline.index import index_url_for, load_index  # only with a dataset: no import otherwise

    url = index_url_for(url)
    try:
        return decoding.IndexFacts(url, load_index(url).facts)
    except Exception as exc:  # DatasetIndexError (unreadable, not JSON, malformed): reported, then fallbacks
        return decoding.IndexFacts(url, None, _index_problem(exc))


def _index_problem(exc: BaseException) -> str:
    """``Type: line``: the failure underneath (FileNotFoundError, ClientError, JSONDecodeError, KeyError...)
    and the one line the index reader gave."""
    root = exc
    while root.__context__ is not None:  # each reader raises its one-line error from the one it caught
        root = root.__context__
    return f"{type(root).__name__}: {first_line(exc)}"


def dataset_facts(cfg: Config) -> decoding.IndexFacts | None:
    """The facts of the config's dataset (``data.index``), or None for synthetic data."""
    return index_facts(cfg.data.index) if cfg.data.index else None


@dataclass
class Decoder:
    """The VAE and the factor sampled latents are divided by, with where each came from."""

    vae: torch.nn.Module
    vae_id: str
    vae_from: str
    factor: float
    factor_from: str

    def __call__(self, latents: torch.Tensor) -> np.ndarray:
        return decode(self.vae, latents, self.factor)  # (T, C, h, w) -> (T, H, W, 3) uint8


def load_decoder(
    args: argparse.Namespace,
    cfg: Config,
    device: torch.device,
    recorded: dict | None,
    facts: decoding.IndexFacts | None,
) -> Decoder:
    """The VAE (--vae, else the dataset's) and the scaling factor its input is divided by."""
    vae_id, vae_from = decoding.choose_vae(args.vae, facts, recorded)
    vae, _ = load_autoencoder(vae_id, device, cfg.sample.precision if device.type == "cuda" else "fp32")
    if vae.config.latent_channels != cfg.model.in_channels:
        raise VaeError(
            f"the VAE '{vae_id}' has {vae.config.latent_channels} latent channels, the model "
            f"{cfg.model.in_channels}"
        )
    factor, factor_from = decoding.scaling_factor(cfg, facts, vae.config.scaling_factor, recorded)
    return Decoder(vae, vae_id, vae_from, factor, factor_from)


def check_out_dir(out: Path) -> None:
    """Fail before any model is loaded if ``--out`` could not become a directory of videos (creating
    nothing: a refused run leaves no trace)."""
    existing = out.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        where = "it is a file" if existing == out.absolute() else f"{existing} is a file"
        raise ConfigError(f"--out {out} cannot be a directory of videos: {where}")
    if not os.access(existing, os.W_OK):
        raise ConfigError(f"--out {out} is not writable: {existing} does not allow writing")


def run(args: argparse.Namespace) -> int:
    check_out_dir(Path(args.out))
    ranks = world_from_env()
    device = ranks.device
    say = print if ranks.is_main else (lambda *a, **k: None)
    model, cfg, weights, recorded = load_model(args, device)
    if device.type == "cuda":
        configure_cuda_numerics(cfg.train.tf32, cfg.train.deterministic)
    say(f"weights: {weights}")
    say(attention_line(cfg, device, DTYPES[cfg.sample.precision]))
    facts = dataset_facts(cfg)  # the dataset's index, read once: the T5, null caption, VAE, scaling factor
    conditioning = prompt_conditioning(args, cfg, facts, recorded, device)
    decoder = load_decoder(args, cfg, device, recorded, facts)
    say(
        f"VAE {decoder.vae_id} (from {decoder.vae_from}); scaling factor {decoder.factor:g} from "
        f"{decoder.factor_from}"
    )

    diffusion = build_diffusion(cfg, sampling=True)
    s = cfg.sample
    say(
        f"sampling {s.num_samples} videos of {total_frames(cfg)} frames on {ranks.world_size} rank(s) "
        f"({device}): {sampler_of(cfg)}, steps {cfg.diffusion.sampling_steps}, cfg scale {s.cfg_scale:g}, "
        f"seed {s.seed}"
    )
    try:  # before the process group: a user error ends every rank alike
        check_divides(ranks.world_size, s.sequence_parallel)
    except ValueError as exc:
        raise ConfigError(f"sample.sequence_parallel: {exc}") from None
    start_group(ranks)  # every check has passed on every rank: nothing below is a user error
    # sequence parallelism: each group of P ranks is one sampling rank (its CUDA tensors over NCCL)
    place = data_place(
        ranks.rank, ranks.world_size, s.sequence_parallel, "nccl" if device.type == "cuda" else None
    )
    writes = place.sequence is None or place.sequence.rank == 0  # one rank of a group decodes and writes
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    frames: dict[int, np.ndarray] = {}
    num_batches = len(batches_of(s.num_samples, s.batch_size, place.rank, place.world_size))
    with Progress(
        num_batches * steps_per_batch(cfg, diffusion), ranks.is_main and not args.no_progress, "denoising"
    ) as bar:
        mine = rank_samples(
            model,
            diffusion,
            cfg,
            place.rank,
            place.world_size,
            device,
            bar.update,
            conditioning,
            place.sequence,
        )
        for i, latent in mine:
            if not writes:
                continue
            frames[i] = decoder(latent)  # (T, C, h, w) -> (T, H, W, 3) uint8
            if s.images:
                media.write_png(out / f"sample_{i:04d}.png", frames[i][0])
            else:
                media.write_mp4(out / f"sample_{i:04d}.mp4", frames[i], s.fps)
            if args.save_latents:
                media.write_npy(out / f"sample_{i:04d}.npy", latent.cpu().numpy())
    everything = gather_to_main(frames, ranks)
    end_group()
    if ranks.is_main:
        videos = {i: v for part in everything for i, v in part.items()}
        tiled = media.grid([videos[i] for i in sorted(videos)])
        if s.images:
            media.write_png(out / "grid.png", tiled[0])
        else:
            media.write_mp4(out / "grid.mp4", tiled, s.fps)
            media.write_gif(out / "grid.gif", tiled, s.fps)
        _write_manifest(out, args, cfg, weights, decoder, conditioning)
        t, h, w = next(iter(videos.values())).shape[:3]
        say(
            f"wrote {len(videos)} {'images' if s.images else 'videos'} ({t} frames, {w}x{h}, {s.fps} fps) "
            f"and {'grid.png' if s.images else 'grid.mp4/gif'} to {out} "
            f"in {time.perf_counter() - start:.1f} s"
        )
    return 0


def _write_manifest(
    out: Path, args: argparse.Namespace, cfg: Config, weights: str, decoder: Decoder, conditioning
) -> None:
    """samples.json: what was sampled, from which weights, how; enough to reproduce any one sample."""
    manifest = {
        "weights": weights,
        "config": cfg.to_dict(),
        "config_hash": cfg.hash(),
        "sampler": sampler_of(cfg),
        "vae": decoder.vae_id,
        "scaling_factor": decoder.factor,
        "scaling_factor_from": decoder.factor_from,
        "samples": [
            {
                "index": i,
                **conditioning.describe(cfg.sample, i),
                "video": f"sample_{i:04d}.{'png' if cfg.sample.images else 'mp4'}",
                "latents": f"sample_{i:04d}.npy" if args.save_latents else None,
            }
            for i in range(cfg.sample.num_samples)
        ],
    }
    atomic_write(out / "samples.json", lambda tmp: tmp.write_text(json.dumps(manifest, indent=1)))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except (ConfigError, VaeError) as exc:  # CheckpointError and SourceError are ConfigErrors
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
