"""Writing one shard: samples of a video in the project's format, into a deterministic WebDataset tar that is
published all at once (local: renamed into place; S3: uploaded whole).

Sample fields: ``__key__`` = ``{input:08d}_c{clip:02d}`` (+ ``_flip``), ``latent.npy`` / ``latent_std.npy``
(F, C, h, w) float16 (posterior mean / std x the VAE scaling factor), ``cls`` (labelled data only),
``caption.npy`` (L, D) float16 (the text encoder's hidden states of the caption's real tokens) and
``caption.txt`` (the caption, UTF-8) (captioned data only), ``json``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_pipeline import storage
from data_pipeline.index import ShardInfo
from data_pipeline.latent_sample import CAPTION, CAPTION_TEXT
from data_pipeline.video import VideoClips, VideoInput
from latte.files import temp_path as local_temp_path


class _HashingFile:
    """A write-only file that hashes and counts what passes through (tarfile's stream mode only writes)."""

    def __init__(self, f) -> None:
        self.f, self.sha, self.bytes = f, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.bytes += len(data)
        return self.f.write(data)


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def temp_path(url: str, tmp_dir: str | None) -> Path:
    """Where shard ``url`` is written before publication. Local output: beside it, under the very name
    ``storage.put_file`` renames from (publication is a rename, not a copy). S3: in ``tmp_dir`` (default the
    system's), named after the output so a rerun can clean up after a killed run of the same task."""
    if not storage.is_s3(url):
        return local_temp_path(url)
    name = posixpath.basename(url)
    tag = hashlib.sha256(posixpath.dirname(url).encode()).hexdigest()[:12]
    return Path(tmp_dir or tempfile.gettempdir(), f".latte-{tag}-{name}.tmp-{os.getpid()}")


class ShardFile:
    """One shard being written: a deterministic tar (fixed mtime, owner, mode) in a temporary file, then
    published all at once with ``storage.put_file`` (local: renamed in place; S3: uploaded whole)."""

    def __init__(self, url: str, tmp_dir: str | None) -> None:
        import webdataset as wds

        self.url, self.samples = url, 0
        self.captions_truncated = (
            0  # captions of its samples cut to the text encoder's length (the caller counts)
        )
        self.tmp = str(temp_path(url, tmp_dir))
        self._file = open(self.tmp, "wb")  # noqa: SIM115 - closed in publish()
        self._hashing = _HashingFile(self._file)
        self._tar = wds.TarWriter(self._hashing, user="latte", group="latte", mtime=0.0, encoder=False)

    def write(self, sample: dict[str, bytes | str]) -> None:
        self._tar.write(sample)
        self.samples += 1

    def publish(self, task: int) -> ShardInfo:
        self._tar.close()
        self._file.close()
        try:
            storage.put_file(self.tmp, self.url)
        finally:
            if os.path.exists(self.tmp):
                os.remove(self.tmp)
        digest = self._hashing.sha.hexdigest()
        name, size = posixpath.basename(self.url), self._hashing.bytes
        return ShardInfo(name, self.samples, size, digest, task, self.captions_truncated)


@dataclass(frozen=True)
class Caption:
    """The caption of one clip: its text, its (L, D) float16 embedding, and whether it was cut to L."""

    text: str
    embedding: np.ndarray
    truncated: bool = False


def caption_members(caption: Caption) -> dict[str, bytes]:
    """The tar members of a sample's caption."""
    return {CAPTION: npy_bytes(caption.embedding.astype(np.float16)), CAPTION_TEXT: caption.text.encode()}


def clip_samples(
    video: VideoInput,
    clips: VideoClips,
    mean: np.ndarray,
    std: np.ndarray,
    flip: bool,
    captions: list[Caption] | None = None,
) -> list[dict[str, bytes | str]]:
    """The samples of one video, from ``mean``/``std`` (K', F, C, h, w) as ``LatentEncoder.encode_clips``
    returns them (with ``flip``, each mirrored clip right after its original); ``captions``: one per clip
    (a mirrored clip has its original's)."""
    samples = []
    for s in range(mean.shape[0]):
        clip, flipped = divmod(s, 2) if flip else (s, 0)
        meta = {
            "source": video.path,
            "input_index": video.position,
            "clip": clip,
            "fps": clips.fps,
            "frame_indices": clips.frame_indices[clip],
            "frame_interval": clips.frame_interval,
            "num_video_frames": clips.total_frames,
            "original_size": list(clips.original_size),
            "flipped": bool(flipped),
        }
        key = f"{video.position:08d}_c{clip:02d}" + ("_flip" if flipped else "")
        sample = {"__key__": key, "latent.npy": npy_bytes(mean[s]), "latent_std.npy": npy_bytes(std[s])}
        if video.label is not None:
            meta["label"] = video.label
            sample["cls"] = str(video.label).encode()
        if captions is not None:
            caption = captions[clip]
            meta["caption_tokens"] = int(caption.embedding.shape[0])
            meta["caption_truncated"] = caption.truncated
            sample.update(caption_members(caption))
        sample["json"] = json.dumps(meta, sort_keys=True).encode()
        samples.append(sample)
    return samples
