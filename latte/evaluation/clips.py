"""Which frames of which videos are measured (StyleGAN-V's ``VideoFramesFolderDataset`` as Latte's FVD uses
it, with its draws seeded).

FVD16: every real video with at least 16 x stride frames (``discard_short_videos``) may be drawn; 2048 of them
are (all when fewer: ``min(len(dataset), max_items)``), one clip each, 16 frames every ``stride`` frames from
a start drawn uniformly in [0, length - 16 x stride + stride - 1]. A fake video gives its first 16 frames.
FID: every frame of every real video; the fake videos' frames, in order, up to 50,000.
"""

from __future__ import annotations

import numpy as np

from latte.evaluation.protocol import Protocol
from latte.seeding import mix_seed


def choose_reals(lengths: list[int], protocol: Protocol) -> list[int]:
    """Positions (in the path-sorted list of real videos) of the reals measured, ascending."""
    usable = [i for i, n in enumerate(lengths) if n >= protocol.real_frames_needed]
    if protocol.num_reals == 0 or len(usable) <= protocol.num_reals:
        return usable
    drawn = np.random.default_rng(protocol.seed).choice(len(usable), protocol.num_reals, replace=False)
    return [usable[i] for i in sorted(drawn)]


def real_frames(length: int, position: int, protocol: Protocol) -> list[int]:
    """The frame indices measured of the real video at ``position`` with ``length`` frames."""
    if protocol.real_clip_start == "every frame":
        return list(range(length))
    stride, count = protocol.real_frame_stride, protocol.num_frames
    last_start = length - count * stride + stride - 1  # the reference's random.randint bounds
    start = int(np.random.default_rng(mix_seed(protocol.seed, position)).integers(0, last_start + 1))
    return [start + j * stride for j in range(count)]


def fake_frames(length: int, protocol: Protocol) -> list[int]:
    """The frame indices measured of a fake video with ``length`` frames: its first ``num_frames`` (FVD16), or
    all of them (FID; the 50,000-frame cap applies across videos)."""
    if protocol.num_frames == 1:
        return list(range(length))
    return list(range(0, protocol.num_frames * protocol.fake_frame_stride, protocol.fake_frame_stride))


def fake_frames_needed(protocol: Protocol) -> int:
    return (protocol.num_frames - 1) * protocol.fake_frame_stride + 1
