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
    use_kl: bool = False,
    sigma_small: bool = False,
    predict_xstart: bool = False,
    learn_sigma: bool = True,
    rescale_learned_sigmas: bool = False,
    diffusion_steps: int = 1000,
) -> SpacedDiffusion:
    """Build the diffusion the way DiT / Latte do.

    Args:
        timestep_respacing: "" or None for all ``diffusion_steps``; otherwise a ``space_timesteps`` spec
            such as "250" or "ddim50" (used for sampling).
        noise_schedule: "linear" or "squaredcos_cap_v2".
        use_kl: train on the rescaled variational bound (LossType.RESCALED_KL, as in DiT / Latte).
        sigma_small: with fixed variance, use the posterior variance instead of beta_t.
        predict_xstart: the model predicts x_0 instead of the noise.
        learn_sigma: the model also outputs variance values (LEARNED_RANGE), so its output has 2C channels.
        rescale_learned_sigmas: use LossType.RESCALED_MSE instead of MSE.
        diffusion_steps: length of the base process.

    Returns:
        a ``SpacedDiffusion`` over the kept timesteps.
    """
    betas = get_named_beta_schedule(noise_schedule, diffusion_steps)
    if use_kl:
        loss_type = LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = LossType.RESCALED_MSE
    else:
        loss_type = LossType.MSE
    if learn_sigma:
        var_type = ModelVarType.LEARNED_RANGE
    else:
        var_type = ModelVarType.FIXED_SMALL if sigma_small else ModelVarType.FIXED_LARGE
    spacing: str | list[int] = timestep_respacing if timestep_respacing else [diffusion_steps]
    return SpacedDiffusion(
        use_timesteps=space_timesteps(diffusion_steps, spacing),
        betas=betas,
        model_mean_type=ModelMeanType.START_X if predict_xstart else ModelMeanType.EPSILON,
        model_var_type=var_type,
        loss_type=loss_type,
    )
