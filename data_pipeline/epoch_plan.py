"""Which samples every rank and worker reads in an epoch, and in which order: pure arithmetic on the index's
per-shard sample counts, no I/O, identical on every rank (so no rank ever needs to ask another).

Vocabulary:

- a **stream** is one DataLoader worker of one rank (or the rank's main process when ``num_workers`` is 0);
- a **piece** is a run of samples of one shard, read in shard order (a whole shard, or what is left of one);
- a **slot** is a position in a stream's sample sequence (the concatenation of its pieces);
- a **window** is ``shuffle_buffer`` consecutive slots of a stream; a stream emits each window in a seeded
  permutation, so the shuffle state at any point is a function of the stream's position alone;
- a **segment** is the part of an epoch run under one :class:`Layout`. An epoch starts with segment 0 over all
  shards; when training resumes with another layout (world size, workers, batch size or buffer), what the old
  layout had not consumed becomes the pieces of the next segment, spread over the new ranks and streams.

Equalisation: rank r's streams can yield ``sum_w floor(n_rw / B)`` batches; every rank yields exactly
``T = min_r`` of that (so no rank runs short in a collective). Shards go to ranks (and then to a rank's
streams) greedily, each to the least-loaded one, so rank loads differ by at most one shard. Dropped per
epoch and rank: the samples its streams hold past their quotas, at most ``max_shard_samples + streams *
(batch_size - 1)`` (typically about half a shard): what each stream would emit after its quota, from the
end of the epoch's permuted order, so a different set every epoch. Nothing is repeated (except the
stand-ins for unreadable samples, see ``stream_batches``). After a layout change within an epoch, only the
last layout drops.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

# Distinct tags keep the seed sequences of the different random choices apart.
_SHARD_ORDER, _PIECE_ORDER, _WINDOW_ORDER = 0x5348, 0x5043, 0x5749


@dataclass(frozen=True)
class Layout:
    """How one training run reads: everything that shapes the sample sequence besides seed and epoch."""

    world_size: int  # data-parallel ranks
    num_workers: int  # DataLoader workers per rank; 0 = read in the rank's main process
    batch_size: int  # samples per batch (micro-batch)
    shuffle_buffer: int  # slots per shuffle window of one stream

    @property
    def streams(self) -> int:
        """Sample streams per rank (the main process counts as one stream when there are no workers)."""
        return max(self.num_workers, 1)

    def check(self) -> None:
        if self.world_size < 1 or self.num_workers < 0 or self.batch_size < 1 or self.shuffle_buffer < 1:
            raise ValueError(f"invalid loader layout {self}: world_size, batch_size, shuffle_buffer >= 1")


@dataclass(frozen=True)
class Piece:
    """Samples ``begin <= i < end`` of shard ``shard`` (an index into the dataset's shard list), minus
    ``skip`` (samples of that range a previous segment already consumed)."""

    shard: int
    begin: int
    end: int
    skip: tuple[int, ...] = ()

    @property
    def size(self) -> int:
        return self.end - self.begin - len(self.skip)

    def indices(self) -> list[int]:
        """The piece's sample indices within its shard, ascending."""
        skip = set(self.skip)
        return [i for i in range(self.begin, self.end) if i not in skip]


@dataclass
class StreamPlan:
    """One stream's work in one segment: its pieces in reading order and the batches it yields."""

    pieces: list[Piece]
    quota: int = 0  # batches this stream yields in the segment (set once every rank's capacity is known)

    @property
    def slots(self) -> int:
        return sum(p.size for p in self.pieces)


@dataclass
class SegmentPlan:
    """Every rank's streams for one segment of one epoch."""

    seed: int
    epoch: int
    segment: int  # 0 = the epoch's first layout; k = the layout after the k-th change within the epoch
    layout: Layout
    ranks: list[list[StreamPlan]] = field(default_factory=list)  # [rank][stream]
    batches: int = 0  # T: batches every rank yields in this segment
    samples: int = 0  # samples the segment had to offer (so dropped = samples - T * B * world_size)

    def quotas(self, rank: int) -> list[int]:
        return [s.quota for s in self.ranks[rank]]

    @property
    def dropped(self) -> int:
        """Samples of this segment that no rank yields (the equalisation)."""
        return self.samples - self.batches * self.layout.batch_size * self.layout.world_size


def _rng(*entropy: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(e) for e in entropy])))


def window_order(plan: SegmentPlan, rank: int, stream: int, window: int, size: int) -> np.ndarray:
    """The emission order (a permutation of ``range(size)``) of one window of one stream."""
    keys = (plan.seed, plan.epoch, plan.segment, rank, stream, window, _WINDOW_ORDER)
    return _rng(*keys).permutation(size)


def balance(sizes: Sequence[int], parts: int) -> list[list[int]]:
    """Assign items (in the given order) to ``parts`` bins, each to the least-loaded bin (ties: lowest).

    Loads end within one item of each other: max load - min load <= the largest item."""
    bins: list[list[int]] = [[] for _ in range(parts)]
    heap = [(0, b) for b in range(parts)]
    for item, size in enumerate(sizes):
        load, b = heapq.heappop(heap)
        bins[b].append(item)
        heapq.heappush(heap, (load + size, b))
    return bins


def round_robin_counts(quotas: Sequence[int], t: int) -> list[int]:
    """Batches taken from each stream after ``t`` batches taken round-robin (stream 0, 1, ..., skipping
    streams that have yielded their quota): the order the rank's main process interleaves its workers in."""
    if t >= sum(quotas):
        return list(quotas)
    lo, hi = 0, max(quotas)  # find the number of complete rounds r: sum(min(q, r)) <= t
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if sum(min(q, mid) for q in quotas) <= t:
            lo = mid
        else:
            hi = mid - 1
    counts = [min(q, lo) for q in quotas]
    extra = t - sum(counts)
    for w, q in enumerate(quotas):
        if extra and q > lo:
            counts[w] += 1
            extra -= 1
    return counts


