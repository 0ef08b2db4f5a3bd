"""Validation loss while training: the training objective on fixed held-out clips, at fixed timesteps, with
fixed noise, for the raw and the EMA weights.

    clips = open_validation_set(cfg, data.facts)  # (data_pipeline.sources) read once, before building
    validator = Validator(cfg, world, conditioning, clips)
    if validator.due(done):
        results = validator.run(training)  # {"raw": ValidationResult, "ema": ValidationResult}; a collective

What is computed: every clip of a fixed set (``data_pipeline.validation_set.ValidationSet``: the first
``train.val_clips`` readable samples of ``data.val_index``, in index order) at each of ``K =
train.val_buckets`` timesteps, the centres of K equal buckets of [0, T): ``t_k = floor((k + 1/2) T / K)``
(50, 150, ..., 950 for T = 1000, K = 10, the evenly spaced evaluation timesteps Open-Sora reports). The noise
of (clip, k) is seeded by the clip's place in the set and k, the latent's posterior draw by its sample id (see
``validation_set``), and nothing is dropped (no label or caption dropout): the values are a function of the
weights and the dataset. Reported per bucket and as the mean over buckets: ``loss`` (the training objective:
MSE, + the VB term when the model learns sigma, as ``diffusion.training_losses``) and ``mse``.

World-size independence: clip i is evaluated on rank i % W, its K timesteps in chunks of twice
``train.micro_batch_size`` (a forward without a backward stores no activations; every forward's batch is the
same whatever W), and the per-bucket sums are accumulated in float64 and all-reduced. Ranks with fewer clips
evaluate a padding clip at weight 0, so that every rank runs the same number of forwards (ZeRO-3 gathers
parameters collectively in each).

Exact resume is untouched: no RNG state is read or advanced (every draw has its own generator, and the EMA's
evaluation copy of the model is built under a forked RNG), and training's data stream is not involved.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from latte import lora
from latte.config import Config
from latte.precision import call_in
from latte.seeding import sample_seed

NOISE_SEED = 1  # the noise of (clip i, bucket k): sample_seed(NOISE_SEED, k, i)


class ClipSet(Protocol):
    """The fixed validation clips (``data_pipeline.validation_set.ValidationSet``)."""

    index_url: str
    skipped: int  # unreadable samples passed over

    def __len__(self) -> int: ...

    def batch(self, positions: Sequence[int]) -> dict[str, Any]:
        """The clips at ``positions`` as a batch: ``latent`` (n, F, C, h, w) float32, labels, captions."""
        ...


def bucket_timesteps(num_timesteps: int, buckets: int) -> list[int]:
    """The centre timestep of each of ``buckets`` equal buckets of [0, num_timesteps)."""
    return [int((k + 0.5) * num_timesteps / buckets) for k in range(buckets)]


@dataclass
class ValidationResult:
    timesteps: list[int]  # the bucket centres
    loss: list[float]  # the training objective per bucket, mean over the clips
    mse: list[float]  # its MSE term per bucket
    clips: int

    @property
    def mean_loss(self) -> float:
        return math.fsum(self.loss) / len(self.loss)

    @property
    def mean_mse(self) -> float:
        return math.fsum(self.mse) / len(self.mse)

    def scalars(self, prefix: str) -> dict[str, float]:
        """TensorBoard scalars ``{prefix}/loss``, ``{prefix}/mse`` and per bucket ``{prefix}/loss_t050``."""
        out = {f"{prefix}/loss": self.mean_loss, f"{prefix}/mse": self.mean_mse}
        width = len(str(max(self.timesteps)))
        out.update(
            {f"{prefix}/loss_t{t:0{width}d}": v for t, v in zip(self.timesteps, self.loss, strict=True)}
        )
        return out


def _repeat(batch: dict[str, Any], times: int) -> dict[str, Any]:
    """A one-sample batch's tensors repeated ``times`` along the batch dimension."""
    return {k: v.expand(times, *v.shape[1:]) for k, v in batch.items() if isinstance(v, torch.Tensor)}


