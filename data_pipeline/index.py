"""The dataset index: ``index.json`` at a dataset's root, and the per-task parts it is merged from.

Written by the sharding job, read by the loader, training and sampling. It records every shard (url relative
to the index, sample count, bytes, sha256), the inputs that failed, and the dataset's facts, notably the VAE
scaling factor already applied to the stored latents: that factor lives here and nowhere else.

    {"format": "latte-latents/1",
     "facts": {"vae": ..., "scaling_factor": 0.18215, "latent_shape": [F, C, h, w], "num_frames": 16,
               "frame_interval": 3, "image_size": 256, "classes": [...], "dtype": "float16"},
     "shards": [{"url": "shard-00000-000000.tar", "samples": 64, "bytes": ..., "sha256": ..., "task": 0}],
     "num_samples": ..., "failed": [{"input": ..., "error": ...}]}

A dataset with captions (``data_pipeline.text_encoder``) adds the facts ``"text_encoder": "<path or hub id>",
"caption_channels": D, "max_caption_tokens": 120, "null_caption": "null_caption.npy"`` (the last: the
unpadded (L0, D) float16 embedding of the empty prompt "", the null condition of classifier-free guidance,
in a file beside the index: ``load_null_caption``), each shard ``"captions_truncated": n`` where n > 0
(captions cut to ``max_caption_tokens``), and the index their sum ``"captions_truncated"``. Without
captions these keys are left out, so such an index reads and writes as before.

Each task of a sharding job writes only its own part, ``parts/task-XXXXX.json`` (rewritten atomically after
every finished shard, so a rerun knows what is done); ``merge_parts`` builds ``index.json`` from all parts.
"""

from __future__ import annotations

import dataclasses
import io
import json
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline import storage

FORMAT = "latte-latents/1"
INDEX_NAME = "index.json"
PARTS_DIR = "parts"


class DatasetIndexError(ValueError):
    """An index that is missing, unreadable or inconsistent; one line naming its url."""


@dataclass(frozen=True)
class DatasetFacts:
    """What the stored samples are. Some facts say which optional sample fields the dataset carries (the
    ``fact`` of each field in ``latent_sample.FIELDS``: ``classes`` for ``y``); a new one needs a default
    meaning "absent", so indexes written before it still read."""

    vae: str  # local path or hub id of the AutoencoderKL that encoded the latents
    scaling_factor: float  # already multiplied into latent mean and std; decode divides by it
    latent_shape: list[int]  # (F, C, h, w) of one sample's latent.npy
    num_frames: int
    frame_interval: int
    image_size: int
    classes: list[str] = field(default_factory=list)  # class names by label; [] = unconditional (no y)
    dtype: str = "float16"  # storage dtype of latent.npy / latent_std.npy
    text_encoder: str = ""  # path or hub id of the T5 encoder of caption.npy; "" = no captions
    caption_channels: int = 0  # D, the width of caption.npy (L_i, D) float16
    max_caption_tokens: int = 0  # the most tokens a caption has: the loader pads to it
    null_caption: str = ""  # url (relative to the index) of the empty prompt's (L0, D) float16 embedding

    @property
    def has_captions(self) -> bool:
        return bool(self.text_encoder)

    def to_json(self) -> dict[str, Any]:
        """As a dict; a dataset without captions leaves their facts out (its index reads as before)."""
        data = dataclasses.asdict(self)
        if not self.has_captions:
            for name in CAPTION_FACTS:
                data.pop(name)
        return data


CAPTION_FACTS = ("text_encoder", "caption_channels", "max_caption_tokens", "null_caption")
NULL_CAPTION_NAME = "null_caption.npy"


@dataclass(frozen=True)
class ShardInfo:
    url: str  # relative to the index's directory (or absolute)
    samples: int
    bytes: int
    sha256: str
    task: int = 0
    captions_truncated: int = 0  # captions of its samples cut to max_caption_tokens

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if not self.captions_truncated:
            data.pop("captions_truncated")
        return data


@dataclass
class DatasetIndex:
    facts: DatasetFacts
    shards: list[ShardInfo] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)  # {"input": ..., "error": ...}
    format: str = FORMAT

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def captions_truncated(self) -> int:
        """Captions cut to the facts' ``max_caption_tokens`` by the sharding job (over every shard)."""
        return sum(s.captions_truncated for s in self.shards)

    def to_json(self) -> dict[str, Any]:
        data = {
            "format": self.format,
            "facts": self.facts.to_json(),
            "shards": [s.to_json() for s in self.shards],
            "num_samples": self.num_samples,
            "failed": list(self.failed),
        }
        if self.facts.has_captions:
            data["captions_truncated"] = self.captions_truncated
        return data

    @classmethod
    def from_json(cls, data: Any, source: str = "<index>") -> DatasetIndex:
        if not isinstance(data, dict):  # e.g. `[]`: valid JSON, but not an index
            found = json.dumps(data)[:40]
            raise DatasetIndexError(f"index '{source}' is malformed: expected a JSON object, found {found}")
        try:
            if data.get("format") != FORMAT:
                raise DatasetIndexError(
                    f"index '{source}' has format {data.get('format')!r}, expected {FORMAT!r}"
                )
            index = cls(
                facts=DatasetFacts(**data["facts"]),
                shards=[ShardInfo(**s) for s in data["shards"]],
                failed=list(data.get("failed", [])),
            )
        except (KeyError, TypeError) as exc:
            raise DatasetIndexError(f"index '{source}' is malformed: {type(exc).__name__}: {exc}") from None
        if "num_samples" in data and data["num_samples"] != index.num_samples:
            raise DatasetIndexError(
                f"index '{source}' says num_samples={data['num_samples']} "
                f"but its shards hold {index.num_samples}"
            )
        return index

    def shard_urls(self, index_url: str) -> list[str]:
        """Absolute shard urls/paths, resolving relative ones against the index's directory."""
        return [resolve_url(index_url, s.url) for s in self.shards]


