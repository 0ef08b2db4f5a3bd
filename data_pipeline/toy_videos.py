"""Small real inputs made on the spot: encoded videos (PyAV, no ffmpeg CLI) and a tiny random VAE.

Used by the demo (no dataset or VAE weights exist offline), the data-pipeline tests and the sharding
benchmark:

    from data_pipeline.toy_videos import make_class_videos, make_tiny_vae, make_video
    make_video("clips/a/v0.mp4", frames=24, size=(96, 64), fps=24, seed=0)
    make_class_videos("videos", num_classes=4, per_class=6)   # UCF101-style class folders
    vae_dir = make_tiny_vae("tiny_vae")          # AutoencoderKL.from_pretrained(vae_dir) works offline
    manifest = make_captioned_videos("videos")   # + captions.jsonl: "a red square moving up" per video

Each video is a seeded colour gradient with a square moving over it (class folders: the class sets the
direction), and a *frame marker*: an 8x8 grey block in the top-left corner whose level encodes the frame's
index (``frame_marker(i)``), so a test can tell which frame a decoder returned even after lossy compression
(``read_marker``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# container extension -> encoders to try, best first (the av wheel ships libx264, mpeg4 and libvpx-vp9)
_CODECS = {
    ".mp4": ("libx264", "mpeg4"),
    ".mkv": ("libx264", "mpeg4"),
    ".avi": ("mpeg4",),
    ".webm": ("libvpx-vp9", "libvpx"),
}
MARKER = 8  # side of the frame-index marker block, pixels
MARKER_STEP = 10  # grey levels per frame index: index i is drawn at level 8 + 10 * i (i <= 24)


def frame_marker(index: int) -> int:
    """The grey level that marks frame ``index`` (distinct up to index 24)."""
    return 8 + MARKER_STEP * (index % 25)


def read_marker(frame: np.ndarray) -> int:
    """Recover the frame index from a decoded (H, W, 3) uint8 frame's marker block."""
    level = float(frame[1 : MARKER - 1, 1 : MARKER - 1].mean())  # the block's inside, away from blur
    return int(round((level - 8) / MARKER_STEP))