def round_robin_order(quotas: Sequence[int], t: int) -> Iterator[int]:
    """The stream of every batch from batch ``t`` to the end of the segment."""
    counts = round_robin_counts(quotas, t)
    n = len(quotas)
    w = next_stream(quotas, t)
    while w is not None:
        yield w
        counts[w] += 1
        w = next((v % n for v in range(w + 1, w + 1 + n) if counts[v % n] < quotas[v % n]), None)


def next_stream(quotas: Sequence[int], t: int) -> int | None:
    """The stream that yields batch ``t`` (None when the segment is complete)."""
    if t >= sum(quotas):
        return None
    before, after = round_robin_counts(quotas, t), round_robin_counts(quotas, t + 1)
    return next(w for w in range(len(quotas)) if after[w] != before[w])


def _assign(plan: SegmentPlan, pieces: list[Piece], order: Sequence[int]) -> SegmentPlan:
    """Spread ``pieces`` (taken in ``order``) over ranks, then over each rank's streams; set quotas."""
    layout = plan.layout
    ordered = [pieces[i] for i in order if pieces[i].size > 0]
    for rank_items in balance([p.size for p in ordered], layout.world_size):
        mine = [ordered[i] for i in rank_items]
        plan.ranks.append(
            [
                StreamPlan([mine[i] for i in items])
                for items in balance([p.size for p in mine], layout.streams)
            ]
        )
    plan.samples = sum(p.size for p in ordered)
    capacities = [[s.slots // layout.batch_size for s in streams] for streams in plan.ranks]
    plan.batches = min(sum(c) for c in capacities)
    for streams, caps in zip(plan.ranks, capacities, strict=True):
        for stream, quota in zip(streams, round_robin_counts(caps, plan.batches), strict=True):
            stream.quota = quota
    return plan


def first_segment(counts: Sequence[int], seed: int, epoch: int, layout: Layout) -> SegmentPlan:
    """Segment 0 of an epoch: whole shards in a permutation seeded by (seed, epoch)."""
    pieces = [Piece(s, 0, c) for s, c in enumerate(counts)]
    order = _rng(seed, epoch, _SHARD_ORDER).permutation(len(pieces))
    return _assign(SegmentPlan(seed, epoch, 0, layout), pieces, order)


def slice_pieces(pieces: Sequence[Piece], start: int, stop: int) -> list[Piece]:
    """The pieces covering slots ``start <= slot < stop`` of a stream (cut where needed)."""
    out: list[Piece] = []
    offset = 0
    for piece in pieces:
        lo, hi = max(start - offset, 0), min(stop - offset, piece.size)
        offset += piece.size
        if lo >= hi:
            continue
        if lo == 0 and hi == piece.size:
            out.append(piece)
            continue
        idx = piece.indices()[lo:hi]
        out.append(
            Piece(piece.shard, idx[0], idx[-1] + 1, tuple(i for i in piece.skip if idx[0] < i < idx[-1]))
        )
    return out


def pieces_of(samples: Sequence[tuple[int, int]]) -> list[Piece]:
    """(shard, index) pairs in reading order -> pieces (one per run of the same shard)."""
    out: list[Piece] = []
    run: list[int] = []
    for i, (shard, idx) in enumerate(samples):
        run.append(idx)
        if i + 1 == len(samples) or samples[i + 1][0] != shard:
            present = set(run)
            skip = tuple(j for j in range(run[0], run[-1] + 1) if j not in present)
            out.append(Piece(shard, run[0], run[-1] + 1, skip))
            run = []
    return out


def leftover(plan: SegmentPlan, consumed: int) -> list[Piece]:
    """Everything of the segment not yielded after every rank took ``consumed`` batches: per stream, the
    unemitted part of its current window and all slots after it (including what equalisation would drop)."""
    batch, window = plan.layout.batch_size, plan.layout.shuffle_buffer
    out: list[Piece] = []
    for rank, streams in enumerate(plan.ranks):
        counts = round_robin_counts([s.quota for s in streams], consumed)
        for w, stream in enumerate(streams):
            pos = counts[w] * batch  # slots emitted
            k, emitted = divmod(pos, window)
            current = slice_pieces(stream.pieces, k * window, (k + 1) * window)
            slots = [(p.shard, i) for p in current for i in p.indices()]
            if emitted:
                order = window_order(plan, rank, w, k, len(slots))
                slots = [slots[j] for j in sorted(order[emitted:])]
            out += pieces_of(slots)
            out += slice_pieces(stream.pieces, (k + 1) * window, stream.slots)
    return out


def segment_plan(
    counts: Sequence[int], seed: int, epoch: int, layouts: Sequence[Layout], consumed: Sequence[int]
) -> SegmentPlan:
    """The plan of the epoch's current (last) segment: ``layouts[k]`` ran ``consumed[k]`` batches per rank
    before the layout changed (``len(consumed) == len(layouts) - 1``)."""
    plan = first_segment(counts, seed, epoch, layouts[0])
    for k, layout in enumerate(layouts[1:], start=1):
        pieces = leftover(plan, consumed[k - 1])
        order = _rng(seed, epoch, k, _PIECE_ORDER).permutation(len(pieces))
        plan = _assign(SegmentPlan(seed, epoch, k, layout), pieces, order)
    return plan
