"""Which way the square of a toy video moves: a measured check that a model learned the class videos.

``make_class_videos``' class k moves its square along angle 2*pi*k/num_classes in image coordinates (x to the
right, y *down*: ``synthetic_frames`` adds ``sin(angle)`` to the row), so class 1 of 4 moves down and class 3
up. Given decoded frames, ``square_track`` finds the square in each frame and ``motion_angle`` fits the
direction of its track; ``direction_class`` names the nearest class direction (None for a square that does
not move), and ``direction_accuracy`` is the fraction of videos that move in their class's direction:

    from data_pipeline.toy_motion import direction_accuracy, read_frames
    direction_accuracy([read_frames(p) for p in paths], classes, num_classes=4)   # 1.0 on real clips

The square is a uniform patch over a horizontal gradient, so each column's background is its median colour
(the square covers a quarter of the rows at most, the frame marker an eighth); the square is where the frame
is farthest from that background, and its centroid is tracked.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from data_pipeline.toy_videos import MARKER

MIN_SHIFT = 2.0  # pixels the fitted track must move over the clip to count as motion at all


def read_frames(path: str | Path) -> np.ndarray:
    """Every frame of a video file as (T, H, W, 3) uint8."""
    import av

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def uint8_frames(pixels: np.ndarray) -> np.ndarray:
    """(T, 3, S, S) float in [-1, 1] (a clip as ``data_pipeline.video.read_clips`` gives it) -> (T, S, S, 3)
    uint8."""
    return np.clip(np.round((np.asarray(pixels) + 1) * 127.5), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def square_track(frames: np.ndarray) -> np.ndarray:
    """(T, H, W, 3) uint8 frames -> (T, 2) float: the square's centroid (x, y) in pixels in each frame.

    The centroid of the pixels at least half as far from their column's median colour as the farthest one
    (the frame marker's corner left out)."""
    pixels = frames.astype(np.float32)
    background = np.median(pixels, axis=1, keepdims=True)  # (T, 1, W, 3): the gradient is constant per column
    distance = np.abs(pixels - background).sum(-1)  # (T, H, W)
    distance[:, : MARKER + 2, : MARKER + 2] = 0  # the frame-index marker (and its blur), not the square
    peak = distance.reshape(len(frames), -1).max(1)[:, None, None]  # (T, 1, 1)
    weight = np.where(distance >= 0.5 * peak, distance, 0.0)  # (T, H, W)
    total = weight.sum((1, 2)) + 1e-9
    ys, xs = np.arange(frames.shape[1]), np.arange(frames.shape[2])
    cx = (weight.sum(1) * xs).sum(1) / total  # (T, W) column sums -> x
    cy = (weight.sum(2) * ys).sum(1) / total  # (T, H) row sums -> y
    return np.stack([cx, cy], axis=1)


def motion_angle(frames: np.ndarray) -> tuple[float, float]:
    """(angle in radians in [0, 2 pi), shift in pixels over the clip) of the square's motion: the
    least-squares slopes of its centroid's x and y over time (y down, as ``synthetic_frames`` draws)."""
    track = square_track(frames)
    t = np.arange(len(track), dtype=np.float64)
    t -= t.mean()
    slope = (t[:, None] * (track - track.mean(0))).sum(0) / max((t**2).sum(), 1e-9)  # (2,): px per frame
    angle = float(np.arctan2(slope[1], slope[0]) % (2 * np.pi))
    return angle, float(np.hypot(*slope) * (len(track) - 1))


def direction_class(frames: np.ndarray, num_classes: int = 4) -> int | None:
    """The class k whose direction 2*pi*k/num_classes is nearest the square's motion, or None when the
    square moves less than ``MIN_SHIFT`` pixels over the clip (a still video has no direction)."""
    angle, shift = motion_angle(frames)
    if shift < MIN_SHIFT:
        return None
    return int(round(angle / (2 * np.pi / num_classes))) % num_classes


def direction_accuracy(videos: Sequence[np.ndarray], classes: Sequence[int], num_classes: int = 4) -> float:
    """The fraction of ``videos`` (each (T, H, W, 3) uint8) whose square moves in its class's direction."""
    if len(videos) != len(classes) or not videos:
        raise ValueError(f"{len(videos)} videos for {len(classes)} classes")
    hits = [direction_class(v, num_classes) == int(k) for v, k in zip(videos, classes, strict=True)]
    return float(np.mean(hits))
