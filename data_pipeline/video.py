"""Videos for the sharding job: finding them, decoding clip windows with PyAV, resize + crop to [-1, 1], and
a DataLoader that does it in worker processes.

Inputs (``list_inputs``): a directory or S3 prefix (class = sorted first-level folder, as UCF101 is laid
out) or a ``.csv``/``.jsonl`` manifest of ``path[,label]``; sorted by path, numbered by position.
Manifests may give captions (for the text encoder of the sharding job):

    CSV, with a header naming the columns: ``path,caption`` or ``path,label,caption`` (quoted as CSV quotes:
        "a dog, running"): one caption per video, for each of its clips. (Without a header the second
        column is the label, as before.)
    JSONL: ``{"path": ..., "caption": "..."}`` (one per video), or ``{"path": ..., "captions": [...]}``, one
        caption per clip window: entry k describes window k of the ``clips_per_video`` windows spread
        evenly over the video (``window_slots``; a short video with room for fewer distinct windows keeps
        the captions of the slots its windows take). "label" may be given beside either.

A *window* is ``num_frames`` frames taken every ``frame_interval`` frames (the reference's temporal window of
num_frames x interval): frames ``start, start + I, ..., start + (F - 1) * I``, spanning ``(F - 1) * I + 1``
frames. ``clips_per_video`` windows are spread evenly from the first frame to the last (distinct starts
only, so a video with room for fewer windows gives fewer clips). A video too short for one window at the
requested interval is sampled with the largest interval that fits, and the interval used is recorded.
A video with fewer than ``num_frames`` frames is a failed input (``VideoError``): padding would teach the
model frozen or repeated frames that no real clip has.

Decoding is sequential and stops after the last frame any window needs; only the needed frames are
converted to RGB. With windows spread over the whole video nearly every packet must be decoded anyway, so
seeking would save little, and frame-accurate seeking by timestamp is unreliable across containers.
"""

from __future__ import annotations

import csv
import io
import json
import os
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from data_pipeline import storage
from latte.errors import first_line

VIDEO_EXTENSIONS = (".mp4", ".avi", ".webm", ".mkv")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")  # the sharding job's image mode (``--images``)


class InputError(ValueError):
    """Inputs that cannot be listed (missing directory, unreadable or malformed manifest); one line."""


class VideoError(ValueError):
    """A video that cannot give a clip; the message is a one-line reason (it goes into the index)."""


# ---------------------------------------------------------------------------------------------------------
# finding the videos: a directory with class folders, or a manifest
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VideoInput:
    position: int  # index in the path-sorted input list: the stable name of the video
    path: str
    label: int | None
    # from the manifest: one caption (for every clip) or one per clip window; None = none given
    captions: tuple[str, ...] | None = None


Row = tuple[str, str | None, tuple[str, ...] | None]  # (path, label, captions) of a manifest line


def _jsonl_row(item: dict) -> Row:
    label, caption, captions = item.get("label"), item.get("caption"), item.get("captions")
    if caption is not None and captions is not None:
        raise ValueError("both caption and captions")
    if caption is not None:
        captions = [caption]
    if captions is not None and not all(isinstance(c, str) for c in captions):
        raise TypeError("captions must be strings")
    return (
        str(item["path"]),
        None if label is None else str(label),
        None if captions is None else tuple(captions),
    )


def _cell(row: list[str], at: int | None) -> str | None:
    """Column ``at`` of a CSV row, stripped; None where it is empty or absent."""
    return (row[at].strip() or None) if at is not None and len(row) > at else None


