"""Gaussian diffusion (Ho et al. 2020; Nichol & Dhariwal 2021) for video latents.

Tensors are 5-D, ``x`` of shape (N, F, C, H, W): batch, frames, channels, height, width. The model is called
as ``model(x_t, t, **model_kwargs)`` and returns (N, F, C, H, W), or (N, F, 2C, H, W) when it also predicts
variance values; those two halves are split along the channel dim, dim 2.

The numerics follow the improved-DDPM / DiT / Latte reference exactly: every schedule array is float64 numpy,
and a per-timestep value is gathered on the timesteps' device, cast to float32 and broadcast by appending
singleton dims (``_extract_into_tensor``), so released Latte checkpoints train and sample identically.
"""

from __future__ import annotations

import enum
import math
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .likelihoods import discretized_gaussian_log_likelihood, normal_kl

__all__ = [
    "CHANNEL_DIM",
    "GaussianDiffusion",
    "KnownFrames",
    "LossType",
    "ModelMeanType",
    "ModelVarType",
    "mean_flat",
]

#: Channel dim of the 5-D (N, F, C, H, W) latents; learned-variance outputs are split along it.
CHANNEL_DIM = 2

#: ``model(x, t, **kwargs)``: a tensor, or a tuple whose first element is the tensor.
ModelFn = Callable[..., Any]

#: One generator for the batch, or one per sample (row i's noise from generator i), or None (global RNG).
Generators = torch.Generator | Sequence[torch.Generator] | None


class ModelMeanType(enum.Enum):
    """What the network's (first C channels of) output predict."""

    PREVIOUS_X = enum.auto()  # x_{t-1}
    EPSILON = enum.auto()  # the noise (Latte / DiT)


class ModelVarType(enum.Enum):
    """Where the reverse-process variance comes from.

    LEARNED_RANGE (Latte / DiT, ``learn_sigma``): the model outputs v in [-1, 1] that interpolates (in log
    space) between the posterior variance (FIXED_SMALL) and beta_t (FIXED_LARGE, without ``learn_sigma``).
    """

    FIXED_SMALL = enum.auto()
    FIXED_LARGE = enum.auto()
    LEARNED_RANGE = enum.auto()


class LossType(enum.Enum):
    """Training objective: the one Latte / DiT train with."""

    MSE = enum.auto()  # MSE on the mean prediction (+ VB term when variance is learned)


