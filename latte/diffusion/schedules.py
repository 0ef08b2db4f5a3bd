"""Beta schedules for the forward (noising) process.

All schedules are returned as 1-D float64 numpy arrays: the diffusion keeps its schedule arrays in float64
and only casts the per-timestep values it needs to float32 when it applies them to tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

__all__ = ["betas_for_alpha_bar", "get_beta_schedule", "get_named_beta_schedule"]


def betas_for_alpha_bar(
    num_diffusion_timesteps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999
) -> np.ndarray:
    """Discretise a continuous cumulative-alpha function ``alpha_bar(t)``, t in [0, 1], into betas.

    beta_i = 1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), capped at ``max_beta`` so the last steps
    never become singular.

    Returns:
        float64 array of shape (num_diffusion_timesteps,).
    """
    betas = []
    for i in range(num_diffusion_timesteps):
        t1 = i / num_diffusion_timesteps
        t2 = (i + 1) / num_diffusion_timesteps
        betas.append(min(1.0 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.array(betas, dtype=np.float64)


def _warmup_betas(
    beta_start: float, beta_end: float, num_diffusion_timesteps: int, warmup_frac: float
) -> np.ndarray:
    """Constant ``beta_end`` after a linear warm-up over the first ``warmup_frac`` of the steps."""
    betas = beta_end * np.ones(num_diffusion_timesteps, dtype=np.float64)
    warmup_time = int(num_diffusion_timesteps * warmup_frac)
    betas[:warmup_time] = np.linspace(beta_start, beta_end, warmup_time, dtype=np.float64)
    return betas


def get_beta_schedule(
    beta_schedule: str, *, beta_start: float, beta_end: float, num_diffusion_timesteps: int
) -> np.ndarray:
    """Parametric beta schedules from the original DDPM code base.

    Args:
        beta_schedule: one of "linear", "quad", "warmup10", "warmup50", "const", "jsd".

    Returns:
        float64 array of shape (num_diffusion_timesteps,).
    """
    n = num_diffusion_timesteps
    if beta_schedule == "linear":
        betas = np.linspace(beta_start, beta_end, n, dtype=np.float64)
    elif beta_schedule == "quad":
        betas = np.linspace(beta_start**0.5, beta_end**0.5, n, dtype=np.float64) ** 2
    elif beta_schedule == "warmup10":
        betas = _warmup_betas(beta_start, beta_end, n, 0.1)
    elif beta_schedule == "warmup50":
        betas = _warmup_betas(beta_start, beta_end, n, 0.5)
    elif beta_schedule == "const":
        betas = beta_end * np.ones(n, dtype=np.float64)
    elif beta_schedule == "jsd":  # 1/T, 1/(T-1), ..., 1
        betas = 1.0 / np.linspace(n, 1, n, dtype=np.float64)
    else:
        raise NotImplementedError(f"unknown beta schedule: {beta_schedule}")
    assert betas.shape == (n,)
    return betas


def _cosine_alpha_bar(t: float) -> float:
    """Nichol & Dhariwal's cosine cumulative alpha with offset s = 0.008."""
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def get_named_beta_schedule(schedule_name: str, num_diffusion_timesteps: int) -> np.ndarray:
    """Named schedules that stay comparable as the number of steps changes.

    - "linear": Ho et al.'s 1e-4 .. 0.02 over 1000 steps, both endpoints scaled by 1000 / T.
    - "squaredcos_cap_v2" (alias "cosine"): the improved-DDPM cosine schedule, betas capped at 0.999.

    Returns:
        float64 array of shape (num_diffusion_timesteps,).
    """
    if schedule_name == "linear":
        scale = 1000 / num_diffusion_timesteps
        return get_beta_schedule(
            "linear",
            beta_start=scale * 0.0001,
            beta_end=scale * 0.02,
            num_diffusion_timesteps=num_diffusion_timesteps,
        )
    if schedule_name in ("squaredcos_cap_v2", "cosine"):
        return betas_for_alpha_bar(num_diffusion_timesteps, _cosine_alpha_bar, max_beta=0.999)
    raise NotImplementedError(f"unknown beta schedule: {schedule_name}")
