"""Synthetic latent clips with learnable structure, in the loader's batch format, for tests and the demo.

Each class is a sinusoidal grating drifting with its own velocity and orientation, so a model can learn it
and the diffusion loss visibly falls; samples differ by phase and a little noise. With ``caption_channels``
D > 0 each clip also has a "caption" of ``CAPTION_TOKENS`` slots as the loader pads them: its first k
(1..CAPTION_TOKENS, drawn per clip) tokens are its class's fixed random embedding plus a little noise (so
the caption tells the motion, as a real one would), the rest zeros and masked out.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

from data_pipeline.latent_sample import CAPTION_FIELD, carried_fields
from latte.seeding import mix_seed

CAPTION_TOKENS = 8  # the padded caption length of synthetic clips
_CAPTION_TABLE_SEED = 20240515  # the classes' caption embeddings: the same in every stream


def synthetic_keys(num_classes: int, caption_channels: int = 0) -> tuple[str, ...]:
    """The batch keys of synthetic clips: the fields (``latent_sample.FIELDS``) a dataset with
    ``num_classes`` classes (and captions of width ``caption_channels``) carries ("latent", "y" when
    labelled, "encoder_hidden_states" and "encoder_attention_mask" when captioned)."""
    fields = carried_fields({"classes": num_classes, CAPTION_FIELD.fact: caption_channels > 0})
    return tuple(k for f in fields for k in f.keys)


def synthetic_captions(
    generator: torch.Generator, y: torch.Tensor, classes: int, channels: int
) -> dict[str, torch.Tensor]:
    """``encoder_hidden_states`` (B, CAPTION_TOKENS, D) float32 and ``encoder_attention_mask`` (B,
    CAPTION_TOKENS) bool (first k True) for clips of classes ``y`` (see the module docstring)."""
    table_gen = torch.Generator().manual_seed(_CAPTION_TABLE_SEED)
    table = torch.randn((classes, CAPTION_TOKENS, channels), generator=table_gen)  # (classes, L, D)
    hidden = table[y] + 0.1 * torch.randn(
        (len(y), CAPTION_TOKENS, channels), generator=generator
    )  # (B, L, D)
    lengths = torch.randint(1, CAPTION_TOKENS + 1, (len(y),), generator=generator)  # (B,) real tokens
    mask = torch.arange(CAPTION_TOKENS)[None] < lengths[:, None]  # (B, L) True = real token
    return {"encoder_hidden_states": hidden * mask[..., None], "encoder_attention_mask": mask}


def synthetic_clip_batch(
    generator: torch.Generator,
    batch_size: int,
    num_classes: int,
    num_frames: int,
    channels: int,
    size: int,
    caption_channels: int = 0,
) -> dict[str, torch.Tensor]:
    """One batch: ``latent`` (B, F, C, size, size) float32 of unit-ish scale, ``y`` (B,) int64 labels when
    ``num_classes``, captions of width ``caption_channels`` when > 0 (the keys of ``synthetic_keys``)."""
    classes = max(num_classes, 1)
    y = torch.randint(0, classes, (batch_size,), generator=generator)  # (B,)
    angle = y.float() * math.pi / classes  # orientation per class
    speed = 0.5 + y.float() * 0.5  # pixels per frame, per class
    phase = torch.rand(batch_size, generator=generator) * 2 * math.pi  # (B,)
    coords = torch.arange(size, dtype=torch.float32)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")  # each (S, S)
    frames = torch.arange(num_frames, dtype=torch.float32)  # (F,)
    along = xx * torch.cos(angle)[:, None, None] + yy * torch.sin(angle)[:, None, None]  # (B, S, S)
    shift = speed[:, None] * frames[None]  # (B, F)
    wave = (2 * math.pi / size) * 2 * (along[:, None] - shift[:, :, None, None]) + phase[:, None, None, None]
    channel_phase = torch.arange(channels, dtype=torch.float32) * (math.pi / 2)  # (C,)
    latent = torch.sin(wave[:, :, None] + channel_phase[None, None, :, None, None])  # (B, F, C, S, S)
    latent = latent + 0.05 * torch.randn(latent.shape, generator=generator)
    made = {"latent": latent, "y": y}
    if caption_channels > 0:  # drawn after the latents: a stream without captions stays as it was
        made.update(synthetic_captions(generator, y, classes, caption_channels))
    return {key: made[key] for key in synthetic_keys(num_classes, caption_channels)}


def synthetic_batches(
    seed: int,
    batch_size: int,
    num_classes: int,
    num_frames: int,
    channels: int,
    size: int,
    rank: int = 0,
    world_size: int = 1,
    accumulation: int = 1,
    start_step: int = 0,
    caption_channels: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """An endless, seeded stream of micro-batches of ``batch_size`` for one data-parallel rank.

    Step s draws one global batch of batch_size x accumulation x world_size clips from a generator seeded by
    (seed, s); micro-batch a of rank r is its slice (a * world_size + r). Every layout of the same global
    batch (ranks x micro-batch x accumulation) therefore sees the same clips in each optimizer step.
    ``start_step``: the stream as it continues from that step (resuming).
    """
    global_size = batch_size * accumulation * world_size
    step = start_step
    while True:
        generator = torch.Generator().manual_seed(mix_seed(seed, step))
        batch = synthetic_clip_batch(
            generator, global_size, num_classes, num_frames, channels, size, caption_channels
        )
        for a in range(accumulation):
            start = (a * world_size + rank) * batch_size
            yield {k: v[start : start + batch_size] for k, v in batch.items()}
        step += 1


STATE_FORMAT = "latte-synthetic-v1"


class SyntheticStream:
    """``synthetic_batches`` with the loader's resumable interface: iterate for micro-batches;
    ``state_dict()`` is the position (optimizer step and micro-batch within it), the same on every rank, so
    a resumed stream continues exactly, under any rank layout when saved at a step boundary."""

    facts = None  # no dataset index behind it (a ``BatchSource``: see ``data_pipeline.sources``)

    def __init__(
        self,
        seed: int,
        batch_size: int,
        num_classes: int,
        num_frames: int,
        channels: int,
        size: int,
        rank: int = 0,
        world_size: int = 1,
        accumulation: int = 1,
        caption_channels: int = 0,
    ) -> None:
        self.args = (seed, batch_size, num_classes, num_frames, channels, size)
        self.batch_keys = synthetic_keys(num_classes, caption_channels)
        self.caption_channels = caption_channels
        self.layout = {"rank": rank, "world_size": world_size, "accumulation": accumulation}
        self.seed, self.accumulation = seed, accumulation
        self.taken = 0  # micro-batches handed out

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """The stream from the current position on."""
        start_step, skip = divmod(self.taken, self.accumulation)
        stream = synthetic_batches(
            *self.args, **self.layout, start_step=start_step, caption_channels=self.caption_channels
        )
        for _ in range(skip):
            next(stream)
        for batch in stream:
            self.taken += 1  # counted when handed over
            yield batch

    def null_caption(self) -> np.ndarray | None:
        """Captioned clips: a zero one-token embedding stands for the empty prompt; None without captions."""
        return np.zeros((1, self.caption_channels), np.float16) if self.caption_channels else None

    def state_dict(self) -> dict[str, int | str]:
        step, micro = divmod(self.taken, self.accumulation)
        return {"format": STATE_FORMAT, "seed": self.seed, "step": step, "micro": micro}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``; call it before iterating."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            found = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"synthetic stream state has format {found!r}, expected {STATE_FORMAT!r}")
        self.taken = int(state["step"]) * self.accumulation + int(state["micro"])
