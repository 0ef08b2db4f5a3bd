"""One stream's batches in one segment (what a DataLoader worker, or a worker-less rank, runs).

The stream reads its pieces in order into windows of ``shuffle_buffer`` slots and emits each window in its
seeded permutation (``epoch_plan.window_order``), ``batch_size`` slots per batch. While it emits window k it
reads window k+1, one slot per slot emitted, so at most two windows are held and only the first one of a
run (or resume) is waited for. Resuming at batch i therefore needs only i: re-read the window holding slot
``i * batch_size`` and continue from its permutation; nothing about the buffer has to be saved.

Unreadable samples (corrupt members, or a shard that ends early) leave holes; every hole is filled with a
readable sample of the same window (the h-th hole, in emission order, repeats the (h mod g)-th of the g
readable ones), so batch counts, and with them the lockstep of the ranks, never change. A window with no
readable sample borrows the stream's first readable sample after it (else before it); a stream without any
raises ``DatasetUnreadableError``. Stand-ins are counted (``substituted``), and every bad shard is warned
about once.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice

import torch

from data_pipeline.epoch_plan import Piece, SegmentPlan, slice_pieces, window_order
from data_pipeline.latent_sample import CorruptSample, Sample, SampleSpec, decode_sample, draw_batch
from data_pipeline.shard_reader import DatasetUnreadableError, ShardReader

logger = logging.getLogger("data_pipeline.loader")


@dataclass
class PieceSource:
    """Turns pieces into slots: a decoded ``Sample`` per sample, ``None`` for one that cannot be used."""

    urls: Sequence[str]  # absolute shard urls, by shard index
    names: Sequence[str]  # shard urls relative to the index (the first part of sample ids)
    spec: SampleSpec  # what a sample carries (its fields' members are read, the others skipped)
    stats: Counter = field(default_factory=Counter)
    retries: int = 8
    backoff: float = 0.5
    warned: set[int] = field(default_factory=set)
    dataset: str = "<dataset>"  # the index url, to name the dataset in errors

    def slots(self, pieces: Sequence[Piece]) -> Iterator[Sample | None]:
        for piece in pieces:
            yield from self._read(piece.shard, piece.indices())

    def _read(self, shard: int, indices: list[int]) -> Iterator[Sample | None]:
        reader = ShardReader(self.urls[shard], self.stats, self.retries, self.backoff, self.spec.members)
        pending = iter(indices)
        wanted = next(pending)
        for index, key, members in reader.samples(indices):
            if index != wanted:
                continue  # skipped without decoding
            try:
                sample: Sample | None = decode_sample(f"{self.names[shard]}/{key}", members, self.spec)
                self.stats["samples"] += 1
            except CorruptSample as exc:
                sample = None
                self._bad(shard, str(exc))
            yield sample
            wanted = next(pending, None)
            if wanted is None:
                return
        missing = [wanted, *pending]
        reason = f"{reader.problem or 'the archive ends early'}: {len(missing)} samples missing"
        self._bad(shard, reason, len(missing))
        yield from [None] * len(missing)

    def _bad(self, shard: int, reason: str, count: int = 1) -> None:
        self.stats["corrupt"] += count
        if shard not in self.warned:
            self.warned.add(shard)
            self.stats["bad_shards"] += 1
            logger.warning(
                "shard '%s': %s; unreadable samples are replaced by readable ones of the same shuffle window "
                "(further problems in this shard are only counted: see the loader's metrics())",
                self.urls[shard],
                reason,
            )

    def first_readable(self, pieces: Sequence[Piece]) -> Sample | None:
        """The first readable sample of ``pieces`` (a search: what it reads is not counted again)."""
        search = dataclasses.replace(self, stats=Counter())
        return next((s for s in search.slots(pieces) if s is not None), None)


def _fill_holes(window: list[Sample | None], order: Sequence[int], spare: Sample | None) -> list[Sample]:
    """The window in emission order with every hole replaced (see the module docstring)."""
    readable = [window[j] for j in order if window[j] is not None]
    out: list[Sample] = []
    holes = 0
    for j in order:
        sample = window[j]
        if sample is None:
            sample = readable[holes % len(readable)] if readable else spare
            holes += 1
        out.append(sample)
    return out


def stream_batches(
    plan: SegmentPlan, rank: int, stream: int, start: int, source: PieceSource, dtype: torch.dtype
) -> Iterator[tuple[dict, dict]]:
    """``(meta, batch)`` for batches ``start .. quota-1`` of one stream; ``meta`` = {"stream", "batch",
    "stats": counters since the previous batch}."""
    layout = plan.layout
    size, window = layout.batch_size, layout.shuffle_buffer
    work = plan.ranks[rank][stream]
    total, end = work.slots, work.quota * size  # slots held; slots emitted in the segment
    if start >= work.quota:
        return
    k, offset = divmod(start * size, window)

    def length(w: int) -> int:  # slots of window w that must be read (0 if the segment never reaches it)
        return min(window, total - w * window) if w * window < end else 0

    def spare(w: int) -> Sample:  # a stand-in for a window without one readable sample
        for lo, hi in (((w + 1) * window, total), (0, w * window)):
            sample = source.first_readable(slice_pieces(work.pieces, lo, hi))
            if sample is not None:
                return sample
        shards = sorted({p.shard for p in work.pieces})
        where = f"{len(shards)} shards, e.g." if len(shards) > 1 else "shard"
        raise DatasetUnreadableError(
            f"dataset '{source.dataset}' has no readable samples: the {total} samples of rank {rank} worker "
            f"{stream} in epoch {plan.epoch} ({where} '{source.names[shards[0]]}') are all corrupt or cut off"
        )

    slots = source.slots(slice_pieces(work.pieces, k * window, total))
    current = list(islice(slots, length(k)))
    batch: list[Sample] = []
    index = start
    while True:
        order = window_order(plan, rank, stream, k, len(current))
        holes = [current[j] is None for j in order]
        emitted = _fill_holes(current, order, spare(k) if not any(s is not None for s in current) else None)
        ahead: list[Sample | None] = []
        wanted_ahead = length(k + 1)
        for i in range(offset, len(emitted)):
            batch.append(emitted[i])
            source.stats["substituted"] += holes[i]
            if len(ahead) < wanted_ahead:  # read ahead one slot per slot emitted
                ahead.append(next(slots))
            if len(batch) == size:
                source.stats["batches"] += 1
                stats = dict(source.stats)
                source.stats.clear()
                meta = {"stream": stream, "batch": index, "stats": stats}
                yield meta, draw_batch(batch, source.spec, plan.seed, plan.epoch, dtype)
                index, batch = index + 1, []
                if index == work.quota:
                    return
        ahead += islice(slots, wanted_ahead - len(ahead))
        current, k, offset = ahead, k + 1, 0