def synthetic_frames(
    frames: int, size: tuple[int, int], seed: int = 0, motion: str = "linear", angle: float | None = None
) -> np.ndarray:
    """(frames, h, w, 3) uint8: a seeded gradient background, a moving square, a frame-index marker.

    ``motion``: ``"linear"`` (the square crosses the frame once, left to right, or along ``angle`` radians
    through the centre when given) or ``"static"`` (it stays put).
    """
    width, height = size
    rng = np.random.default_rng(seed)
    low, high = rng.integers(30, 120, 3), rng.integers(140, 230, 3)  # background colours, per channel
    ramp = np.linspace(0.0, 1.0, width)[None, :, None]  # (1, w, 1): horizontal gradient
    background = (low + (high - low) * ramp).astype(np.uint8).repeat(height, axis=0)  # (h, w, 3)
    side = max(4, min(width, height) // 4)
    colour = rng.integers(0, 256, 3, dtype=np.uint8)
    y0 = int(rng.integers(MARKER, max(MARKER + 1, height - side)))
    out = np.empty((frames, height, width, 3), np.uint8)
    for i in range(frames):
        frame = background.copy()
        progress = i / max(1, frames - 1)  # 0 -> 1 over the clip
        x0 = 0 if motion == "static" else int(round(progress * (width - side)))
        if motion == "linear" and angle is not None:  # along a direction through the centre
            x0 = int(round((width - side) * (0.5 + 0.5 * np.cos(angle) * (2 * progress - 1))))
            y0 = int(round((height - side) * (0.5 + 0.5 * np.sin(angle) * (2 * progress - 1))))
        frame[y0 : y0 + side, x0 : x0 + side] = colour
        frame[:MARKER, :MARKER] = frame_marker(i)
        out[i] = frame
    return out


def make_video(
    path: str | Path,
    frames: int,
    size: tuple[int, int] = (64, 64),
    fps: int = 24,
    seed: int = 0,
    motion: str = "linear",
    codec: str | None = None,
    angle: float | None = None,
) -> Path:
    """Encode ``synthetic_frames(...)`` into ``path`` (container from the extension: mp4, mkv, avi, webm).

    ``size`` is (width, height), both even (yuv420p). Quality is near-lossless (crf 10 for x264) so the
    frame marker survives. Returns the path.
    """
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    candidates = (codec,) if codec else _CODECS[path.suffix.lower()]
    name = next((c for c in candidates if c in av.codecs_available), None)
    if name is None:
        raise RuntimeError(f"none of the encoders {candidates} is in this PyAV build")
    pixels = synthetic_frames(frames, size, seed, motion, angle)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(name, rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        if name == "libx264":
            stream.options = {"crf": "10", "preset": "ultrafast"}
        else:
            stream.bit_rate = 4_000_000
        for image in pixels:
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():  # flush the encoder's delayed frames
            container.mux(packet)
    return path


def make_corrupt_video(path: str | Path, seed: int = 0, size: int = 4096) -> Path:
    """A file with a video extension holding random bytes (no container can parse it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes())
    return path


def make_class_videos(
    root: str | Path, num_classes: int = 4, per_class: int = 6, frames: int = 24, size: int = 64, fps: int = 8
) -> list[Path]:
    """UCF101-style ``root/class_k/vNN.mp4``: in class k the square moves along direction 2*pi*k/num_classes,
    so the class sets the motion. Existing files are kept (a rerun is instant)."""
    paths = []
    for k in range(num_classes):
        for v in range(per_class):
            path = Path(root) / f"class_{k}" / f"v{v:02d}.mp4"
            if not path.exists():
                angle = 2 * np.pi * k / num_classes
                make_video(path, frames, (size, size), fps, seed=1000 * k + v, angle=angle)
            paths.append(path)
    return paths


def make_tiny_vae(directory: str | Path, seed: int = 0, downsample: int = 2):
    """Save a tiny random-weight ``AutoencoderKL`` to ``directory`` and return the directory.

    ``downsample`` 2 (blocks of 32 and 64 channels) or 8 (four blocks, like the SD VAE's factor); 4 latent
    channels. Its config's scaling_factor is diffusers' default, 0.18215. No real VAE weights exist offline;
    the factor-2 one encodes (2, 3, 64, 64) in a few ms."""
    import torch

    blocks = {2: (32, 64), 8: (32, 32, 64, 64)}
    if downsample not in blocks:
        raise ValueError(f"tiny VAE downsample must be one of {sorted(blocks)}, got {downsample}")
    directory = Path(directory)
    torch.manual_seed(seed)
    tiny_vae(blocks[downsample]).save_pretrained(directory)
    return directory


def tiny_vae(channels: tuple[int, ...], norm_groups: int = 32, sample_size: int = 64):
    """A freshly initialised small ``AutoencoderKL``: one block per entry of ``channels`` (downsampling
    2 ** (len - 1)), one layer per block, 4 latent channels (the SD VAE's layout at toy width)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=channels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=norm_groups,
        sample_size=sample_size,
    )


# captions of the class videos (the text-to-video demo): what each clip shows, e.g. "a red square moving left"
COLOUR_NAMES = {
    "black": (0, 0, 0),
    "grey": (128, 128, 128),
    "white": (255, 255, 255),
    "red": (220, 30, 30),
    "orange": (240, 140, 20),
    "yellow": (230, 220, 40),
    "green": (40, 180, 50),
    "cyan": (40, 210, 220),
    "blue": (30, 60, 220),
    "purple": (130, 40, 180),
    "pink": (240, 120, 190),
}


def square_colour(seed: int) -> tuple[int, int, int]:
    """The RGB colour of the square ``synthetic_frames(..., seed=seed)`` draws (the same draws, in order)."""
    rng = np.random.default_rng(seed)
    rng.integers(30, 120, 3), rng.integers(140, 230, 3)  # the background's colours
    return tuple(int(c) for c in rng.integers(0, 256, 3, dtype=np.uint8))


def colour_name(rgb: tuple[int, int, int]) -> str:
    """The nearest of ``COLOUR_NAMES`` to ``rgb``."""
    return min(
        COLOUR_NAMES, key=lambda name: sum((a - b) ** 2 for a, b in zip(rgb, COLOUR_NAMES[name], strict=True))
    )


def direction_name(angle: float) -> str:
    """Where a square moving along ``angle`` radians goes on screen (y points down): "right", "up", ... or
    "up and left" between them."""
    dx, dy = np.cos(angle), np.sin(angle)
    vertical = "down" if dy > 0.38 else "up" if dy < -0.38 else ""
    horizontal = "right" if dx > 0.38 else "left" if dx < -0.38 else ""
    return " and ".join(part for part in (vertical, horizontal) if part)


def class_video_caption(k: int, v: int, num_classes: int = 4) -> str:
    """What video ``v`` of class ``k`` of ``make_class_videos`` shows, e.g. "a red square moving left"."""
    colour = colour_name(square_colour(1000 * k + v))
    article = "an" if colour[0] in "aeiou" else "a"
    return f"{article} {colour} square moving {direction_name(2 * np.pi * k / num_classes)}"


def make_captioned_videos(
    root: str | Path, num_classes: int = 4, per_class: int = 6, frames: int = 24, size: int = 64, fps: int = 8
) -> Path:
    """``make_class_videos(...)`` plus ``root/captions.jsonl``, the sharding job's manifest: one
    ``{"path": "class_k/vNN.mp4", "caption": "a red square moving left"}`` per video (paths relative to
    ``root``). Returns the manifest's path."""
    import json

    root = Path(root)
    make_class_videos(root, num_classes, per_class, frames, size, fps)
    lines = [
        json.dumps({"path": f"class_{k}/v{v:02d}.mp4", "caption": class_video_caption(k, v, num_classes)})
        for k in range(num_classes)
        for v in range(per_class)
    ]
    manifest = root / "captions.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest
