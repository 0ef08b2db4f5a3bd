"""Writing samples: mp4 (PyAV, h264), GIF (Pillow), a grid of all samples, raw latents. Every file is written
under a temporary name and renamed, so a reader never sees half a file."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from latte.files import atomic_write

CODECS = ("libx264", "mpeg4")  # h264 if this PyAV build has it (the wheels do), else MPEG-4 part 2


def grid(videos: list[np.ndarray], pad: int = 2) -> np.ndarray:
    """Videos (T, H, W, 3) uint8 of one size tiled in a near-square grid with ``pad`` black pixels between
    and around them: (T, rows * (H + pad) + pad, cols * (W + pad) + pad, 3)."""
    t, h, w, _ = videos[0].shape
    cols = math.ceil(math.sqrt(len(videos)))
    rows = math.ceil(len(videos) / cols)
    canvas = np.zeros((t, rows * (h + pad) + pad, cols * (w + pad) + pad, 3), np.uint8)
    for k, video in enumerate(videos):
        r, c = divmod(k, cols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        canvas[:, y : y + h, x : x + w] = video
    return canvas


def _even(frames: np.ndarray) -> np.ndarray:
    """yuv420p needs even sides: repeat the last row / column where one is odd."""
    _, h, w, _ = frames.shape
    return np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")


def write_mp4(path: str | Path, frames: np.ndarray, fps: int) -> Path:
    """Frames (T, H, W, 3) uint8 -> an mp4 at ``fps``; returns the path."""
    import av

    path = Path(path)
    codec = next(c for c in CODECS if c in av.codecs_available)
    frames = _even(frames)

    def write(tmp: Path) -> None:
        with av.open(str(tmp), mode="w", format="mp4") as container:
            stream = container.add_stream(codec, rate=fps)
            stream.height, stream.width = frames.shape[1:3]
            stream.pix_fmt = "yuv420p"
            if codec == "libx264":
                stream.options = {"crf": "17", "preset": "medium"}
            for image in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
            container.mux(stream.encode())  # flush the encoder's delayed frames

    atomic_write(path, write)
    return path


def write_gif(path: str | Path, frames: np.ndarray, fps: int) -> Path:
    """Frames (T, H, W, 3) uint8 -> a looping GIF at ``fps`` (GIF delays are in 10 ms units)."""
    from PIL import Image

    path = Path(path)
    images = [Image.fromarray(frame) for frame in frames]
    duration = max(20, round(1000 / fps / 10) * 10)

    def write(tmp: Path) -> None:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=duration, loop=0)

    atomic_write(path, write)
    return path


def write_png(path: str | Path, image: np.ndarray) -> Path:
    """An image (H, W, 3) uint8 -> a PNG (text-to-image samples)."""
    from PIL import Image

    path = Path(path)
    atomic_write(path, lambda tmp: Image.fromarray(image).save(tmp, format="PNG"))
    return path


def write_npy(path: str | Path, array: np.ndarray) -> Path:
    path = Path(path)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to the temporary name
            np.save(f, array)

    atomic_write(path, write)
    return path
