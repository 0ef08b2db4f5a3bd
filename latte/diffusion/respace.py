"""Timestep respacing: run a diffusion on a subset of the original process's timesteps."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from .gaussian_diffusion import GaussianDiffusion, ModelFn

__all__ = ["SpacedDiffusion", "space_timesteps"]


def space_timesteps(num_timesteps: int, section_counts: str | Sequence[int]) -> set[int]:
    """Pick which timesteps of an ``num_timesteps``-step process to keep.

    The process is cut into ``len(section_counts)`` near-equal sections and each section is strided
    (fractional stride, rounded) to the requested number of steps: for 300 steps and "10,15,20" the first
    100 steps give 10, the next 100 give 15 and the last 100 give 20. The string "ddimN" instead uses the
    DDIM paper's integer stride, ``range(0, num_timesteps, stride)``, choosing the smallest stride that gives
    exactly N steps.

    Args:
        section_counts: a list of ints, a comma-separated string such as "250" or "10,10,10", or "ddimN".

    Returns:
        the set of kept timestep indices of the original process.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired_count = int(section_counts[len("ddim") :])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired_count:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(f"cannot create exactly {desired_count} steps with an integer stride")
        section_counts = [int(x) for x in section_counts.split(",")]
    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start_idx = 0
    all_steps: list[int] = []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < section_count:
            raise ValueError(f"cannot divide section of {size} steps into {section_count}")
        frac_stride = 1.0 if section_count <= 1 else (size - 1) / (section_count - 1)
        cur_idx = 0.0
        for _ in range(section_count):
            all_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        start_idx += size
    return set(all_steps)


class _WrappedModel:
    """Calls the model with the ORIGINAL timestep index of each respaced index (no rescaling)."""

    def __init__(self, model: ModelFn, timestep_map: Sequence[int], original_num_steps: int) -> None:
        self.model = model
        self.timestep_map = list(timestep_map)
        self.original_num_steps = original_num_steps
        self._maps: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}  # one host copy per device

    def __call__(self, x: torch.Tensor, ts: torch.Tensor, **kwargs: Any) -> Any:
        key = (ts.device, ts.dtype)
        if key not in self._maps:
            self._maps[key] = torch.tensor(self.timestep_map, device=ts.device, dtype=ts.dtype)
        return self.model(x, self._maps[key][ts], **kwargs)


class SpacedDiffusion(GaussianDiffusion):
    """A diffusion that keeps only ``use_timesteps`` of a base process.

    New betas are recomputed from the base alphas_cumprod at the kept steps, so alphas_cumprod of this
    process equals the base's at those steps. Any model passed in is wrapped so that it sees original
    timestep indices (as it was trained with); timesteps are not rescaled.

    Args:
        use_timesteps: timesteps of the base process to keep.
        **kwargs: arguments of ``GaussianDiffusion`` for the base process (``betas`` is the full schedule).
    """

    def __init__(self, use_timesteps: Iterable[int], **kwargs: Any) -> None:
        self.use_timesteps = set(use_timesteps)
        self.timestep_map: list[int] = []
        self.original_num_steps = len(kwargs["betas"])

        base = GaussianDiffusion(**kwargs)
        last_alpha_cumprod = 1.0
        new_betas = []
        for i, alpha_cumprod in enumerate(base.alphas_cumprod):
            if i in self.use_timesteps:
                new_betas.append(1.0 - alpha_cumprod / last_alpha_cumprod)
                last_alpha_cumprod = alpha_cumprod
                self.timestep_map.append(i)
        kwargs["betas"] = np.array(new_betas, dtype=np.float64)
        super().__init__(**kwargs)

    def p_mean_variance(self, model: ModelFn, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """``GaussianDiffusion.p_mean_variance`` with the model seeing original timesteps."""
        return super().p_mean_variance(self._wrap_model(model), *args, **kwargs)

    def training_losses(self, model: ModelFn, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """``GaussianDiffusion.training_losses`` with the model seeing original timesteps."""
        return super().training_losses(self._wrap_model(model), *args, **kwargs)

    def _wrap_model(self, model: ModelFn) -> _WrappedModel:
        if isinstance(model, _WrappedModel):
            return model
        return _WrappedModel(model, self.timestep_map, self.original_num_steps)
