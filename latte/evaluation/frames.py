"""Pixels for the detectors: the crop + resize every measured frame gets, and the detector's input layout.

Latte prepares both real and fake frames with ``tools/convert_videos_to_frames.py --target_size 256``:
center crop to the shorter side (torchvision's ``center_crop`` rounding), then a Lanczos resize (PIL) to
256 x 256. It then stores them as JPEGs, which we skip: the frames go to the detector as decoded.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def center_crop_resize(frames: np.ndarray, size: int) -> np.ndarray:
    """Frames (T, H, W, 3) uint8 -> (T, size, size, 3) uint8: the center square, then Lanczos to ``size``."""
    _, height, width, _ = frames.shape
    side = min(height, width)
    top, left = int(round((height - side) / 2.0)), int(round((width - side) / 2.0))
    square = frames[:, top : top + side, left : left + side]
    if side == size:
        return np.ascontiguousarray(square)
    out = [np.asarray(Image.fromarray(f).resize((size, size), Image.LANCZOS)) for f in square]
    return np.stack(out)


def video_batch(clips: list[np.ndarray]) -> torch.Tensor:
    """Clips (T, S, S, 3) uint8 -> the I3D's input (N, 3, T, S, S) uint8."""
    return (
        torch.from_numpy(np.stack(clips)).permute(0, 4, 1, 2, 3).contiguous()
    )  # (N, T, S, S, 3) -> (N, 3, T, S, S)


def image_batch(frames: np.ndarray) -> torch.Tensor:
    """Frames (N, S, S, 3) uint8 -> the Inception's input (N, 3, S, S) uint8."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).contiguous()
