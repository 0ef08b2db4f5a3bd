"""From a resolved ``Config`` to the objects it describes: the Latte model and the diffusion processes."""

from __future__ import annotations

import dataclasses

from latte.config import Config, resolved_arch
from latte.diffusion import create_diffusion
from latte.models import Latte


def build_model(cfg: Config) -> Latte:
    """The Latte model the config describes (fp32 parameters; precision is the training engine's business)."""
    m = cfg.model
    return Latte(
        input_size=cfg.data.latent_size,
        in_channels=m.in_channels,
        num_frames=cfg.data.num_frames,
        num_classes=m.num_classes,
        learn_sigma=m.learn_sigma,
        class_dropout_prob=m.class_dropout_prob,
        attention=m.attention,
        gradient_checkpointing=m.gradient_checkpointing,
        **dataclasses.asdict(resolved_arch(cfg)),
    )


def build_diffusion(cfg: Config, sampling: bool = False):
    """The training diffusion (``timestep_respacing``) or, with ``sampling``, the respaced sampling one."""
    d = cfg.diffusion
    return create_diffusion(
        timestep_respacing=d.sampling_steps if sampling else d.timestep_respacing,
        noise_schedule=d.noise_schedule,
        learn_sigma=cfg.model.learn_sigma,
        diffusion_steps=d.diffusion_steps,
    )
