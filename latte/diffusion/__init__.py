"""IDDPM Gaussian diffusion for 5-D video latents (N, F, C, H, W), numerically matching DiT / Latte."""

from __future__ import annotations

from .gaussian_diffusion import (
    GaussianDiffusion,
    KnownFrames,
    LossType,
    ModelMeanType,
    ModelVarType,
    mean_flat,
)
from .likelihoods import approx_standard_normal_cdf, discretized_gaussian_log_likelihood, normal_kl
from .respace import SpacedDiffusion, space_timesteps
from .schedules import betas_for_alpha_bar, get_beta_schedule, get_named_beta_schedule

__all__ = [
    "GaussianDiffusion",
    "KnownFrames",
    "LossType",
    "ModelMeanType",
    "ModelVarType",
    "SpacedDiffusion",
    "approx_standard_normal_cdf",
    "betas_for_alpha_bar",
    "create_diffusion",
    "discretized_gaussian_log_likelihood",
    "get_beta_schedule",
    "get_named_beta_schedule",
    "mean_flat",
    "normal_kl",
    "space_timesteps",
]


def create_diffusion(
    timestep_respacing: str | None = "",
    noise_schedule: str = "linear",
    learn_sigma: bool = True,
    diffusion_steps: int = 1000,
) -> SpacedDiffusion:
    """Build the diffusion the way DiT / Latte do: the model predicts the noise and trains on its MSE.

    Args:
        timestep_respacing: "" or None for all ``diffusion_steps``; otherwise a ``space_timesteps`` spec
            such as "250" or "ddim50" (used for sampling).
        noise_schedule: "linear" or "squaredcos_cap_v2".
        learn_sigma: the model also outputs variance values (LEARNED_RANGE, trained by the VB term), so its
            output has 2C channels; without it the variance is beta_t (FIXED_LARGE).
        diffusion_steps: length of the base process.

    Returns:
        a ``SpacedDiffusion`` over the kept timesteps.
    """
    betas = get_named_beta_schedule(noise_schedule, diffusion_steps)
    spacing: str | list[int] = timestep_respacing if timestep_respacing else [diffusion_steps]
    return SpacedDiffusion(
        use_timesteps=space_timesteps(diffusion_steps, spacing),
        betas=betas,
        model_mean_type=ModelMeanType.EPSILON,
        model_var_type=ModelVarType.LEARNED_RANGE if learn_sigma else ModelVarType.FIXED_LARGE,
        loss_type=LossType.MSE,
    )
