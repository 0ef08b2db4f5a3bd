"""From a resolved ``Config`` to the objects it describes: the Latte model and the diffusion processes."""

from __future__ import annotations

import dataclasses

import torch

import latte.models.attention as attention_kernels
from latte import lora
from latte.base_weights import read_base
from latte.config import Config, ConfigError, caption_channels_of, resolved_arch
from latte.diffusion import create_diffusion
from latte.errors import first_line
from latte.models import Latte, LatteT2V
from latte.models.diffusers_io import check_state_dict


def build_model(cfg: Config, base_weights: bool = True) -> Latte | LatteT2V:
    """The model the config describes (fp32 parameters; precision is the training engine's business): the
    class-conditional/unconditional ``Latte``, or for a text-to-video flavor ``LatteT2V``; its weights come
    from ``model.init_from`` when it is set (``base_weights=False``: not read, e.g. to compare shapes), and
    with ``model.lora`` LoRA adapters are added and everything else frozen (``latte.lora``)."""
    m = cfg.model
    model = build_t2v(cfg) if caption_channels_of(m) else _build_latte(cfg)
    if m.init_from and base_weights:
        load_base(model, m.init_from)
    if lora.enabled(m.lora):
        model = lora.add_adapters(model, m.lora)
    if m.compile:
        compile_blocks(model)
    return model


def load_base(model: Latte | LatteT2V, init_from: str) -> None:
    """``model.init_from``'s weights into ``model`` (strictly; one ConfigError line naming what differs)."""
    weights = read_base(init_from)
    try:
        check_state_dict(model, weights, f"the weights of '{init_from}'")
    except ValueError as exc:
        raise ConfigError(f"model.init_from: {first_line(exc)}") from None
    model.load_state_dict({k: v.float() for k, v in weights.items()}, strict=True)


def build_t2v(cfg: Config) -> LatteT2V:
    m, arch = cfg.model, resolved_arch(cfg)
    model = LatteT2V(
        input_size=cfg.data.latent_size,
        patch_size=arch.patch_size,
        in_channels=m.in_channels,
        out_channels=m.in_channels * (2 if m.learn_sigma else 1),
        hidden_size=arch.hidden_size,
        num_layers=arch.num_layers,
        num_heads=arch.num_heads,
        caption_channels=arch.caption_channels,
        num_frames=cfg.data.num_frames,
        attention=m.attention,
        gradient_checkpointing=m.gradient_checkpointing,
    )
    return model


def _build_latte(cfg: Config) -> Latte:
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
    return model


def compile_blocks(model: torch.nn.Module, backend: str = "inductor") -> None:
    """Regional ``torch.compile`` (as torchtitan compiles per block): each transformer block's forward is
    compiled on its own, so the graphs stay small, the two block kinds (spatial, temporal) compile once each,
    and the module tree, its hooks (DeepSpeed ZeRO-3's gathers) and state-dict keys stay as they are."""
    blocks = (
        [*model.transformer_blocks, *model.temporal_transformer_blocks]
        if isinstance(model, LatteT2V)
        else model.blocks
    )
    for block in blocks:
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
