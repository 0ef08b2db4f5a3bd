"""The streaming latent loader: batches from a dataset's shards (local or ``s3://``) for one data-parallel
rank, with a state that resumes exactly, on the same or on a different world size.

    loader = LatentLoader("s3://bucket/ucf101/index.json", batch_size=5, rank=r, world_size=W, seed=3407,
                          num_workers=8, infinite=True, expected=Expected((16, 4, 32, 32), 0.18215, 101))
    for batch in loader:   # {"latent": (B, F, C, h, w) float32, "y": (B,) int64, "key": [B sample ids]}
        ...                # + "encoder_hidden_states" (B, L, D), "encoder_attention_mask" (B, L) if captioned
        ...
    checkpoint["loader"] = loader.state_dict()      # small, JSON; any rank's describes every rank
    loader.load_state_dict(checkpoint["loader"])    # then iterate again: the sequence continues

How (details in ``epoch_plan`` and ``stream_batches``): epoch e reads the shards in a permutation seeded by
(seed, e), spread over ranks and then over each rank's DataLoader workers, each shard to the least-loaded
one; every worker shuffles its samples in windows of ``shuffle_buffer`` slots and makes whole batches; the
main process takes the workers' batches round-robin (worker 0, 1, ...). Everything is a function of the
index's per-shard sample counts, seed, epoch and layout, so every rank knows every other rank's plan, and
because all ranks take the same number of batches in lockstep, the whole data state is (epoch, batches
taken) - plus, if the layout changed within the epoch, the batches taken under each earlier layout.

Equalisation: every rank yields the same number of batches per epoch; a rank drops the samples its workers
would emit beyond that (at most one shard's samples plus ``workers x (batch_size - 1)``; see ``epoch_plan``).
Unreadable samples are replaced by readable ones of the same shuffle window (counted in ``metrics()``), so
the batch count never changes.

Errors, each one line: ``DatasetIndexError`` (the index), ``IndexMismatchError`` (index vs config) and
``LoaderError`` (a missing shard, a dataset too small for the layout) at construction; while iterating,
``LoaderError`` when a shard cannot be read (e.g. storage away beyond the retries: a requeue may cure it)
and its subclass ``DatasetUnreadableError`` when every sample a worker reads is corrupt (the data itself:
no retry cures it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline import storage
from data_pipeline.epoch_plan import (
    Layout,
    SegmentPlan,
    next_stream,
    round_robin_counts,
    round_robin_order,
    segment_plan,
    slice_pieces,
)
from data_pipeline.index import DatasetFacts, index_url_for, load_index, load_null_caption
from data_pipeline.latent_sample import CAPTION_FIELD, LABEL_FIELD, SampleSpec
from data_pipeline.shard_reader import DatasetUnreadableError, LoaderError
from data_pipeline.stream_batches import PieceSource, stream_batches
from latte.seeding import mix_seed

__all__ = ["DatasetUnreadableError", "Expected", "IndexMismatchError", "LatentLoader", "LoaderError"]

STATE_FORMAT = "latte-loader/1"
METRICS = ("batches", "samples", "corrupt", "bad_shards", "substituted", "retries", "bytes")
logger = logging.getLogger("data_pipeline.loader")


class IndexMismatchError(ValueError):
    """The dataset's index disagrees with what the training config expects; one line."""


@dataclass(frozen=True)
class Expected:
    """What the training config expects of a dataset; ``None`` skips a check."""

    latent_shape: tuple[int, ...] | None = None  # (F, C, h, w) the model is built for
    scaling_factor: float | None = None  # the VAE scaling factor the run assumes (sampling divides by it)
    num_classes: int | None = None  # 0 = unconditional model (labels are not returned); N = N classes
    caption_channels: int | None = (
        None  # 0 = the model takes no captions (not returned); D = captions of width D
    )

    def declined(self) -> tuple[str, ...]:
        """Batch keys of the optional sample fields the config does not want even from a dataset that has
        them (``latent_sample.FIELDS``): the labels, for an unconditional model; the captions, for a model
        without text conditioning."""
        declined = (LABEL_FIELD.key,) if self.num_classes == 0 else ()
        return declined + ((CAPTION_FIELD.key,) if self.caption_channels == 0 else ())


