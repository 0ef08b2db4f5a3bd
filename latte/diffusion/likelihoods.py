"""Gaussian KL divergence and the discretised Gaussian likelihood used by the variational bound."""

from __future__ import annotations

import math

import torch

__all__ = ["approx_standard_normal_cdf", "discretized_gaussian_log_likelihood", "normal_kl"]


def normal_kl(
    mean1: torch.Tensor | float,
    logvar1: torch.Tensor | float,
    mean2: torch.Tensor | float,
    logvar2: torch.Tensor | float,
) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats.

    Any argument may be a Python float as long as at least one is a tensor; shapes broadcast.

    Returns:
        tensor of the broadcast shape of the inputs.
    """
    ref = next((a for a in (mean1, logvar1, mean2, logvar2) if isinstance(a, torch.Tensor)), None)
    assert ref is not None, "normal_kl needs at least one tensor argument"
    # Scalar log-variances become tensors so torch.exp can be applied to them.
    lv1 = logvar1 if isinstance(logvar1, torch.Tensor) else torch.tensor(logvar1).to(ref)
    lv2 = logvar2 if isinstance(logvar2, torch.Tensor) else torch.tensor(logvar2).to(ref)
    return 0.5 * (-1.0 + lv2 - lv1 + torch.exp(lv1 - lv2) + ((mean1 - mean2) ** 2) * torch.exp(-lv2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Fast tanh approximation of the standard normal CDF (the one the reference code uses).

    Returns:
        tensor of x's shape with values in [0, 1].
    """
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, *, means: torch.Tensor, log_scales: torch.Tensor
) -> torch.Tensor:
    """Log-likelihood of data in [-1, 1] quantised to 8 bits (256 bins of width 2/255) under a Gaussian.

    The lowest bin (x < -0.999) takes the whole left tail and the highest (x > 0.999) the whole right tail,
    so the probabilities of the 256 bins sum to one. Log arguments are clamped at 1e-12.

    Args:
        x: target values, already scaled to [-1, 1].
        means: Gaussian means, same shape as x.
        log_scales: log standard deviations, same shape as x.

    Returns:
        tensor of x's shape with log-probabilities in nats.
    """
    assert x.shape == means.shape == log_scales.shape, (x.shape, means.shape, log_scales.shape)
    centered_x = x - means
    inv_stdv = torch.exp(-log_scales)
    half_bin = 1.0 / 255.0
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered_x + half_bin))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered_x - half_bin))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    log_probs = torch.where(
        x < -0.999,
        log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta),
    )
    assert log_probs.shape == x.shape
    return log_probs
