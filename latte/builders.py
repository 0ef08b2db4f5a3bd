"""From a resolved ``Config`` to the objects it describes: the Latte model and the diffusion processes."""

from __future__ import annotations

import dataclasses

import torch

import latte.models.attention as attention_kernels
from latte.config import Config, ConfigError, resolved_arch
from latte.diffusion import create_diffusion
from latte.models import Latte


def build_model(cfg: Config) -> Latte:
    """The Latte model the config describes (fp32 parameters; precision is the training engine's business)."""
    m = cfg.model
    model = Latte(
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
    if m.compile:
        compile_blocks(model)
    return model


def compile_blocks(model: torch.nn.Module, backend: str = "inductor") -> None:
    """Regional ``torch.compile`` (as torchtitan compiles per block): each transformer block's forward is
    compiled on its own, so the graphs stay small, the two block kinds (spatial, temporal) compile once each,
    and the module tree, its hooks (DeepSpeed ZeRO-3's gathers) and state-dict keys stay as they are."""
    for block in model.blocks:
        block.forward = torch.compile(block.forward, backend=backend)


def attention_line(cfg: Config, device: torch.device, dtype: torch.dtype) -> str:
    """The one line saying which attention kernel the model runs on ``device``/``dtype`` and why faster ones
    were not taken; a ``ConfigError`` when ``model.attention`` names a kernel that cannot run on CUDA."""
    arch = resolved_arch(cfg)
    heads = arch.num_heads
    try:
        return attention_kernels.report(cfg.model.attention, device, dtype, arch.hidden_size // heads, heads)
    except RuntimeError as exc:
        raise ConfigError(f"model.attention: {exc}") from None


def build_diffusion(cfg: Config, sampling: bool = False):
    """The training diffusion (``timestep_respacing``) or, with ``sampling``, the respaced sampling one."""
    d = cfg.diffusion
    return create_diffusion(
        timestep_respacing=d.sampling_steps if sampling else d.timestep_respacing,
        noise_schedule=d.noise_schedule,
        learn_sigma=cfg.model.learn_sigma,
        diffusion_steps=d.diffusion_steps,
    )