def check_facts(facts: DatasetFacts, expected: Expected, index_url: str) -> None:
    """Raise ``IndexMismatchError`` naming the index and both values where they disagree."""
    where = f"dataset '{index_url}'"
    if expected.latent_shape is not None and list(expected.latent_shape) != list(facts.latent_shape):
        raise IndexMismatchError(
            f"{where} holds latents of shape (F, C, h, w) = {tuple(facts.latent_shape)}, the config expects "
            f"{tuple(expected.latent_shape)} (num_frames, in_channels, image_size / vae_downsample)"
        )
    factor = expected.scaling_factor
    if factor is not None and abs(factor - facts.scaling_factor) > 1e-6 * max(abs(factor), 1.0):
        raise IndexMismatchError(
            f"{where} was encoded with VAE scaling factor {facts.scaling_factor}, the config expects {factor}"
        )
    if expected.num_classes:
        if not facts.classes:
            raise IndexMismatchError(
                f"{where} is unconditional (no classes), the config asks for {expected.num_classes} classes"
            )
        if len(facts.classes) != expected.num_classes:
            raise IndexMismatchError(
                f"{where} has {len(facts.classes)} classes, the config asks for {expected.num_classes}"
            )
    if expected.caption_channels:
        if not facts.has_captions:
            raise IndexMismatchError(
                f"{where} has no captions, the config asks for captions of width {expected.caption_channels}"
            )
        if facts.caption_channels != expected.caption_channels:
            raise IndexMismatchError(
                f"{where} holds captions of width {facts.caption_channels} (text encoder "
                f"'{facts.text_encoder}'), the config expects {expected.caption_channels}"
            )


def _identity(item: Any) -> Any:
    return item


def _one_thread(items: Iterator[Any]) -> Iterator[Any]:
    """``items`` computed with one torch thread, as in a DataLoader worker: the per-sample tensors are
    small, and with several threads each op costs more in synchronisation than it saves (measured 40x
    slower with 2 threads). The caller's thread count is restored between items."""
    while True:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            item = next(items, None)
        finally:
            torch.set_num_threads(threads)
        if item is None:
            return
        yield item


