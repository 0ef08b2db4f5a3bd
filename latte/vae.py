"""The diffusers ``AutoencoderKL``: loading it (shared by the sharding job and sampling) and decoding latents.

Stored and sampled latents are ``posterior * scaling_factor``; ``decode`` divides by the factor exactly once.
Which factor applies is decided by the caller (the config, the dataset index or the VAE's own config).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from latte.errors import first_line
from latte.precision import DTYPES

log = logging.getLogger(__name__)


class VaeError(RuntimeError):
    """A VAE that cannot be loaded or used; one line naming it."""


def resolve_dtype(device: torch.device, name: str = "auto") -> torch.dtype:
    """``auto``: fp32 on CPU; bf16 on a GPU that supports it, else fp16."""
    if name != "auto":
        return DTYPES[name]
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _subfolder(vae_id: str, subfolder: str | None) -> str | None:
    """A local pipeline directory (``DIR/vae/config.json``, no ``DIR/config.json``) means its ``vae``."""
    if subfolder is not None:
        return subfolder or None
    root = Path(vae_id)
    if root.is_dir() and not (root / "config.json").is_file() and (root / "vae" / "config.json").is_file():
        return "vae"
    return None


def load_autoencoder(
    vae_id: str, device: str | torch.device = "cpu", dtype: str = "auto", subfolder: str | None = None
) -> tuple[torch.nn.Module, torch.dtype]:
    """``AutoencoderKL`` from a local directory or hub id, in eval mode on ``device``, and the dtype it runs
    in (fp32 instead of fp16 when its config asks for ``force_upcast``). Raises ``VaeError`` with one line."""
    from diffusers import AutoencoderKL

    device = torch.device(device)
    torch_dtype = resolve_dtype(device, dtype)
    try:
        vae = AutoencoderKL.from_pretrained(
            vae_id, subfolder=_subfolder(vae_id, subfolder), torch_dtype=torch_dtype, low_cpu_mem_usage=False
        )
    except Exception as exc:  # diffusers/hub raise OSError, ValueError, HTTP errors...
        raise VaeError(f"cannot load the VAE '{vae_id}': {first_line(exc)}") from None
    if torch_dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        log.warning("VAE %s asks for fp32 (force_upcast: it overflows in fp16); running it in fp32", vae_id)
        torch_dtype = torch.float32
        vae = vae.float()
    return vae.to(device).eval().requires_grad_(False), torch_dtype


@torch.no_grad()
def decode(
    vae: torch.nn.Module, latents: torch.Tensor, scaling_factor: float, batch_frames: int = 16
) -> np.ndarray:
    """Scaled latents (F, C, h, w) -> video frames (F, H, W, 3) uint8, decoding ``batch_frames`` at a time.

    The VAE decodes ``latents / scaling_factor``; its [-1, 1] output is mapped to [0, 255] and rounded.
    """
    param = next(vae.parameters())
    frames = []
    for chunk in latents.split(batch_frames):
        pixels = vae.decode((chunk / scaling_factor).to(param.device, param.dtype)).sample  # (f, 3, H, W)
        pixels = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        frames.append(pixels.permute(0, 2, 3, 1).cpu())  # (f, 3, H, W) -> (f, H, W, 3)
    return torch.cat(frames).numpy()
