"""Latents from a trained Latte: per-sample noise streams, labels, classifier-free guidance, DDPM/DDIM loops.

Sample i draws all its noise (x_T, every DDPM/DDIM step, every long-video clip) from its own generator,
seeded by (seed, i) alone. A batch is a list of such samples, so sample i's bits depend on the batch it is
computed in (a matmul's rounding depends on its row count) but never on the number of ranks: batches are
fixed by ``sample.batch_size`` and only their placement changes (``latte.sampling.ranks``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import nullcontext

import torch

from latte.conditioning import Condition, Conditioning, conditioning_of
from latte.config import Config, sampler_of
from latte.diffusion import GaussianDiffusion, KnownFrames
from latte.models import Latte
from latte.precision import DTYPES
from latte.sampling.long_video import default_overlap, num_clips, sample_clips, stitch
from latte.sampling.ranks import batches_of
from latte.seeding import mix_seed


def sample_generator(seed: int, index: int, device: torch.device) -> torch.Generator:
    """The noise stream of sample ``index``."""
    return torch.Generator(device=device).manual_seed(mix_seed(seed, index))


def total_frames(cfg: Config) -> int:
    """Frames per sample: one image (``sample.images``), else sample.total_frames or the clip length."""
    if cfg.sample.images:
        return 1
    return cfg.sample.total_frames or cfg.data.num_frames


def clip_frames(cfg: Config) -> int:
    """Frames the model denoises at once: the clip length, or one image (temporal blocks off)."""
    return 1 if cfg.sample.images else cfg.data.num_frames


def overlap_of(cfg: Config) -> int:
    frames = cfg.data.num_frames
    return cfg.sample.overlap if cfg.sample.overlap is not None else default_overlap(frames)


def steps_per_batch(cfg: Config, diffusion: GaussianDiffusion) -> int:
    """Denoising steps one batch takes (all its clips): the progress bar's unit."""
    return diffusion.num_timesteps * num_clips(total_frames(cfg), clip_frames(cfg), overlap_of(cfg))


class Denoiser:
    """The model as the diffusion loops call it, ``fn(x, t) -> (N, F, C_out, H, W)`` in float32.

    Conditioned on ``condition`` (``latte.conditioning``: the model's kwargs, empty = unconditional); with
    ``cfg_scale != 1`` guided through ``model.forward_with_cfg`` on the doubled batch [cond | null], which
    mixes the eps channels only. At scale 1 it is the conditional forward itself (guidance at 1 would only
    add rounding). ``precision`` bf16/fp16 runs the model under autocast; the diffusion arithmetic stays in
    float32.
    """

    def __init__(
        self,
        model: Latte,
        condition: Condition,
        cfg_scale: float = 1.0,
        precision: str = "fp32",
        options: dict | None = None,
    ) -> None:
        if cfg_scale != 1.0 and condition.null is None:
            raise ValueError("classifier-free guidance needs a null condition, which this model has not")
        self.model, self.condition, self.cfg_scale, self.precision = model, condition, cfg_scale, precision
        self.options = options or {}  # other model arguments, e.g. enable_temporal_attentions=False

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        fp32 = self.precision == "fp32"
        cond = self.condition
        with nullcontext() if fp32 else torch.autocast(x.device.type, DTYPES[self.precision]):
            if self.cfg_scale == 1.0:
                out = self.model(x, t, **cond.kwargs, **self.options)
            else:
                doubled = torch.cat([x, x])  # (2N, F, C, H, W): [cond | null]
                kwargs = {k: torch.cat([v, cond.null[k]]) for k, v in cond.kwargs.items()}  # (2N, ...)
                t2 = torch.cat([t, t])  # (2N,)
                if hasattr(self.model, "forward_with_cfg"):  # class-conditional: the original's eps-only rule
                    out = self.model.forward_with_cfg(
                        doubled, t2, cfg_scale=self.cfg_scale, **kwargs, **self.options
                    )
                    out = out[: len(x)]
                else:  # text-to-video: every channel, as LattePipeline mixes them
                    both = self.model(doubled, t2, **kwargs, **self.options)  # (2N, F, C_out, H, W)
                    cond_out, null_out = both.chunk(2)
                    out = null_out + self.cfg_scale * (cond_out - null_out)
        return out.float()


def sample_batch(
    model: Latte,
    diffusion: GaussianDiffusion,
    cfg: Config,
    indices: list[int],
    device: torch.device,
    on_step: Callable[[], None] | None = None,
    conditioning: Conditioning | None = None,
    sequence=None,
) -> list[torch.Tensor]:
    """Latents of samples ``indices``, sampled together: the clips of each (N, F, C, h, w), the first one
    unconditioned, each next one sharing its first ``overlap`` frames with the previous one. Stitch them with
    ``long_video.stitch``. ``on_step`` is called after every denoising step. ``conditioning``: the model's
    (``conditioning_of(cfg.model)`` by default; a text-to-video one carries the encoded prompts).
    ``sequence``: sequence parallelism (every rank of the group runs the same samples, each denoising step
    split over them; ``latte.parallel.sequence``)."""
    s = cfg.sample
    condition = (conditioning or conditioning_of(cfg.model)).for_samples(s, indices, device)
    options = {"enable_temporal_attentions": False} if s.images else {}  # text-to-image: frames apart
    if sequence is not None:
        options["sequence"] = sequence
    denoiser = Denoiser(model, condition, s.cfg_scale, s.precision, options)
    generators = [sample_generator(s.seed, i, device) for i in indices]
    size = cfg.data.latent_size
    shape = (len(indices), clip_frames(cfg), cfg.model.in_channels, size, size)  # (N, F, C, h, w)
    ddim = sampler_of(cfg) == "ddim"

    def run_clip(known: KnownFrames | None) -> torch.Tensor:
        common = dict(clip_denoised=False, device=device, generator=generators, known=known)
        if ddim:
            steps = diffusion.ddim_sample_loop_progressive(denoiser, shape, eta=s.eta, **common)
        else:
            steps = diffusion.p_sample_loop_progressive(denoiser, shape, **common)
        final = None
        for final in steps:  # noqa: B007 - the last step's sample is the clip
            if on_step is not None:
                on_step()
        return final["sample"]

    return sample_clips(run_clip, total_frames(cfg), clip_frames(cfg), overlap_of(cfg))


def rank_samples(
    model: Latte,
    diffusion: GaussianDiffusion,
    cfg: Config,
    rank: int,
    world_size: int,
    device: torch.device,
    on_step: Callable[[], None] | None = None,
    conditioning: Conditioning | None = None,
    sequence=None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """(index, latents (T, C, h, w)) of every sample ``rank`` of ``world_size`` generates, batch by batch
    (with ``sequence``: ``rank``/``world_size`` are the data-parallel place, the group's samples)."""
    for indices in batches_of(cfg.sample.num_samples, cfg.sample.batch_size, rank, world_size):
        latents = sample_latents(model, diffusion, cfg, indices, device, on_step, conditioning, sequence)
        yield from zip(indices, latents, strict=True)


def sample_latents(
    model: Latte,
    diffusion: GaussianDiffusion,
    cfg: Config,
    indices: list[int],
    device: torch.device,
    on_step: Callable[[], None] | None = None,
    conditioning: Conditioning | None = None,
    sequence=None,
) -> torch.Tensor:
    """Latents (N, T, C, h, w) of samples ``indices``, T = ``sample.total_frames`` (or the clip length)."""
    clips = sample_batch(model, diffusion, cfg, indices, device, on_step, conditioning, sequence)
    return stitch(clips, overlap_of(cfg), total_frames(cfg))