class _RankStreams(IterableDataset):
    """One rank's streams for a DataLoader: worker p runs stream (p + rotation) % workers from its cursor."""

    def __init__(
        self,
        plan: SegmentPlan,
        rank: int,
        starts: list[int],
        rotation: int,
        source: PieceSource,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        # only this rank's streams travel to the workers
        self.plan = dataclasses.replace(
            plan, ranks=[s if r == rank else [] for r, s in enumerate(plan.ranks)]
        )
        self.rank, self.starts, self.rotation, self.source, self.dtype = rank, starts, rotation, source, dtype

    def __iter__(self) -> Iterator[tuple[dict, dict]]:
        info = get_worker_info()
        stream = (info.id + self.rotation) % info.num_workers if info is not None else self.rotation
        try:
            yield from stream_batches(
                self.plan, self.rank, stream, self.starts[stream], self.source, self.dtype
            )
        except DatasetUnreadableError as exc:  # handed over as an item: DataLoader would re-raise the error
            yield {"unreadable": str(exc)}, {}  # with this worker's traceback in its message (many lines)


class LatentLoader:
    """Batches of latents for one data-parallel rank, with an exactly resumable state.

    Args:
        index_url: the dataset's ``index.json`` (or its root): local path or ``s3://bucket/prefix/index.json``.
        batch_size: samples per batch (the micro-batch of one rank).
        rank, world_size: this rank and the number of data-parallel ranks.
        seed: global seed; shard order, shuffle windows and noise derive from (seed, epoch).
        num_workers: DataLoader worker processes (0 = read in this process).
        shuffle_buffer: samples per shuffle window of each worker (memory: about 2x this many samples each).
        infinite: roll over into the next epoch (step-based training) instead of stopping after one.
        dtype: dtype of ``latent`` (float32 or bfloat16; the draw is computed in float32).
        expected: checks against the training config (raises ``IndexMismatchError``).
        retries, retry_backoff: transient storage errors are retried this many times in a row, waiting
            ``retry_backoff * 2**k`` seconds (at most 30), before the loader gives up with ``LoaderError``.
        check_shards: check at construction that the shards exist (S3: this rank checks its 1/world_size of
            them, so the ranks together check every shard once).
        prefetch_factor: batches each worker prepares ahead.
        pin_memory: hand over batches from workers in pinned host memory (for non-blocking copies to a GPU).

    Attributes: ``facts`` (the index's ``DatasetFacts``), ``spec`` (what its samples carry, from
    ``latent_sample.FIELDS``) and ``batch_keys`` (the keys of every batch, e.g. ("latent", "y", "key")).
    """

    def __init__(
        self,
        index_url: str,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        num_workers: int = 0,
        shuffle_buffer: int = 256,
        infinite: bool = False,
        dtype: torch.dtype = torch.float32,
        expected: Expected | None = None,
        retries: int = 8,
        retry_backoff: float = 0.5,
        check_shards: bool = True,
        prefetch_factor: int = 2,
        pin_memory: bool = False,
    ) -> None:
        self.layout = Layout(world_size, num_workers, batch_size, shuffle_buffer)
        self.layout.check()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, {world_size})")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"dtype must be torch.float32 or torch.bfloat16, got {dtype}")
        self.rank, self.seed, self.infinite, self.dtype = rank, seed, infinite, dtype
        self.prefetch_factor, self.pin_memory = prefetch_factor, pin_memory
        self.index_url = index_url_for(index_url)
        self.index = load_index(self.index_url)  # DatasetIndexError naming the url
        self.facts = self.index.facts
        expected = expected or Expected()
        check_facts(self.facts, expected, self.index_url)
        self.urls = self.index.shard_urls(self.index_url)
        self.counts = [s.samples for s in self.index.shards]
        self.spec = SampleSpec.of(self.facts, without=expected.declined())  # what its samples carry
        self.batch_keys = self.spec.batch_keys  # ("latent", "y" when labelled, "key")
        names = [s.url for s in self.index.shards]
        self._source = PieceSource(
            self.urls, names, self.spec, Counter(), retries, retry_backoff, dataset=self.index_url
        )
        if check_shards:
            self._check_shards()
        self.epoch = 0
        self._layouts: list[Layout] = [self.layout]  # the layouts of the current epoch's segments
        self._consumed: list[int] = [0]  # batches taken per rank in each segment
        self._metrics: Counter = Counter()
        self._cache: tuple[tuple, SegmentPlan] | None = None
        self._plan()

    # ------------------------------------------------------------------------------------------------------
    # iteration
    # ------------------------------------------------------------------------------------------------------

    def _plan(self) -> SegmentPlan:
        key = (self.seed, self.epoch, tuple(self._layouts), tuple(self._consumed[:-1]))
        if self._cache is None or self._cache[0] != key:
            plan = segment_plan(self.counts, self.seed, self.epoch, self._layouts, self._consumed[:-1])
            if plan.batches == 0 and plan.segment == 0:  # (a resumed segment may hold too little: fine)
                size, layout = f"{self.index.num_samples} samples in {len(self.urls)} shards", plan.layout
                raise LoaderError(
                    f"dataset '{self.index_url}' ({size}) is too small for {layout.world_size} ranks x "
                    f"{layout.streams} workers x batch {layout.batch_size}"
                )
            self._cache = (key, plan)
        return self._cache[1]

    def __len__(self) -> int:
        """Batches this rank yields in the current segment (an epoch, unless the layout changed within it)."""
        return self._plan().batches

    def set_epoch(self, epoch: int) -> None:
        """Start at the beginning of ``epoch`` (with this loader's layout)."""
        self.epoch, self._layouts, self._consumed = epoch, [self.layout], [0]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """The rest of the current epoch (and the following ones when ``infinite``)."""
        while True:
            plan = self._plan()
            if self._consumed[-1] < plan.batches:
                yield from self._segment(plan)
            self.set_epoch(self.epoch + 1)
            if not self.infinite:
                return

    def _segment(self, plan: SegmentPlan) -> Iterator[dict[str, Any]]:
        """The rest of the current segment, checked against the plan's round-robin order."""
        taken = self._consumed[-1]
        quotas = plan.quotas(self.rank)
        counts = round_robin_counts(quotas, taken)
        order = round_robin_order(quotas, taken)
        for meta, batch in self._batches(plan, taken):
            if "unreadable" in meta:  # from a worker (see _RankStreams)
                raise DatasetUnreadableError(meta["unreadable"])
            stream = next(order, None)
            if stream is None or (meta["stream"], meta["batch"]) != (stream, counts[stream]):
                planned = "nothing" if stream is None else f"batch {counts[stream]} of worker {stream}"
                got = f"batch {meta['batch']} of worker {meta['stream']}"
                raise LoaderError(f"rank {self.rank}: got {got}, the plan says {planned}")
            counts[stream] += 1
            self._metrics.update(meta["stats"])
            self._consumed[-1] += 1  # counted when handed over: prefetched batches do not count
            yield batch
        if self._consumed[-1] != plan.batches:
            raise LoaderError(
                f"rank {self.rank} ran out after {self._consumed[-1]} of {plan.batches} batches"
            )

    def _batches(self, plan: SegmentPlan, taken: int) -> Iterator[tuple[dict, dict]]:
        """(meta, batch) of this rank from batch ``taken`` on, in round-robin order over the streams."""
        quotas = plan.quotas(self.rank)
        starts = round_robin_counts(quotas, taken)
        if self.layout.num_workers == 0:
            yield from _one_thread(stream_batches(plan, self.rank, 0, starts[0], self._source, self.dtype))
            return
        # The DataLoader takes worker 0, 1, ... round-robin, skipping finished ones; rotating which stream
        # worker 0 runs makes it start with the stream whose turn it is (same order as an unbroken run).
        rotation = next_stream(quotas, taken)
        assert rotation is not None  # taken < the segment's batches
        dataset = _RankStreams(plan, self.rank, starts, rotation, self._source, self.dtype)
        # Its own generator for the workers' base seed: by default DataLoader draws it from the global torch
        # RNG, which training checkpoints and restores, so a resumed run would draw it once more (shifting,
        # e.g., the label dropout) than the run it continues. The streams seed themselves (by sample id).
        generator = torch.Generator().manual_seed(mix_seed(self.seed, plan.epoch))
        yield from DataLoader(
            dataset,
            batch_size=None,
            num_workers=self.layout.num_workers,
            collate_fn=_identity,
            prefetch_factor=self.prefetch_factor,
            generator=generator,
            pin_memory=self.pin_memory,
        )

    # ------------------------------------------------------------------------------------------------------
    # state
    # ------------------------------------------------------------------------------------------------------

    def _fingerprint(self) -> str:
        listing = json.dumps([[s.url, s.samples] for s in self.index.shards]).encode()
        return hashlib.sha256(listing).hexdigest()[:16]

    def state_dict(self) -> dict[str, Any]:
        """The data position after the batches handed out so far; the same on every rank. ``cursor`` (this
        rank's workers: batches taken, and the shard and sample where each one's current shuffle window
        starts) is for people and logs; the rest is what ``load_state_dict`` needs."""
        segments = [
            {**dataclasses.asdict(layout), "batches": taken}
            for layout, taken in zip(self._layouts, self._consumed, strict=True)
        ]
        return {
            "format": STATE_FORMAT,
            "dataset": {
                "index": self.index_url,
                "shards": len(self.urls),
                "samples": self.index.num_samples,
                "fingerprint": self._fingerprint(),
            },
            "seed": self.seed,
            "epoch": self.epoch,
            "segments": segments,
            "rank": self.rank,
            "cursor": self._cursor(),
        }

    def _cursor(self) -> list[dict[str, Any]]:
        plan = self._plan()
        window, size = plan.layout.shuffle_buffer, plan.layout.batch_size
        counts = round_robin_counts(plan.quotas(self.rank), self._consumed[-1])
        out = []
        for stream, (work, taken) in enumerate(zip(plan.ranks[self.rank], counts, strict=True)):
            start = taken * size // window * window
            at = slice_pieces(work.pieces, start, start + 1)
            where = {"shard": self.index.shards[at[0].shard].url, "sample": at[0].begin} if at else {}
            out.append({"worker": stream, "batches": taken, **where})
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (any rank's ``state_dict()``, possibly saved under another layout).

        Same layout: the exact sequence an uninterrupted run yields. Another layout (world size, workers,
        batch size or buffer): the rest of the interrupted epoch (every sample no rank had taken, partly read
        shards finished from where they were) spread over the new ranks, then the new layout's own order.
        Call it before iterating."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            found = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise LoaderError(f"loader state has format {found!r}, expected {STATE_FORMAT!r}")
        try:
            self._restore(state)
        except (KeyError, TypeError, ValueError) as exc:
            raise LoaderError(f"malformed loader state ({type(exc).__name__}: {exc})") from None

    def _restore(self, state: dict[str, Any]) -> None:
        if state["dataset"]["fingerprint"] != self._fingerprint():
            raise LoaderError(
                f"loader state was saved for dataset '{state['dataset']['index']}' "
                f"({state['dataset']['shards']} shards, {state['dataset']['samples']} samples); "
                f"'{self.index_url}' has other shards ({len(self.urls)}, {self.index.num_samples} samples)"
            )
        if state["seed"] != self.seed:
            logger.warning("loader seed %d replaced by the checkpoint's seed %d", self.seed, state["seed"])
        self.seed, self.epoch = int(state["seed"]), int(state["epoch"])
        fields = [f.name for f in dataclasses.fields(Layout)]
        self._layouts = [Layout(**{k: int(s[k]) for k in fields}) for s in state["segments"]]
        self._consumed = [int(s["batches"]) for s in state["segments"]]
        if self._layouts[-1] == self.layout:
            return
        if self._consumed[-1] == 0:  # nothing taken under the last layout: plan its work with ours instead
            self._layouts[-1] = self.layout
        elif self._consumed[-1] >= self._plan().batches:  # the epoch was complete
            self.set_epoch(self.epoch + 1)
        else:
            self._layouts.append(self.layout)
            self._consumed.append(0)

    def null_caption(self) -> np.ndarray | None:
        """The empty prompt's (L0, D) float16 embedding recorded with the dataset; None without captions."""
        return load_null_caption(self.index_url, self.facts) if self.facts.has_captions else None

    def metrics(self) -> dict[str, int]:
        """Counters since construction, from the batches handed out: ``batches``; ``samples`` decoded;
        ``corrupt`` samples that could not be used; ``bad_shards`` with such samples (each warned about
        once); ``substituted`` stand-ins for them; ``retries`` after transient storage errors; ``bytes`` of
        shards read (or skipped)."""
        return {name: int(self._metrics.get(name, 0)) for name in METRICS}

    # ------------------------------------------------------------------------------------------------------
    # start-up checks
    # ------------------------------------------------------------------------------------------------------

    def _check_shards(self) -> None:
        """One clear error, naming the url, for a missing or unreadable shard."""
        if not storage.is_s3(self.index_url):
            for url in self.urls:
                if not Path(url).is_file():
                    raise LoaderError(f"shard '{url}' listed in '{self.index_url}' does not exist")
            return
        mine = self.urls[self.rank :: self.layout.world_size]

        def problem(url: str) -> str | None:
            try:
                return (
                    None
                    if storage.exists(url)
                    else f"shard '{url}' listed in '{self.index_url}' does not exist"
                )
            except storage.StorageError as exc:
                return f"shard '{url}' listed in '{self.index_url}' cannot be read: {exc}"

        with ThreadPoolExecutor(max_workers=8) as pool:
            for message in pool.map(problem, mine):
                if message:
                    raise LoaderError(message)
