"""Toy latent datasets in the sharding job's exact format, for the loader's tests and benchmark.

Each shard ``{prefix}-{task:05d}-{part:06d}.tar`` holds samples ``KEY.latent.npy`` / ``KEY.latent_std.npy``
(float16, (F, C, h, w), already x scaling factor), ``KEY.cls`` (when labelled) and ``KEY.json``; the
``index.json`` beside them is written with ``data_pipeline.index.save_index``. Faults can be injected: a
corrupt sample (garbage in its ``latent.npy``) or a truncated shard (cut inside a member after the index
recorded its full size).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import tarfile
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from data_pipeline import storage
from data_pipeline.index import (
    DatasetFacts,
    DatasetIndex,
    ShardInfo,
    index_url_for,
    load_index,
    save_index,
    save_null_caption,
)
from data_pipeline.shard_writer import npy_bytes

SHARDS_PER_TASK = 4


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 1_700_000_000, 0o644
    tar.addfile(info, io.BytesIO(data))


def shard_name(prefix: str, shard: int) -> str:
    return f"{prefix}-{shard // SHARDS_PER_TASK:05d}-{shard % SHARDS_PER_TASK:06d}.tar"


CAPTION_TOKENS = 8  # the toy datasets' max_caption_tokens


def toy_caption(seed: int, n: int, width: int) -> np.ndarray:
    """Sample ``n``'s caption embedding: (L, width) float16, L in 1..CAPTION_TOKENS."""
    rng = np.random.default_rng([seed, n, 1])
    return rng.standard_normal((int(rng.integers(1, CAPTION_TOKENS + 1)), width)).astype(np.float16)


def write_shard(
    path: Path,
    first: int,
    count: int,
    shape: Sequence[int],
    classes: int,
    seed: int,
    corrupt: set[int],
    caption_width: int = 0,
) -> None:
    """Samples ``first .. first+count-1`` (keys ``clipNNNNNN``); ``corrupt`` holds sample numbers to spoil;
    ``caption_width`` > 0 adds ``caption.npy`` (``toy_caption``) and ``caption.txt``."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for n in range(first, first + count):
            rng = np.random.default_rng([seed, n])
            key = f"clip{n:06d}"
            mean = rng.standard_normal(shape).astype(np.float16)  # (F, C, h, w)
            std = rng.uniform(0.05, 0.5, shape).astype(np.float16)  # (F, C, h, w)
            meta = {"source": f"video{n}.mp4", "frames": int(shape[0])}
            _add(tar, f"{key}.json", json.dumps(meta).encode())
            _add(tar, f"{key}.latent.npy", b"\x93NUMPY garbage" * 7 if n in corrupt else npy_bytes(mean))
            _add(tar, f"{key}.latent_std.npy", npy_bytes(std))
            if classes:
                _add(tar, f"{key}.cls", str(n % classes).encode())
            if caption_width:
                _add(tar, f"{key}.caption.npy", npy_bytes(toy_caption(seed, n, caption_width)))
                _add(tar, f"{key}.caption.txt", f"caption of clip {n}".encode())


def make_dataset(
    root: str,
    counts: Sequence[int],
    *,
    latent_shape: Sequence[int] = (4, 4, 8, 8),
    classes: int = 4,
    scaling_factor: float = 0.18215,
    seed: int = 0,
    corrupt: Iterable[int] = (),
    truncate: dict[int, float] | None = None,
    prefix: str = "shard",
    caption_width: int = 0,
) -> DatasetIndex:
    """Write ``len(counts)`` shards (shard i holds ``counts[i]`` samples) and the index under ``root`` (a
    directory or ``s3://bucket/prefix``). ``corrupt``: global sample numbers whose latent.npy is garbage;
    ``truncate``: {shard: fraction of its bytes kept}; ``caption_width`` > 0: captioned samples (width D,
    up to ``CAPTION_TOKENS`` tokens, a random null caption). Returns the index."""
    truncate = truncate or {}
    shards: list[ShardInfo] = []
    with tempfile.TemporaryDirectory() as tmp:
        first = 0
        for shard, count in enumerate(counts):
            name = shard_name(prefix, shard)
            path = Path(tmp) / name
            write_shard(path, first, count, latent_shape, classes, seed, set(corrupt), caption_width)
            data = path.read_bytes()
            digest = hashlib.sha256(data).hexdigest()
            shards.append(ShardInfo(name, count, len(data), digest, shard // SHARDS_PER_TASK))
            if shard in truncate:  # cut inside a member, after the index recorded the whole shard
                path.write_bytes(data[: int(len(data) * truncate[shard]) // 512 * 512 + 100])
            storage.put_file(path, storage.join(root, name))
            first += count
    frames, _, size, _ = (int(n) for n in latent_shape)
    facts = DatasetFacts(
        vae="toy-vae",
        scaling_factor=scaling_factor,
        latent_shape=list(latent_shape),
        num_frames=frames,
        frame_interval=3,
        image_size=8 * size,
        classes=[f"class{c}" for c in range(classes)],
    )
    if caption_width:
        null = np.random.default_rng([seed, 2]).standard_normal((1, caption_width)).astype(np.float16)
        name = save_null_caption(root, null)
        facts = dataclasses.replace(
            facts,
            text_encoder="toy-t5",
            caption_channels=caption_width,
            max_caption_tokens=CAPTION_TOKENS,
            null_caption=name,
        )
    index = DatasetIndex(facts, shards)
    save_index(index, root)
    return index


def read_samples(index_url: str) -> dict[str, tuple[np.ndarray, np.ndarray, int | None]]:
    """Every readable sample as ``{sample id: (mean, std, label)}``, read with ``tarfile`` (an independent
    decoder to check the loader against); sample id = "<shard url relative to the index>/<key>"."""
    index = load_index(index_url)
    out: dict[str, tuple[np.ndarray, np.ndarray, int | None]] = {}
    for info, url in zip(index.shards, index.shard_urls(index_url_for(index_url)), strict=True):
        members: dict[str, dict[str, bytes]] = {}
        try:
            with tarfile.open(fileobj=io.BytesIO(storage.read_bytes(url)), mode="r|") as tar:
                for member in tar:
                    key, _, suffix = member.name.partition(".")
                    members.setdefault(key, {})[suffix] = tar.extractfile(member).read()
        except tarfile.TarError:
            members.popitem()  # the member cut short, with the sample it belongs to
        for key, files in members.items():
            try:
                mean = np.load(io.BytesIO(files["latent.npy"]))
                std = np.load(io.BytesIO(files["latent_std.npy"]))
            except (KeyError, ValueError, OSError):
                continue
            if index.facts.classes and "cls" not in files:
                continue
            label = int(files["cls"]) if "cls" in files else None
            out[f"{info.url}/{key}"] = (mean, std, label)
    return out
