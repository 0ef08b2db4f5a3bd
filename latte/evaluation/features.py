"""Videos through the detectors on several ranks, and the ranks' feature moments combined on rank 0.

The videos measured are numbered in one global order and dealt in batches of ``batch_size`` round robin
(``latte.sampling.ranks.batches_of``: batch j on rank j % world size), and each batch is one detector call
(I3D: one clip per video; Inception: a video's frames, 32 at a time as the reference batches them). The
batches are therefore the same for any number of ranks, and so is every feature; a rank adds its features
to float64 moments (``frechet.Moments``), and rank 0 adds the ranks' moments up: 1 rank and N ranks agree
to float64 rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from latte.evaluation.detectors import Detector
from latte.evaluation.frames import center_crop_resize, image_batch, video_batch
from latte.evaluation.frechet import Moments
from latte.evaluation.protocol import Protocol
from latte.evaluation.video_sets import Video
from latte.rendezvous import World
from latte.sampling.ranks import batches_of, gather_to_main

FID_FRAMES_PER_CALL = 32  # the reference's Inception batch at 256 px (NUM_FRAMES_IN_BATCH[256])


@dataclass
class Meter:
    """One metric's detector and moments on this rank. ``add`` a video's measured frames (as read: the crop
    and resize happen here), ``flush`` at the end of each batch (one I3D call per batch of clips)."""

    protocol: Protocol
    detector: Detector
    moments: Moments = field(init=False)
    _clips: list[np.ndarray] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.moments = Moments.empty(self.protocol.feature_dim)

    @property
    def is_video(self) -> bool:
        return self.protocol.num_frames > 1

    def add(self, frames: np.ndarray) -> None:
        if len(frames) == 0:
            return
        pixels = center_crop_resize(frames, self.protocol.resolution)  # (T, S, S, 3) uint8
        if self.is_video:
            self._clips.append(pixels)
            return
        for start in range(0, len(pixels), FID_FRAMES_PER_CALL):
            self.moments.add(self.detector(image_batch(pixels[start : start + FID_FRAMES_PER_CALL])))

    def flush(self) -> None:
        if self._clips:
            self.moments.add(self.detector(video_batch(self._clips)))  # (N, 3, T, S, S)
            self._clips = []


@dataclass(frozen=True)
class Item:
    """A video measured: the frames read of it, and how many of them (a prefix) each meter takes."""

    video: Video
    indices: list[int]
    takes: tuple[int, ...]


def measure(
    items: list[Item], meters: list[Meter], batch_size: int, world: World, on_video: Callable[[], None]
) -> None:
    """This rank's batches of ``items`` through ``meters`` (``on_video`` after each video)."""
    for batch in batches_of(len(items), batch_size, world.rank, world.world_size):
        for i in batch:
            frames = items[i].video.read(items[i].indices)
            for meter, take in zip(meters, items[i].takes, strict=True):
                meter.add(frames[:take])
            on_video()
        for meter in meters:
            meter.flush()


def measure_made(
    batches: Iterable[list[tuple[int, np.ndarray]]], meters: list[Meter], takes: Callable[[int], tuple]
) -> None:
    """Videos made on this rank, batch by batch ((global index, frames (T, H, W, 3) uint8) pairs: the
    batches of ``latte.sampling``), through ``meters``; ``takes(i)``: the frames of video i each meter
    takes."""
    for batch in batches:
        for i, frames in batch:
            for meter, take in zip(meters, takes(i), strict=True):
                meter.add(frames[:take])
        for meter in meters:
            meter.flush()


def combine(meters: list[Meter], world: World) -> list[Moments] | None:
    """Every rank's moments added up, on rank 0 (in rank order); None on the other ranks."""
    parts = gather_to_main([m.moments for m in meters], world)
    if parts is None:
        return None
    total = [Moments.empty(m.protocol.feature_dim) for m in meters]
    for part in parts:
        for acc, moments in zip(total, part, strict=True):
            acc.merge(moments)
    return total


def capped_takes(lengths: list[int], cap: int) -> list[int]:
    """Frames each video gives under a cap on the total, in order (FID's 50,000 fake frames)."""
    out, left = [], cap
    for n in lengths:
        out.append(min(n, left))
        left -= out[-1]
    return out
