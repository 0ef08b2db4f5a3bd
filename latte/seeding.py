"""Per-sample randomness of a training step: a function of (seed, step, global sample index) alone.

Every random draw that shapes what a training sample contributes (its timestep, its noise, whether its label
is dropped) comes from a generator seeded by the sample's place in the global batch, not from a rank's RNG
state. So any layout of one global batch (2 ranks x b, 1 rank x 2b, accumulation) trains on identical draws,
a resumed run needs no RNG state for them, and each rank draws only its own samples (drawing the whole
global batch on every rank cost ~2 GB of noise per step at 1024 GPUs).

Index ``j`` of step ``s`` is the j-th sample of that step's global batch, in the order the data is split:
micro-batch ``a`` of rank ``r`` holds ``[(a * world + r) * micro, (a * world + r + 1) * micro)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_MASK64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def sample_seed(seed: int, step: int, index: int) -> int:
    """A 63-bit seed for sample ``index`` of step ``step``'s global batch (distinct inputs give unrelated
    seeds: no two (step, index) pairs collide the way ``seed * K + step`` arithmetic can)."""
    h = splitmix64(seed & _MASK64)
    h = splitmix64(h ^ (step & _MASK64))
    return splitmix64(h ^ (index & _MASK64)) >> 1


def mix_seed(seed: int, k: int) -> int:
    """The seed of stream ``k`` of a run seeded ``seed`` (sample ``k``'s noise in sampling, epoch ``k``'s
    shuffle and step ``k``'s synthetic batch in the data pipeline): ``seed * 1_000_003 + k``. Unlike
    ``sample_seed`` it is plain arithmetic, kept because the streams it seeds are part of reproducible
    outputs (sampled videos, shuffle orders)."""
    return seed * 1_000_003 + k


def batch_indices(step_micro: int, rank: int, world_size: int, micro: int) -> range:
    """The global-batch indices of micro-batch ``step_micro`` (0 .. accumulation - 1) on ``rank``."""
    start = (step_micro * world_size + rank) * micro
    return range(start, start + micro)


@dataclass
class SampleDraws:
    """t (B,), noise (B, *shape) and label-dropout flags (B,) of the samples ``indices`` of step ``step``."""

    t: torch.Tensor
    noise: torch.Tensor
    drop: torch.Tensor | None  # int64, 1 = replace the label by the null class; None without dropout
    image_drop: torch.Tensor | None = None  # (B,) int64, the same for the sample's K images; None: no images
    # each sample's seed (``sample_seed``): what other per-sample draws (LoRA dropout) derive from
    seeds: tuple[int, ...] = ()


class TrainingDraws:
    """Draws per global sample on ``device`` (generators are reused: re-seeding one costs no allocation).

    ``shape`` is what one sample's noise covers: (F + K, C, h, w) in video-image joint training. With
    ``images`` (joint training with K > 0 images per clip) and dropout, each sample also draws one dropout
    flag for its K images (as the original drops a sample's image labels together), after the clip's: a run
    without images draws exactly what it drew before."""

    def __init__(
        self,
        seed: int,
        num_timesteps: int,
        shape: tuple[int, ...],
        device: torch.device,
        drop_prob: float = 0.0,
        images: bool = False,
    ) -> None:
        self.seed, self.num_timesteps, self.shape = seed, num_timesteps, tuple(shape)
        self.device, self.drop_prob, self.images = device, drop_prob, images
        self._generators: list[torch.Generator] = []

    def __call__(self, step: int, indices: range) -> SampleDraws:
        while len(self._generators) < len(indices):
            self._generators.append(torch.Generator(device=self.device))
        ts, noises, drops, image_drops = [], [], [], []
        seeds = tuple(sample_seed(self.seed, step, index) for index in indices)
        for g, seed in zip(self._generators, seeds, strict=False):
            g.manual_seed(seed)
            # order matters (it fixes the streams): timestep, noise, then the dropout draw
            ts.append(torch.randint(0, self.num_timesteps, (1,), generator=g, device=self.device))
            noises.append(torch.randn(self.shape, generator=g, device=self.device))
            if self.drop_prob > 0:
                drops.append(torch.rand((1,), generator=g, device=self.device))
                if self.images:
                    image_drops.append(torch.rand((1,), generator=g, device=self.device))
        drop = (torch.cat(drops) < self.drop_prob).long() if drops else None  # (B,)
        image_drop = (torch.cat(image_drops) < self.drop_prob).long() if image_drops else None  # (B,)
        return SampleDraws(torch.cat(ts), torch.stack(noises), drop, image_drop, seeds)  # (B,), (B, *shape)