def mean_flat(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over all non-batch dims. Returns a tensor of shape (N,)."""
    return tensor.mean(dim=list(range(1, tensor.ndim)))


def _extract_into_tensor(
    arr: np.ndarray, timesteps: torch.Tensor, broadcast_shape: Sequence[int]
) -> torch.Tensor:
    """Gather ``arr[timesteps]`` and broadcast it against ``broadcast_shape``.

    The float64 array is moved to the timesteps' device, indexed, cast to float32, then given trailing
    singleton dims (N,) -> (N, 1, 1, 1, 1) and expanded by adding zeros of ``broadcast_shape``.

    Returns:
        float32 tensor of shape ``broadcast_shape``.
    """
    res = _on_device(arr, timesteps.device)[timesteps].float()
    while res.ndim < len(broadcast_shape):
        res = res[..., None]
    return res + torch.zeros(tuple(broadcast_shape), device=timesteps.device)


# float64 copies of the schedule arrays per device: id(array) -> (weak reference to it, {device: tensor}).
# Copying an array host -> device on every call was a blocking transfer, about a dozen per training step.
_DEVICE_COPIES: dict[int, tuple[weakref.ref, dict[torch.device, torch.Tensor]]] = {}


def _on_device(arr: np.ndarray, device: torch.device) -> torch.Tensor:
    """``torch.from_numpy(arr)`` on ``device`` (float64, the same bits), copied once per array and device.
    The entry lives as long as the array (a temporary array's entry goes with it)."""
    entry = _DEVICE_COPIES.get(id(arr))
    if entry is None or entry[0]() is not arr:  # new, or another array reusing a freed one's id
        key = id(arr)
        entry = (weakref.ref(arr, lambda _ref, key=key, table=_DEVICE_COPIES: table.pop(key, None)), {})
        _DEVICE_COPIES[key] = entry
    copies = entry[1]
    if device not in copies:
        copies[device] = torch.from_numpy(arr).to(device=device)
    return copies[device]


def _randn(
    shape: Sequence[int], generator: Generators, dtype: torch.dtype | None, device: torch.device | None
) -> torch.Tensor:
    """Standard normal noise of ``shape``, from ``generator``; with one generator per sample, row i comes from
    generator i alone, so a sample's noise does not depend on which other samples share its batch."""
    if isinstance(generator, Sequence):
        assert len(generator) == shape[0], f"{len(generator)} generators for a batch of {shape[0]}"
        rows = [torch.randn(tuple(shape[1:]), generator=g, dtype=dtype, device=device) for g in generator]
        return torch.stack(rows)  # N x (F, C, H, W) -> (N, F, C, H, W)
    return torch.randn(tuple(shape), generator=generator, dtype=dtype, device=device)


def _randn_like(x: torch.Tensor, generator: Generators) -> torch.Tensor:
    """Standard normal noise of x's shape, dtype and device, drawn from ``generator`` if one is given."""
    return _randn(x.shape, generator, x.dtype, x.device)


@dataclass(frozen=True)
class KnownFrames:
    """Frames of x_0 that sampling holds fixed: conditioning by replacement (Ho et al. 2022, "Video Diffusion
    Models", sec. 3.1), e.g. the frames a new clip shares with the previous one.

    Before each denoising step at t, the known frames of x_t are replaced by a fresh draw from q(x_t | x_0) of
    their values, so the model sees them at the noise level it expects and denoises the unknown frames
    consistently with them; after the last step they are set to the values themselves.
    """

    x0: torch.Tensor  # (N, F, C, H, W) clean values; only the frames in ``mask`` are read
    mask: torch.Tensor  # (F,) bool, True = known frame

    def put(self, values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x with its known frames taken from ``values`` (both (N, F, C, H, W))."""
        mask = self.mask.to(x.device).view(1, -1, 1, 1, 1)  # (F,) -> (1, F, 1, 1, 1)
        return torch.where(mask, values, x)


def _split_learned_variance(model_output: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a (N, F, 2C, H, W) output into the mean part and the variance values, each (N, F, C, H, W)."""
    assert x.ndim == 5, f"expected 5-D (N, F, C, H, W) input, got shape {tuple(x.shape)}"
    n, f, c = x.shape[:3]
    expected = (n, f, 2 * c, *x.shape[3:])
    assert model_output.shape == expected, (
        f"learned-variance model output must be {expected}, got {tuple(model_output.shape)}"
    )
    # (N, F, 2C, H, W) -> 2 x (N, F, C, H, W)
    mean_part, var_values = torch.split(model_output, c, dim=CHANNEL_DIM)
    return mean_part, var_values


def _first(output: Any) -> tuple[torch.Tensor, Any]:
    """Return (tensor, extra) for a model output that may be a (tensor, extra) tuple."""
    if isinstance(output, tuple):
        return output[0], (output[1] if len(output) > 1 else None)
    return output, None


def _infer_device(model: ModelFn, noise: torch.Tensor | None, device: Any) -> torch.device:
    """Pick the sampling device: explicit > initial noise > model (or bound method's owner) params > CPU."""
    if device is not None:
        return torch.device(device)
    if noise is not None:
        return noise.device
    owner = getattr(model, "__self__", model)  # e.g. ``model.forward_with_cfg`` -> ``model``
    for candidate in (model, owner):
        if isinstance(candidate, torch.nn.Module):
            param = next(candidate.parameters(), None)
            if param is not None:
                return param.device
    return torch.device("cpu")


class GaussianDiffusion:
    """Training losses and samplers for a discrete-time Gaussian diffusion.

    Args:
        betas: 1-D array of betas for timesteps 0 .. T-1 (kept in float64).
        model_mean_type: what the model's output predicts.
        model_var_type: how the reverse-process variance is obtained.
        loss_type: the training objective.
    """

    def __init__(
        self,
        *,
        betas: np.ndarray | Sequence[float],
        model_mean_type: ModelMeanType,
        model_var_type: ModelVarType,
        loss_type: LossType,
    ) -> None:
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type

        betas = np.array(betas, dtype=np.float64)
        assert betas.ndim == 1, "betas must be 1-D"
        assert (betas > 0).all() and (betas <= 1).all(), "betas must lie in (0, 1]"
        self.betas = betas
        self.num_timesteps = int(betas.shape[0])

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas, axis=0)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        assert self.alphas_cumprod_prev.shape == (self.num_timesteps,)

        # q(x_t | x_0) and its inversions.
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)

        # Posterior q(x_{t-1} | x_t, x_0).
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at t = 0, so its log is clipped by reusing the t = 1 value there.
        if self.num_timesteps > 1:
            self.posterior_log_variance_clipped = np.log(
                np.append(self.posterior_variance[1], self.posterior_variance[1:])
            )
        else:
            self.posterior_log_variance_clipped = np.array([])
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        )
        # Reverse-process variances as arrays, not rebuilt per call (each array's device copy is cached).
        self.log_betas = np.log(betas)
        # FIXED_LARGE: beta_t, except at t = 0 where the posterior variance of t = 1 gives a better decoder
        # NLL (one step: beta itself).
        large = np.append(self.posterior_variance[1], betas[1:]) if len(betas) > 1 else betas
        self.fixed_large_variance = large
        self.fixed_large_log_variance = np.log(self.fixed_large_variance)

    # ------------------------------------------------------------------ forward process

    def q_mean_variance(
        self, x_start: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Distribution q(x_t | x_0).

        Returns:
            (mean, variance, log_variance), each of x_start's shape.
        """
        mean = _extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
        variance = _extract_into_tensor(1.0 - self.alphas_cumprod, t, x_start.shape)
        log_variance = _extract_into_tensor(self.log_one_minus_alphas_cumprod, t, x_start.shape)
        return mean, variance, log_variance

    def q_sample(
        self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0) = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise.

        Returns:
            tensor of x_start's shape.
        """
        if noise is None:
            noise = torch.randn_like(x_start)
        assert noise.shape == x_start.shape
        return (
            _extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
            + _extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise
        )

    def q_posterior_mean_variance(
        self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Posterior q(x_{t-1} | x_t, x_0).

        Returns:
            (posterior_mean, posterior_variance, posterior_log_variance_clipped), each of x_t's shape.
        """
        assert x_start.shape == x_t.shape
        mean = (
            _extract_into_tensor(self.posterior_mean_coef1, t, x_t.shape) * x_start
            + _extract_into_tensor(self.posterior_mean_coef2, t, x_t.shape) * x_t
        )
        variance = _extract_into_tensor(self.posterior_variance, t, x_t.shape)
        log_variance_clipped = _extract_into_tensor(self.posterior_log_variance_clipped, t, x_t.shape)
        assert mean.shape[0] == variance.shape[0] == log_variance_clipped.shape[0] == x_start.shape[0]
        return mean, variance, log_variance_clipped

    # ------------------------------------------------------------------ reverse process

    def p_mean_variance(
        self,
        model: ModelFn,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        model_kwargs: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Run the model to get p(x_{t-1} | x_t) and a prediction of x_0.

        Args:
            x: (N, F, C, H, W) tensor at step t.
            t: (N,) integer timesteps.
            clip_denoised: clamp the x_0 prediction to [-1, 1].
            denoised_fn: applied to the x_0 prediction before clipping.

        Returns:
            dict with "mean", "variance", "log_variance", "pred_xstart" (tensors of x's shape; the variance
            ones are broadcast to it) and "extra" (the second element of a tuple model output, else None).
        """
        if model_kwargs is None:
            model_kwargs = {}
        n = x.shape[0]
        assert t.shape == (n,), f"t must have shape ({n},), got {tuple(t.shape)}"
        model_output, extra = _first(model(x, t, **model_kwargs))

        if self.model_var_type == ModelVarType.LEARNED_RANGE:
            model_output, model_var_values = _split_learned_variance(model_output, x)
            min_log = _extract_into_tensor(self.posterior_log_variance_clipped, t, x.shape)
            max_log = _extract_into_tensor(self.log_betas, t, x.shape)
            frac = (model_var_values + 1) / 2  # [-1, 1] -> [0, 1], from min_var to max_var
            model_log_variance = frac * max_log + (1 - frac) * min_log
            model_variance = torch.exp(model_log_variance)
        else:
            if self.model_var_type == ModelVarType.FIXED_LARGE:
                var_arr, log_var_arr = self.fixed_large_variance, self.fixed_large_log_variance
            else:
                var_arr, log_var_arr = self.posterior_variance, self.posterior_log_variance_clipped
            model_variance = _extract_into_tensor(var_arr, t, x.shape)
            model_log_variance = _extract_into_tensor(log_var_arr, t, x.shape)

        def process_xstart(x0: torch.Tensor) -> torch.Tensor:
            if denoised_fn is not None:
                x0 = denoised_fn(x0)
            return x0.clamp(-1, 1) if clip_denoised else x0

        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            pred_xstart = process_xstart(self._predict_xstart_from_xprev(x_t=x, t=t, xprev=model_output))
            model_mean = model_output
        else:
            pred_xstart = process_xstart(self._predict_xstart_from_eps(x_t=x, t=t, eps=model_output))
            model_mean, _, _ = self.q_posterior_mean_variance(x_start=pred_xstart, x_t=x, t=t)

        assert model_mean.shape == model_log_variance.shape == pred_xstart.shape == x.shape
        return {
            "mean": model_mean,
            "variance": model_variance,
            "log_variance": model_log_variance,
            "pred_xstart": pred_xstart,
            "extra": extra,
        }

    def _predict_xstart_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_0 = x_t / sqrt(abar_t) - sqrt(1 / abar_t - 1) eps. Returns a tensor of x_t's shape."""
        assert x_t.shape == eps.shape
        return (
            _extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
            - _extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps
        )

    def _predict_xstart_from_xprev(
        self, x_t: torch.Tensor, t: torch.Tensor, xprev: torch.Tensor
    ) -> torch.Tensor:
        """Invert the posterior mean: x_0 = (x_{t-1} - coef2 x_t) / coef1. Returns a tensor of x_t's shape."""
        assert x_t.shape == xprev.shape
        return (
            _extract_into_tensor(1.0 / self.posterior_mean_coef1, t, x_t.shape) * xprev
            - _extract_into_tensor(self.posterior_mean_coef2 / self.posterior_mean_coef1, t, x_t.shape) * x_t
        )

    def _predict_eps_from_xstart(
        self, x_t: torch.Tensor, t: torch.Tensor, pred_xstart: torch.Tensor
    ) -> torch.Tensor:
        """eps = (x_t / sqrt(abar_t) - x_0) / sqrt(1 / abar_t - 1). Returns a tensor of x_t's shape."""
        return (
            _extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - pred_xstart
        ) / _extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape)

    # ------------------------------------------------------------------ ancestral sampling

    def p_sample(
        self,
        model: ModelFn,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        model_kwargs: dict[str, Any] | None = None,
        generator: Generators = None,
    ) -> dict[str, torch.Tensor]:
        """Draw x_{t-1} ~ p(x_{t-1} | x_t); no noise is added where t == 0.

        Returns:
            dict with "sample" and "pred_xstart", both of x's shape.
        """
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs
        )
        noise = _randn_like(x, generator)
        # (N,) -> (N, 1, 1, 1, 1): 0 where t == 0, else 1.
        nonzero_mask = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))
        sample = out["mean"] + nonzero_mask * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def p_sample_loop(
        self,
        model: ModelFn,
        shape: Sequence[int],
        noise: torch.Tensor | None = None,
        clip_denoised: bool = True,
        denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        model_kwargs: dict[str, Any] | None = None,
        device: torch.device | str | None = None,
        progress: bool = False,
        generator: Generators = None,
        known: KnownFrames | None = None,
    ) -> torch.Tensor:
        """Ancestral sampling through every timestep of this diffusion.

        Args:
            shape: sample shape (N, F, C, H, W).
            noise: initial x_T; drawn from ``generator`` when None.
            device: where samples live; defaults to the noise's, then the model's device, then CPU.
            progress: show a tqdm bar.
            generator: used for every noise draw, so a seeded generator makes sampling deterministic; a list
                of generators, one per sample, makes each sample's noise independent of its batch.
            known: frames of x_0 to hold fixed (``KnownFrames``), e.g. to extend a video; None = none.

        Returns:
            the final samples, a tensor of ``shape`` (no autograd graph).
        """
        steps = self.p_sample_loop_progressive(
            model,
            shape,
            noise,
            clip_denoised,
            denoised_fn,
            model_kwargs,
            device,
            progress,
            generator,
            known=known,
        )
        return _last_sample(steps)

    def _timestep_iter(self, progress: bool) -> Iterator[int]:
        """Timesteps T-1, ..., 0, wrapped in a tqdm bar if asked."""
        indices = range(self.num_timesteps - 1, -1, -1)
        if progress:
            return iter(tqdm(indices))
        return iter(indices)

    def _progressive(
        self,
        step: Callable[..., dict[str, torch.Tensor]],
        model: ModelFn,
        shape: Sequence[int],
        noise: torch.Tensor | None,
        device: torch.device | str | None,
        progress: bool,
        generator: Generators,
        step_kwargs: dict[str, Any],
        known: KnownFrames | None = None,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """The shared sampling loop: x_T (given or drawn), then ``step`` from t = T-1 down to 0, yielding each
        step's output dict. ``known`` frames are put in at every step's noise level and, clean, at the end."""
        assert isinstance(shape, (tuple, list, torch.Size)), "shape must be a tuple or list"
        dev = _infer_device(model, noise, device)
        img = noise if noise is not None else _randn(shape, generator, None, dev)
        for i in self._timestep_iter(progress):
            t = torch.full((shape[0],), i, device=dev)  # a fill on the device, no host copy
            with torch.no_grad():
                if known is not None:  # the known frames as the forward process has them at t (fresh noise)
                    img = known.put(self.q_sample(known.x0, t, noise=_randn_like(known.x0, generator)), img)
                out = step(model, img, t, generator=generator, **step_kwargs)
            if known is not None and i == 0:
                out = {**out, "sample": known.put(known.x0, out["sample"])}
            yield out
            img = out["sample"]

    def p_sample_loop_progressive(
        self,
        model: ModelFn,
        shape: Sequence[int],
        noise: torch.Tensor | None = None,
        clip_denoised: bool = True,
        denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        model_kwargs: dict[str, Any] | None = None,
        device: torch.device | str | None = None,
        progress: bool = False,
        generator: Generators = None,
        known: KnownFrames | None = None,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Like ``p_sample_loop`` but yields each step's ``p_sample`` output dict, from t = T-1 down to 0."""
        step_kwargs = dict(clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs)
        return self._progressive(
            self.p_sample, model, shape, noise, device, progress, generator, step_kwargs, known
        )

    # ------------------------------------------------------------------ DDIM sampling

    def ddim_sample(
        self,
        model: ModelFn,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        model_kwargs: dict[str, Any] | None = None,
        eta: float = 0.0,
        generator: Generators = None,
    ) -> dict[str, torch.Tensor]:
        """One DDIM step x_t -> x_{t-1} (Song et al. 2021, eq. 12); eta = 0 is deterministic.

        Returns:
            dict with "sample" and "pred_xstart", both of x's shape.
        """
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs
        )
        # Re-derive eps from x_0 so that x_0- and x_{t-1}-predicting models work too.
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar = _extract_into_tensor(self.alphas_cumprod, t, x.shape)
        alpha_bar_prev = _extract_into_tensor(self.alphas_cumprod_prev, t, x.shape)
        sigma = (
            eta
            * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar))
            * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        )
        noise = _randn_like(x, generator)
        mean_pred = (
            out["pred_xstart"] * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma**2) * eps
        )
        # (N,) -> (N, 1, 1, 1, 1): 0 where t == 0, else 1.
        nonzero_mask = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))
        sample = mean_pred + nonzero_mask * sigma * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_sample_loop(
        self,
        model: ModelFn,
        shape: Sequence[int],
        noise: torch.Tensor | None = None,
        clip_denoised: bool = True,
        denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        model_kwargs: dict[str, Any] | None = None,
        device: torch.device | str | None = None,
        progress: bool = False,
        eta: float = 0.0,
        generator: Generators = None,
        known: KnownFrames | None = None,
    ) -> torch.Tensor:
        """DDIM sampling through every timestep of this diffusion (respace it for fewer steps).

        Arguments are those of ``p_sample_loop`` plus ``eta`` (0 = deterministic DDIM, 1 = DDPM-like).

        Returns:
            the final samples, a tensor of ``shape`` (no autograd graph).
        """
        steps = self.ddim_sample_loop_progressive(
            model,
            shape,
            noise,
            clip_denoised,
            denoised_fn,
            model_kwargs,
            device,
            progress,
            eta,
            generator,
            known=known,
        )
        return _last_sample(steps)

    def ddim_sample_loop_progressive(
        self,
        model: ModelFn,
        shape: Sequence[int],
        noise: torch.Tensor | None = None,
        clip_denoised: bool = True,
        denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        model_kwargs: dict[str, Any] | None = None,
        device: torch.device | str | None = None,
        progress: bool = False,
        eta: float = 0.0,
        generator: Generators = None,
        known: KnownFrames | None = None,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Like ``ddim_sample_loop`` but yields each step's ``ddim_sample`` output dict."""
        step_kwargs = dict(
            clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs, eta=eta
        )
        return self._progressive(
            self.ddim_sample, model, shape, noise, device, progress, generator, step_kwargs, known
        )

    # ------------------------------------------------------------------ losses

    def _vb_terms_bpd(
        self,
        model: ModelFn,
        x_start: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        model_kwargs: dict[str, Any] | None = None,
    ) -> dict[str, torch.Tensor]:
        """One term of the variational bound, in bits per dim.

        Returns:
            dict with "output", an (N,) tensor holding the decoder NLL -log p(x_0 | x_1) where t == 0 and
            KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) elsewhere, and "pred_xstart" of x_start's shape.
        """
        true_mean, _, true_log_variance_clipped = self.q_posterior_mean_variance(
            x_start=x_start, x_t=x_t, t=t
        )
        out = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        kl = normal_kl(true_mean, true_log_variance_clipped, out["mean"], out["log_variance"])
        kl = mean_flat(kl) / math.log(2.0)

        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )
        assert decoder_nll.shape == x_start.shape
        decoder_nll = mean_flat(decoder_nll) / math.log(2.0)

        output = torch.where(t == 0, decoder_nll, kl)
        return {"output": output, "pred_xstart": out["pred_xstart"]}

    def training_losses(
        self,
        model: ModelFn,
        x_start: torch.Tensor,
        t: torch.Tensor,
        model_kwargs: dict[str, Any] | None = None,
        noise: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Training losses for one timestep per sample.

        Args:
            x_start: clean latents (N, F, C, H, W).
            t: (N,) timestep indices.
            noise: the Gaussian noise used to make x_t; drawn with ``torch.randn_like`` when None.

        Returns:
            dict of (N,) tensors: "loss" and "mse", and "vb" when the variance is learned (then
            loss = mse + vb).
        """
        if model_kwargs is None:
            model_kwargs = {}
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)

        terms: dict[str, torch.Tensor] = {}
        model_output, _ = _first(model(x_t, t, **model_kwargs))

        if self.model_var_type == ModelVarType.LEARNED_RANGE:
            model_output, model_var_values = _split_learned_variance(model_output, x_t)
            # The VB term trains only the variance: it sees a detached mean and the live variance values.
            # 2 x (N, F, C, H, W) -> (N, F, 2C, H, W)
            frozen_out = torch.cat([model_output.detach(), model_var_values], dim=CHANNEL_DIM)

            def frozen_model(*_args: Any, **_kwargs: Any) -> torch.Tensor:
                return frozen_out

            terms["vb"] = self._vb_terms_bpd(
                model=frozen_model, x_start=x_start, x_t=x_t, t=t, clip_denoised=False
            )["output"]

        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            target = self.q_posterior_mean_variance(x_start=x_start, x_t=x_t, t=t)[0]
        else:
            target = noise
        assert model_output.shape == target.shape == x_start.shape
        terms["mse"] = mean_flat((target - model_output) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms


def _last_sample(steps: Iterator[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Run a progressive sampling loop to its end; the final ``sample``."""
    final = None
    for final in steps:  # noqa: B007 - only the last step's output is kept
        pass
    assert final is not None, "diffusion has no timesteps"
    return final["sample"]
