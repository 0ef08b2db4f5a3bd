"""Sequence parallelism for Latte (DSP, Zhao et al. 2024): P ranks share each sample.

Latte's spatial blocks attend within a frame and its temporal blocks across frames at one token position, so
nothing inside a block needs another rank when the spatial blocks see whole frames and the temporal blocks
whole frame sequences. ``SequenceShard`` is what the model is given (``Latte.forward(..., sequence=)``):
rank r of the group holds frames ``[r F/P, (r + 1) F/P)`` of every sample in the spatial blocks, and token
positions ``[r T/P, (r + 1) T/P)`` of all F frames in the temporal blocks; one all-to-all switches between
the two before and after each temporal block. The model's output is gathered back to all F frames on every
rank.

Gradients: the all-to-all's backward is the inverse all-to-all; the gather's backward keeps this rank's
frames of the output gradient, which is right when every rank of the group computes the same loss from the
gathered output (the same samples and per-sample draws). Each rank's parameter gradients are then its part
of the sample's gradient: the group's sum is the whole of it.

The model module never imports ``torch.distributed``; this file holds the communication.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


def _all_to_all(x: Tensor, group) -> Tensor:
    """(P, ...) -> (P, ...): chunk j goes to rank j; chunk j of the result came from rank j."""
    x = x.contiguous()
    out = torch.empty_like(x)  # (contiguous like x: the collective writes the buffer in order)
    dist.all_to_all_single(out, x, group=group)
    return out


class _Switch(torch.autograd.Function):
    """One all-to-all between the two layouts: with ``to_tokens``, (N, F/P, T, D) this rank's frames ->
    (N, F, T/P, D) this rank's token positions of every frame; else the inverse. Its backward is the switch
    the other way."""

    @staticmethod
    def forward(ctx, x: Tensor, shard: SequenceShard, to_tokens: bool) -> Tensor:
        ctx.shard, ctx.to_tokens = shard, to_tokens
        return shard._frames_to_tokens(x) if to_tokens else shard._tokens_to_frames(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        shard = ctx.shard
        return (shard._tokens_to_frames(grad) if ctx.to_tokens else shard._frames_to_tokens(grad)), None, None


class _GatherFrames(torch.autograd.Function):
    """(N, F/P, ...) -> (N, F, ...) on every rank; backward: this rank's frames of the gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, shard: SequenceShard) -> Tensor:
        ctx.shard = shard
        x = x.contiguous()
        parts = [
            torch.empty_like(x) for _ in range(shard.size)
        ]  # (contiguous like x, as the collective needs)
        dist.all_gather(parts, x, group=shard.group)
        return torch.cat(parts, dim=1)  # (N, F, ...), frames in rank order

    @staticmethod
    def backward(ctx, grad: Tensor):
        shard = ctx.shard
        return grad.narrow(1, shard.rank * (grad.shape[1] // shard.size), grad.shape[1] // shard.size), None


@dataclass(frozen=True, eq=False)
class SequenceShard:
    """This rank's place in its sequence-parallel group: ``size`` P ranks, ``rank`` r in it, the process
    ``group`` (None: the default group)."""

    size: int
    rank: int
    group: object = None

    def check(self, frames: int, tokens: int, images: int = 0) -> None:
        """F, T (and K images) must split evenly over the group (one line naming which does not)."""
        for what, n in (("frames", frames), ("tokens per frame", tokens), ("images", images)):
            if n % self.size:
                raise ValueError(
                    f"sequence parallelism over {self.size} ranks needs {what} divisible by {self.size}, "
                    f"got {n}"
                )

    def part(self, total: int) -> slice:
        """This rank's slice of ``total`` frames (or token positions)."""
        n = total // self.size
        return slice(self.rank * n, (self.rank + 1) * n)

    def to_tokens(self, x: Tensor) -> Tensor:
        return _Switch.apply(x, self, True)

    def to_frames(self, x: Tensor) -> Tensor:
        return _Switch.apply(x, self, False)

    def gather_frames(self, x: Tensor) -> Tensor:
        return _GatherFrames.apply(x, self)

    def gather_frames_then_images(self, x: Tensor, images: int) -> Tensor:
        """(N, F/P + K/P, ...) this rank's frames then its ``images`` K/P images -> (N, F + K, ...) on every
        rank: all F frames in order, then all K images (video-image joint training)."""
        if not images:
            return self.gather_frames(x)
        out = self.gather_frames(x)  # (N, P (F/P + K/P), ...): each rank's frames, then its images
        per_rank = out.unflatten(1, (self.size, x.shape[1]))  # (N, P, F/P + K/P, ...)
        frames = x.shape[1] - images
        return torch.cat(
            [per_rank[:, :, :frames].flatten(1, 2), per_rank[:, :, frames:].flatten(1, 2)], dim=1
        )

    def _frames_to_tokens(self, x: Tensor) -> Tensor:
        n, fl, t, d = x.shape
        p = self.size
        chunks = x.reshape(n, fl, p, t // p, d).permute(2, 0, 1, 3, 4)  # (P, N, F/P, T/P, D): to rank j
        got = _all_to_all(chunks, self.group)  # (P, N, F/P, T/P, D): rank j's frames of my tokens
        return got.permute(1, 0, 2, 3, 4).reshape(n, p * fl, t // p, d)  # (N, F, T/P, D)

    def _tokens_to_frames(self, x: Tensor) -> Tensor:
        n, f, tl, d = x.shape
        p = self.size
        chunks = x.reshape(n, p, f // p, tl, d).permute(1, 0, 2, 3, 4)  # (P, N, F/P, T/P, D): to rank j
        got = _all_to_all(chunks, self.group)  # (P, N, F/P, T/P, D): rank j's tokens of my frames
        return got.permute(1, 2, 0, 3, 4).reshape(n, f // p, p * tl, d)  # (N, F/P, T, D)


def check_divides(world_size: int, size: int) -> None:
    """Groups of ``size`` ranks must tile the world (a ValueError naming both otherwise)."""
    if size < 1 or world_size % size:
        raise ValueError(f"sequence parallelism over {size} ranks does not divide the {world_size} ranks")


def sequence_groups(size: int, backend: str | None = None) -> SequenceShard:
    """Split the world into groups of ``size`` consecutive ranks (a collective: every rank calls it) and
    return this rank's shard; ``size`` must divide the world size. ``backend``: the groups' (default: the
    default group's; sampling's default group is gloo, its CUDA tensors need "nccl")."""
    world, rank = dist.get_world_size(), dist.get_rank()
    check_divides(world, size)
    mine = None
    for start in range(0, world, size):
        group = dist.new_group(list(range(start, start + size)), backend=backend)  # every rank, every group
        if start <= rank < start + size:
            mine = group
    return SequenceShard(size, rank % size, mine)


@dataclass(frozen=True)
class DataPlace:
    """Where a rank's samples come from under sequence parallelism: its group is one data-parallel rank."""

    rank: int  # the data-parallel rank (the group's index)
    world_size: int  # the data-parallel size (groups)
    sequence: SequenceShard | None  # None: sequence parallelism off


def data_place(rank: int, world_size: int, size: int, backend: str | None = None) -> DataPlace:
    """Rank ``rank`` of ``world_size`` with groups of ``size`` consecutive ranks (size > 1 creates the process
    groups: a collective every rank makes)."""
    check_divides(world_size, size)
    shard = sequence_groups(size, backend) if size > 1 else None
    return DataPlace(rank // size, world_size // size, shard)