def _manifest_rows(src: str) -> list[Row]:
    """(path, label or None, captions or None) rows of a CSV (``path[,label]``, or named columns after a
    header) or JSONL manifest."""
    try:
        text = storage.read_bytes(src).decode("utf-8")
    except (storage.StorageError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read the manifest '{src}': {first_line(exc)}") from None
    rows: list[Row] = []
    if src.lower().endswith(".jsonl"):
        for number, line in enumerate(text.splitlines(), 1):
            try:
                if line.strip():
                    rows.append(_jsonl_row(json.loads(line)))
            except (ValueError, KeyError, TypeError, AttributeError):
                raise InputError(
                    f'manifest \'{src}\' line {number}: expected {{"path": ..., "label": ..., '
                    f'"caption": "..." or "captions": ["...", ...]}}'
                ) from None
        return rows
    label_at, caption_at = 1, None  # columns; a header naming a caption column names them all
    for row in csv.reader(io.StringIO(text)):
        if not row or not row[0].strip() or row[0].startswith("#"):
            continue
        if not rows and row[0].strip().lower() == "path":  # a header
            names = [name.strip().lower() for name in row]
            if "caption" in names:
                label_at = names.index("label") if "label" in names else None
                caption_at = names.index("caption")
            continue
        caption = _cell(row, caption_at)
        rows.append((row[0].strip(), _cell(row, label_at), None if caption is None else (caption,)))
    return rows


def _numbered(
    rows: list[Row], src: str, integer_labels: bool, extensions: tuple[str, ...] = VIDEO_EXTENSIONS
) -> tuple[list[VideoInput], list[str]]:
    """Sort rows by path and number the classes: labels must be given for all rows or none. With
    ``integer_labels`` (manifests) labels that are all integers are used as they are; otherwise (and for
    folder names) class k is the k-th name in sorted order."""
    rows = sorted(rows, key=lambda r: r[0])
    twice = next((a[0] for a, b in zip(rows, rows[1:], strict=False) if a[0] == b[0]), None)
    if twice is not None:
        raise InputError(f"'{src}' lists '{twice}' more than once")
    labelled = {label is not None for _, label, _ in rows}
    if labelled == {True, False}:
        raise InputError(f"'{src}': some videos have a label (class folder, manifest column) and some do not")
    if not rows:
        what = "images" if extensions == IMAGE_EXTENSIONS else "videos"
        raise InputError(f"no {what} ({', '.join(extensions)}) found in '{src}'")
    if labelled == {False}:
        return [VideoInput(i, path, None, captions) for i, (path, _, captions) in enumerate(rows)], []
    names = sorted({str(label) for _, label, _ in rows})
    if integer_labels and all(re.fullmatch(r"\d+", name) for name in names):
        classes = [str(k) for k in range(max(int(n) for n in names) + 1)]
        number = {name: int(name) for name in names}
    else:
        classes, number = names, {name: k for k, name in enumerate(names)}
    inputs = [
        VideoInput(i, path, number[str(label)], captions) for i, (path, label, captions) in enumerate(rows)
    ]
    return inputs, classes


def list_inputs(
    src: str, extensions: tuple[str, ...] = VIDEO_EXTENSIONS
) -> tuple[list[VideoInput], list[str]]:
    """The videos of ``src`` sorted by path, and the class names by label ([] = unconditional); with
    ``extensions`` = ``IMAGE_EXTENSIONS``, the images of a directory (the sharding job's image mode).

    ``src``: a directory or S3 prefix (class = sorted first-level folder; no folders = unconditional), or a
    ``.csv`` / ``.jsonl`` manifest of ``path[,label]`` (relative paths resolve against its folder; labels
    that are all integers are used as they are, names are numbered in sorted order). Listed paths that do
    not exist are not checked here: they fail one by one, as inputs, when decoded.
    """
    if src.lower().endswith((".csv", ".jsonl")):
        base = posixpath.dirname(src) if storage.is_s3(src) else str(Path(src).parent)
        rows = [
            (p if storage.is_s3(p) or os.path.isabs(p) else storage.join(base, p), label, captions)
            for p, label, captions in _manifest_rows(src)
        ]
        return _numbered(rows, src, integer_labels=True, extensions=extensions)
    if not storage.is_s3(src) and not Path(src).is_dir():
        raise InputError(f"input '{src}' is not a directory or a .csv/.jsonl manifest")
    try:
        files = storage.list_files(src)
    except storage.StorageError as exc:
        raise InputError(str(exc)) from None
    root = src.rstrip("/") + "/"
    rows = []
    for path in files:
        relative = path[len(root) :] if storage.is_s3(src) else Path(path).relative_to(src).as_posix()
        if path.lower().endswith(extensions) and not posixpath.basename(path).startswith("."):
            rows.append((path, relative.split("/", 1)[0] if "/" in relative else None, None))
    return _numbered(rows, src, integer_labels=False, extensions=extensions)


# ---------------------------------------------------------------------------------------------------------
# decoding clips
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClipSpec:
    """How clips are cut from a video."""

    num_frames: int = 16
    frame_interval: int = 3
    clips_per_video: int = 1
    image_size: int = 256
    images: bool = False  # the inputs are still images: one one-frame clip each (``read_image``)


@dataclass
class VideoClips:
    """The clips of one video: pixels and what is needed to say where they came from."""

    pixels: torch.Tensor  # (K, F, 3, S, S) float32 in [-1, 1]
    frame_indices: list[list[int]]  # per clip, the source frame of each of its F frames
    frame_interval: int  # the interval used: the requested one unless the video is short
    fps: float
    original_size: tuple[int, int]  # (width, height) of the decoded frames
    total_frames: int


def plan_windows(total_frames: int, spec: ClipSpec) -> tuple[int, list[list[int]]]:
    """(interval used, frame indices of each window) for a video of ``total_frames`` frames.

    Raises ``VideoError`` if the video has fewer than ``spec.num_frames`` frames.
    """
    frames = spec.num_frames
    if total_frames < frames:
        raise VideoError(f"video has {total_frames} frames, fewer than num_frames={frames}")
    interval, spread = _spread_starts(total_frames, spec)
    windows = [[int(s) + j * interval for j in range(frames)] for s in np.unique(spread)]
    return interval, windows


def _spread_starts(total_frames: int, spec: ClipSpec) -> tuple[int, np.ndarray]:
    """(interval used, the ``clips_per_video`` evenly spread window starts, repeats included)."""
    frames, interval = spec.num_frames, spec.frame_interval
    if frames > 1:  # the largest interval I <= requested with (F - 1) * I + 1 <= total
        interval = min(interval, (total_frames - 1) // (frames - 1))
    span = (frames - 1) * interval + 1
    return interval, np.round(np.linspace(0, total_frames - span, spec.clips_per_video)).astype(int)


def window_slots(total_frames: int, spec: ClipSpec) -> list[int]:
    """For each window ``plan_windows`` gives, the first of the ``clips_per_video`` evenly spread slots that
    fell on its start: window j takes per-window caption ``window_slots(...)[j]`` (all slots, 0..K-1, unless
    the video is too short for K distinct windows)."""
    _, spread = _spread_starts(total_frames, spec)
    return [int(i) for i in np.unique(spread, return_index=True)[1]]


def resize_center_crop(frames: torch.Tensor, size: int) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, size, size) float32 in [-1, 1]: the shorter side resized to ``size``
    (bilinear, antialiased), then the center ``size`` x ``size`` crop, as the reference's UCF transforms."""
    x = frames.permute(0, 3, 1, 2).float()  # (N, H, W, 3) -> (N, 3, H, W)
    height, width = x.shape[-2:]
    scale = size / min(height, width)
    new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
    if (new_h, new_w) != (height, width):
        x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    x = x[:, :, top : top + size, left : left + size]  # (N, 3, size, size)
    return (x / 127.5 - 1.0).clamp_(-1.0, 1.0)


def _open(source: str | bytes):
    """An open PyAV container over a local path or bytes; empty or missing files give ``VideoError``."""
    import av

    if isinstance(source, bytes):
        if not source:
            raise VideoError("empty file (0 bytes)")
        return av.open(io.BytesIO(source))
    if not os.path.isfile(source):
        raise VideoError("no such file")
    if os.path.getsize(source) == 0:
        raise VideoError("empty file (0 bytes)")
    return av.open(source)


def _count_frames(source: str | bytes) -> int:
    """Frames in the first video stream: the header's count, else one per demuxed packet (webm/mkv)."""
    with _open(source) as container:
        stream = _video_stream(container)
        if stream.frames > 0:
            return int(stream.frames)
        return sum(1 for packet in container.demux(stream) if packet.size)


def count_frames(source: str | bytes) -> int:
    """Frames in the first video stream of a local path or bytes (``VideoError`` for an unreadable file)."""
    import av

    try:
        return _count_frames(source)
    except (av.error.FFmpegError, OSError) as exc:
        raise VideoError(f"{type(exc).__name__}: {first_line(exc)}") from None


def _video_stream(container):
    if not container.streams.video:
        raise VideoError("no video stream")
    return container.streams.video[0]


def decode_frames(
    source: str | bytes, wanted: set[int], threads: int = 1
) -> tuple[dict[int, np.ndarray], int, float]:
    """Decode frames up to the last of ``wanted``, converting only those to RGB.

    Returns (wanted index -> (H, W, 3) uint8 frame, number of frames decoded, fps).
    """
    last = max(wanted)
    out: dict[int, np.ndarray] = {}
    decoded = 0
    with _open(source) as container:
        stream = _video_stream(container)
        stream.codec_context.thread_count = threads
        rate = stream.average_rate or stream.guessed_rate
        for frame in container.decode(stream):
            if decoded in wanted:
                out[decoded] = frame.to_ndarray(format="rgb24")
            decoded += 1
            if decoded > last:
                break
    return out, decoded, float(rate) if rate else 0.0


def read_clips(source: str, spec: ClipSpec, threads: int = 1) -> VideoClips:
    """Decode the clips of one video (a local path or an ``s3://`` url) as ``VideoClips``.

    Raises ``VideoError`` (with a one-line reason) for anything that makes the video unusable.
    """
    import av

    try:
        data: str | bytes = storage.read_bytes(source) if storage.is_s3(source) else source
        total = _count_frames(data)
        interval, windows = plan_windows(total, spec)
        wanted = {i for w in windows for i in w}
        frames, decoded, fps = decode_frames(data, wanted, threads)
        if len(frames) < len(wanted):  # the header overstated the length: replan on the frames that exist
            total = decoded
            interval, windows = plan_windows(total, spec)
            frames, decoded, fps = decode_frames(data, {i for w in windows for i in w}, threads)
    except (av.error.FFmpegError, storage.StorageError, OSError) as exc:
        raise VideoError(f"{type(exc).__name__}: {first_line(exc)}") from None
    height, width = next(iter(frames.values())).shape[:2]
    if any(f.shape[:2] != (height, width) for f in frames.values()):
        raise VideoError("the frame size changes within the video")
    stacked = torch.from_numpy(np.stack([frames[i] for w in windows for i in w]))  # (K*F, H, W, 3) uint8
    pixels = resize_center_crop(stacked, spec.image_size)  # (K*F, 3, S, S)
    pixels = pixels.reshape(len(windows), spec.num_frames, *pixels.shape[1:])  # -> (K, F, 3, S, S)
    return VideoClips(pixels, windows, interval, fps, (width, height), total)


def read_image(source: str, spec: ClipSpec) -> VideoClips:
    """One still image (a local path or an ``s3://`` url; PIL reads it) as a one-frame clip: pixels
    (1, 1, 3, S, S), resized and centre-cropped as video frames are. ``VideoError`` for an unreadable one."""
    from PIL import Image, UnidentifiedImageError

    try:
        data = storage.read_bytes(source) if storage.is_s3(source) else Path(source).read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            rgb = np.asarray(image.convert("RGB"))  # (H, W, 3) uint8
    except (UnidentifiedImageError, storage.StorageError, OSError, ValueError) as exc:
        raise VideoError(f"{type(exc).__name__}: {first_line(exc)}") from None
    height, width = rgb.shape[:2]
    pixels = resize_center_crop(torch.from_numpy(rgb.copy())[None], spec.image_size)  # (1, 3, S, S)
    return VideoClips(pixels[None], [[0]], 1, 0.0, (width, height), 1)  # (1 clip, 1 frame, 3, S, S)


# ---------------------------------------------------------------------------------------------------------
# decoding in DataLoader workers, overlapped with whatever the main process does
# ---------------------------------------------------------------------------------------------------------


class ClipDataset(torch.utils.data.Dataset):
    """Video ``i`` -> {"input": VideoInput, "clips": VideoClips | None, "error": one-line reason | None}.

    Never raises for a bad video: the job records the reason and goes on.
    """

    def __init__(self, videos: list[VideoInput], spec: ClipSpec, decode_threads: int = 1) -> None:
        self.videos, self.spec, self.decode_threads = videos, spec, decode_threads

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, i: int) -> dict:
        video, clips, error = self.videos[i], None, None
        try:
            if self.spec.images:
                clips = read_image(video.path, self.spec)
            else:
                clips = read_clips(video.path, self.spec, self.decode_threads)
        except VideoError as exc:
            error = str(exc)
        except Exception as exc:  # a decoder surprise in one video must never stop the job
            error = f"{type(exc).__name__}: {first_line(exc)}"
        return {"input": video, "clips": clips, "error": error}


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # workers run side by side; the main process's threads encode


def clip_loader(
    videos: list[VideoInput], spec: ClipSpec, workers: int, decode_threads: int = 1, prefetch: int = 2
) -> torch.utils.data.DataLoader:
    """Decoded clips of ``videos``, in order, from ``workers`` processes (0: decoded inline)."""
    return torch.utils.data.DataLoader(
        ClipDataset(videos, spec, decode_threads),
        batch_size=None,  # one video per item, no collation
        shuffle=False,
        num_workers=workers,
        worker_init_fn=_worker_init,
        prefetch_factor=prefetch if workers else None,
    )
