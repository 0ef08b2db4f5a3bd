"""The videos an evaluation measures: a dataset's real videos, and the fakes of a ``latte.sample`` run.

A ``Video`` is a name, a frame count and a reader of frames by index ((T, H, W, 3) uint8). Encoded videos are
decoded by a ``VideoReader`` the entry point gives (``data_pipeline.video``'s PyAV decoder: this library
never imports the data pipeline); frame folders and ``.npy`` files are read here.

Reals (``--reals DIR``): every video file under DIR (class folders, as UCF-101 is laid out) and every folder
of frame images (Latte's own layout, ``tools/convert_videos_to_frames.py``), sorted by path.

Fakes (``--fakes DIR``), lossless first: the latents ``latte.sample --save-latents`` wrote (``samples.json``
names them, the VAE and the scaling factor; decoded here, exactly as sampling decodes them), folders of PNG
frames, ``.npy`` frames (T, H, W, 3) uint8; else encoded videos such as ``latte.sample``'s mp4s, which are
lossy (h264): their results are marked not comparable to the paper.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from latte.errors import first_line
from latte.evaluation import EvaluationError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
LatentDecoder = Callable[[np.ndarray], np.ndarray]  # latents (T, C, h, w) -> frames (T, H, W, 3) uint8


class VideoReader(Protocol):
    """Decodes encoded video files (the entry point's, over ``data_pipeline.video``)."""

    extensions: tuple[str, ...]

    def count(self, path: str) -> int:
        """Frames in the video; raises ``EvaluationError`` for a file that cannot be read."""
        ...

    def read(self, path: str, indices: list[int]) -> np.ndarray:
        """Frames ``indices`` (T, H, W, 3) uint8; raises ``EvaluationError`` if any is missing."""
        ...


@dataclass(frozen=True)
class Video:
    name: str
    length: int
    read: Callable[[list[int]], np.ndarray]  # frame indices -> (T, H, W, 3) uint8


@dataclass
class VideoSet:
    videos: list[Video]
    source: str  # what the frames were read from, for the result
    lossy: bool = False  # decoded from lossy encodings (fakes as mp4): not comparable to the paper
    unreadable: list[str] = field(default_factory=list)  # "name: reason" of files left out


def _read_images(paths: list[Path], indices: list[int]) -> np.ndarray:
    return np.stack([np.asarray(Image.open(paths[i]).convert("RGB")) for i in indices])


def _read_npy(path: Path, indices: list[int]) -> np.ndarray:
    return np.asarray(np.load(path, mmap_mode="r")[indices])


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def _frame_folder(folder: Path, root: Path) -> Video:
    images = _images_in(folder)
    return Video(str(folder.relative_to(root)), len(images), partial(_read_images, images))


def _encoded(path: Path, root: Path, reader: VideoReader, unreadable: list[str]) -> Video | None:
    try:
        length = reader.count(str(path))
    except EvaluationError as exc:
        unreadable.append(f"{path.relative_to(root)}: {first_line(exc)}")
        return None
    return Video(str(path.relative_to(root)), length, partial(reader.read, str(path)))


def _check_dir(root: Path, what: str) -> None:
    if not root.is_dir():
        raise EvaluationError(f"{what} {root} is not a directory")


def real_videos(root: str | Path, reader: VideoReader) -> VideoSet:
    """Every video file and frame folder under ``root``, sorted by path (unreadable files are left out and
    listed)."""
    root = Path(root)
    _check_dir(root, "--reals")
    videos: list[Video] = []
    unreadable: list[str] = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        here = Path(folder)
        if any(Path(f).suffix.lower() in IMAGE_EXTENSIONS for f in files):
            videos.append(_frame_folder(here, root))
        for name in sorted(files):
            if Path(name).suffix.lower() in reader.extensions:
                video = _encoded(here / name, root, reader, unreadable)
                if video is not None:
                    videos.append(video)
    videos.sort(key=lambda v: v.name)
    if not videos:
        raise EvaluationError(
            f"--reals {root} holds no videos ({', '.join(reader.extensions)}) or folders of frame images"
        )
    return VideoSet(videos, f"videos and frame folders under {root}", unreadable=unreadable)


def _manifest_latents(root: Path) -> tuple[list[Path], dict] | None:
    """The latents a ``latte.sample --save-latents`` run listed in ``root/samples.json``, if all exist."""
    manifest = root / "samples.json"
    if not manifest.is_file():
        return None
    try:
        record = json.loads(manifest.read_text())
        names = [s.get("latents") for s in record["samples"]]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise EvaluationError(f"{manifest} is not a latte.sample manifest ({first_line(exc)})") from None
    if not names or any(not n for n in names) or not all((root / n).is_file() for n in names):
        return None
    return [root / n for n in names], record


def _latent_video(path: Path, root: Path, decode: LatentDecoder) -> Video:
    latents = np.load(path, mmap_mode="r")  # (T, C, h, w), scaled as the model sees them
    return Video(str(path.relative_to(root)), len(latents), lambda idx: decode(np.asarray(latents[idx])))


def fake_videos(
    root: str | Path, reader: VideoReader, latent_decoder: Callable[[dict], LatentDecoder] | None = None
) -> VideoSet:
    """The fake videos in ``root``, from the most faithful form found: latents listed in ``samples.json``
    (decoded by ``latent_decoder(manifest)``), PNG frame folders, ``.npy`` frames, else encoded videos."""
    root = Path(root)
    _check_dir(root, "--fakes")
    listed = _manifest_latents(root) if latent_decoder is not None else None
    if listed is not None:
        paths, record = listed
        decode = latent_decoder(record)
        return VideoSet(
            [_latent_video(p, root, decode) for p in paths], f"latents in {root}, decoded by the VAE"
        )
    folders = sorted(p for p in root.iterdir() if p.is_dir() and _images_in(p))
    if folders:
        return VideoSet([_frame_folder(f, root) for f in folders], f"frame folders in {root}")
    arrays = sorted(p for p in root.glob("*.npy") if p.name != "grid.npy")
    if arrays:
        videos = []
        for p in arrays:
            frames = np.load(p, mmap_mode="r")
            if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
                raise EvaluationError(
                    f"{p} holds {frames.dtype} {tuple(frames.shape)}, not frames (T, H, W, 3) uint8 (latents "
                    "of latte.sample --save-latents are read through its samples.json)"
                )
            videos.append(Video(p.name, len(frames), partial(_read_npy, p)))
        return VideoSet(videos, f".npy frames in {root}")
    unreadable: list[str] = []
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in reader.extensions and p.stem != "grid")
    videos = [v for v in (_encoded(p, root, reader, unreadable) for p in files) if v is not None]
    if unreadable:
        raise EvaluationError(f"fake video {unreadable[0]}")
    if not videos:
        raise EvaluationError(
            f"--fakes {root} holds no latte.sample latents, frame folders, .npy frames or videos"
        )
    return VideoSet(videos, f"encoded videos in {root} (lossy)", lossy=True)