def resolve_url(index_url: str, url: str) -> str:
    """``url`` as listed in the index (relative to its directory, or absolute) as an absolute url/path."""
    return url if _is_absolute(url) else storage.join(_dirname(index_url_for(index_url)), url)


def _dirname(url: str) -> str:
    return posixpath.dirname(url.rstrip("/")) if storage.is_s3(url) else str(Path(url).parent)


def _is_absolute(url: str) -> bool:
    return storage.is_s3(url) or url.startswith("/")


def index_url_for(root_or_index: str) -> str:
    """Accept a dataset root or its index.json url; return the index url."""
    return root_or_index if root_or_index.endswith(".json") else storage.join(root_or_index, INDEX_NAME)


def load_index(url: str) -> DatasetIndex:
    """Read and check an index (a dataset root or an index.json url)."""
    url = index_url_for(url)
    try:
        raw = storage.read_bytes(url)
    except storage.StorageError as exc:
        raise DatasetIndexError(f"cannot read dataset index '{url}': {exc}") from None
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise DatasetIndexError(f"dataset index '{url}' is not valid JSON: {exc}") from None
    return DatasetIndex.from_json(data, url)


def load_null_caption(index_url: str, facts: DatasetFacts | None = None) -> np.ndarray | None:
    """The dataset's null caption, the (L0, D) float16 embedding of "" by its text encoder (the condition
    of classifier-free guidance), or None for a dataset without captions. ``index_url``: the dataset root or
    its index.json (``facts``: its facts, if already read). Raises ``DatasetIndexError`` (one line)."""
    facts = facts or load_index(index_url).facts
    if not facts.has_captions:
        return None
    url = resolve_url(index_url, facts.null_caption or NULL_CAPTION_NAME)
    try:
        array = np.load(io.BytesIO(storage.read_bytes(url)), allow_pickle=False)
    except (storage.StorageError, ValueError, OSError) as exc:
        raise DatasetIndexError(f"cannot read the null caption '{url}': {exc}") from None
    if array.ndim != 2 or array.shape[1] != facts.caption_channels or array.dtype != np.float16:
        raise DatasetIndexError(
            f"null caption '{url}' holds {array.dtype}{list(array.shape)}, "
            f"the index promises float16[L, {facts.caption_channels}]"
        )
    return array


def save_null_caption(output: str, array: np.ndarray) -> str:
    """Write the null caption beside ``output``'s index; returns its name (the ``null_caption`` fact)."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array, dtype=np.float16), allow_pickle=False)
    storage.write_bytes(storage.join(output, NULL_CAPTION_NAME), buffer.getvalue())
    return NULL_CAPTION_NAME


def save_index(index: DatasetIndex, url: str) -> None:
    """Write an index (or part) atomically."""
    storage.write_bytes(index_url_for(url), json.dumps(index.to_json(), indent=1).encode())


def part_url(output: str, task: int) -> str:
    return storage.join(output, PARTS_DIR, f"task-{task:05d}.json")


def load_part(output: str, task: int) -> DatasetIndex | None:
    """A task's part if it exists (a rerun uses it to skip finished shards)."""
    url = part_url(output, task)
    return load_index(url) if storage.exists(url) else None


def merge_parts(output: str, num_tasks: int | None = None) -> DatasetIndex:
    """Merge every task's part into ``output/index.json``; facts must agree; shards sorted by url.

    With ``num_tasks``, every task 0..num_tasks-1 must have written its part. An index without samples
    (every input failed) is written all the same, since it lists the failures, and then refused with
    ``DatasetIndexError``: the job that merges must fail, or a training job waiting on it would start.
    """
    urls = [u for u in storage.list_files(storage.join(output, PARTS_DIR)) if u.endswith(".json")]
    if not urls:
        raise DatasetIndexError(
            f"no task parts under '{storage.join(output, PARTS_DIR)}': has the sharding job run?"
        )
    parts = {int(posixpath.basename(u)[len("task-") : -len(".json")]): load_index(u) for u in urls}
    if num_tasks is not None:
        missing = sorted(set(range(num_tasks)) - set(parts))
        if missing:
            raise DatasetIndexError(
                f"tasks {missing} of {num_tasks} have not written their parts under '{output}'"
            )
    facts = {t: p.facts for t, p in parts.items()}
    first_task, first = next(iter(sorted(facts.items())))
    for task, f in facts.items():
        if f != first:
            diff = [k for k in dataclasses.asdict(f) if getattr(f, k) != getattr(first, k)]
            raise DatasetIndexError(
                f"task {task} disagrees with task {first_task} on {', '.join(diff)} under '{output}'"
            )
    merged = DatasetIndex(
        facts=first,
        shards=sorted((s for p in parts.values() for s in p.shards), key=lambda s: s.url),
        failed=[f for _, p in sorted(parts.items()) for f in p.failed],
    )
    save_index(merged, output)
    if merged.num_samples == 0:
        raise DatasetIndexError(
            f"dataset '{output}' has no samples: all {len(merged.failed)} inputs failed "
            f"(listed under 'failed' in '{index_url_for(output)}')"
        )
    return merged