def _noise(shape: torch.Size, position: int, k: int) -> torch.Tensor:
    """The noise of bucket ``k`` of clip ``position`` (CPU fp32: the same on any device)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(sample_seed(NOISE_SEED, k, position)))


@torch.no_grad()
def validation_loss(
    model_fn: Callable[..., torch.Tensor],
    diffusion,
    conditioning,
    vset: ClipSet,
    rank: int,
    world_size: int,
    device: torch.device,
    buckets: int = 10,
    batch_size: int = 10,
    copies: int = 1,
) -> ValidationResult:
    """The validation loss of ``model_fn`` (called as the diffusion calls a model) on ``vset``: every rank
    calls it (a collective when there is more than one) and gets the same result. ``rank``/``world_size``:
    the data-parallel place; ``copies``: ranks that compute each clip together (sequence parallelism)."""
    timesteps = bucket_timesteps(diffusion.num_timesteps, buckets)
    sums = torch.zeros(2, buckets, dtype=torch.float64, device=device)  # (loss, mse) x bucket
    per_rank = -(-len(vset) // world_size)  # every rank runs as many clips (padding at weight 0)
    for j in range(per_rank):
        position = j * world_size + rank
        weight = 1.0 if position < len(vset) else 0.0
        position = position if weight else 0
        clip = vset.batch([position])
        x0 = clip["latent"].to(device)  # (1, F, C, h, w)
        kwargs = conditioning.training_kwargs(clip, device, None)
        for first in range(0, buckets, batch_size):
            ks = list(range(first, min(first + batch_size, buckets)))
            noise = torch.stack([_noise(x0.shape[1:], position, k) for k in ks]).to(device)  # (n, F, C, h, w)
            t = torch.tensor([timesteps[k] for k in ks], device=device)  # (n,)
            x = x0.expand(len(ks), *x0.shape[1:])  # (n, F, C, h, w)
            terms = diffusion.training_losses(model_fn, x, t, _repeat(kwargs, len(ks)), noise=noise)
            sums[0, ks] += weight * terms["loss"].double()
            sums[1, ks] += weight * terms["mse"].double()
    if world_size * copies > 1:
        torch.distributed.all_reduce(sums)
        sums /= copies  # (exact: each group's P ranks hold the same sums)
    means = (sums / len(vset)).cpu().tolist()
    return ValidationResult(timesteps, means[0], means[1], len(vset))


class Validator:
    """The validation loss of a training run (``train.val_every``, ``data.val_index``), raw and EMA."""

    def __init__(self, cfg: Config, world, conditioning, vset: ClipSet, place=None) -> None:
        """``place``: the rank's data-parallel place (``latte.parallel.sequence.DataPlace``; None: the
        world's ranks are the data-parallel ranks)."""
        self.cfg, self.world, self.conditioning, self.vset = cfg, world, conditioning, vset
        self.place = place
        self._ema_net: torch.nn.Module | None = None

    def due(self, done: int) -> bool:
        """After ``done`` steps: every ``train.val_every`` steps, and at the last one."""
        return done % self.cfg.train.val_every == 0 or done == self.cfg.train.max_steps

    def describe(self) -> str:
        skipped = f", {self.vset.skipped} unreadable skipped" if self.vset.skipped else ""
        t = self.cfg.train
        return (
            f"validation: {len(self.vset)} clips of {self.vset.index_url}{skipped} x {t.val_buckets} "
            f"timesteps, every {t.val_every} steps (raw and EMA weights)"
        )

    def run(self, tr) -> dict[str, ValidationResult]:
        """The raw and the EMA weights' validation losses of ``tr`` (a ``latte.training.Training``); a
        collective: every rank calls it."""
        w, t_cfg = self.world, self.cfg.train
        rank, world_size, sequence = w.rank, w.world_size, None
        if self.place is not None:
            rank, world_size, sequence = self.place.rank, self.place.world_size, self.place.sequence
        extra = {} if sequence is None else {"sequence": sequence}
        args = (tr.diffusion, self.conditioning, self.vset, rank, world_size, w.device)
        sizes = {"buckets": t_cfg.val_buckets, "batch_size": 2 * t_cfg.micro_batch_size}
        sizes["copies"] = sequence.size if sequence is not None else 1
        module = tr.engine.module
        module.eval()  # (LoRA dropout off; the models have no other train-time behaviour)
        try:
            raw = validation_loss(lambda x, t, **kw: tr.model_fn(x, t, **extra, **kw), *args, **sizes)
        finally:
            module.train()
        net = self._ema_module(tr.compute_dtype)
        # the full EMA, gathered from every rank's shard (LoRA: the adapters' EMA on the frozen base)
        lora.load_trained(net, tr.ema.consolidate(), "the consolidated EMA")
        ema_fn = lambda x, t, **kw: call_in(net, tr.compute_dtype, x, t, **extra, **kw)  # noqa: E731
        ema = validation_loss(ema_fn, *args, **sizes)
        return {"raw": raw, "ema": ema}

    def _ema_module(self, dtype: torch.dtype) -> torch.nn.Module:
        """A plain copy of the model for the EMA weights, in the engine's compute dtype (built once, under a
        forked RNG so that training's random state is not advanced)."""
        if self._ema_net is None:
            from latte.builders import build_model

            # LoRA: the EMA holds the adapters, the base is init_from's; otherwise every weight is the EMA's
            init_from = self.cfg.model.init_from if lora.enabled(self.cfg.model.lora) else ""
            model_cfg = dataclasses.replace(self.cfg.model, init_from=init_from, compile=False)
            cfg = dataclasses.replace(self.cfg, model=model_cfg)
            devices = [self.world.device] if self.world.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                net = build_model(cfg)
            self._ema_net = net.to(self.world.device, dtype).requires_grad_(False).eval()
        return self._ema_net


def format_results(step: int, results: dict[str, ValidationResult], seconds: float) -> str:
    """The console line of one evaluation."""
    parts = [f"{name} loss {r.mean_loss:.4f} mse {r.mean_mse:.4f}" for name, r in results.items()]
    ema = results.get("ema") or next(iter(results.values()))
    per_t = " ".join(f"{t}:{v:.4f}" for t, v in zip(ema.timesteps, ema.loss, strict=True))
    return f"val step {step:>7d} | " + " | ".join(parts) + f" | ema loss by t {per_t} | {seconds:.1f} s"
