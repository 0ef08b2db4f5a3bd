"""The VAE side of the sharding job: load a diffusers ``AutoencoderKL``, encode frames to scaled posteriors.

Stored latents are ``posterior.mean * scaling_factor`` and ``posterior.std * scaling_factor``: the factor is
applied here, exactly once, and recorded in the dataset index; training draws ``mean + std * eps`` from the
stored pair, and decoding divides by the index's factor. The factor comes from ``vae.config.scaling_factor``
(0.18215 for the SD VAEs, and diffusers' default for a random config) unless overridden.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from latte.vae import VaeError, load_autoencoder, resolve_dtype

__all__ = ["LatentEncoder", "VaeError", "load_vae", "resolve_dtype"]


@dataclass
class LatentEncoder:
    """An ``AutoencoderKL`` in eval mode on one device, encoding frames in batches of ``batch_frames``."""

    vae: torch.nn.Module
    scaling_factor: float
    device: torch.device
    dtype: torch.dtype
    batch_frames: int = 32

    def __str__(self) -> str:
        return f"VAE on {self.device} ({self.dtype}), scaling factor {self.scaling_factor:g}"

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def downsample(self) -> int:
        """Pixels per latent cell along each side (8 for the SD VAEs)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def latent_shape(self, num_frames: int, image_size: int) -> list[int]:
        """(F, C, h, w) of one clip's latent; ``image_size`` must be a multiple of ``downsample``."""
        if image_size % self.downsample:
            raise VaeError(
                f"image size {image_size} is not a multiple of the VAE's downsampling {self.downsample}"
            )
        side = image_size // self.downsample
        return [num_frames, self.latent_channels, side, side]

    @torch.no_grad()
    def encode(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, S, S) in [-1, 1] -> (mean * sf, std * sf), each (N, C, S/d, S/d) float32 on the CPU.

        The posterior's mean and std are taken from its raw moments in fp32 (not in the encode dtype), so
        a bf16 encode loses nothing beyond the bf16 network itself.
        """
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        means, stds = [], []
        for chunk in frames.split(self.batch_frames):
            x = chunk.to(self.device, self.dtype, non_blocking=True)
            moments = self.vae.encode(x).latent_dist.parameters.float()  # (n, 2C, h, w): mean, logvar
            posterior = DiagonalGaussianDistribution(moments)
            means.append((posterior.mean * self.scaling_factor).cpu())
            stds.append((posterior.std * self.scaling_factor).cpu())
        return torch.cat(means), torch.cat(stds)

    def encode_clips(self, pixels: torch.Tensor, flip: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(K, F, 3, S, S) clips -> scaled mean, std as (K', F, C, h, w) float16 arrays; with ``flip``
        K' = 2K, each mirrored clip right after its original. A video's frames are encoded together, in
        batches that depend only on the video, so its latents do not depend on what else the job does."""
        if flip:
            pixels = torch.stack([pixels, pixels.flip(-1)], dim=1)  # (K, 2, F, 3, S, S)
            pixels = pixels.flatten(0, 1)  # (K, 2, F, 3, S, S) -> (2K, F, 3, S, S)
        clips, frames = pixels.shape[:2]
        mean, std = self.encode(pixels.flatten(0, 1))  # (K'F, 3, S, S) -> (K'F, C, h, w)
        mean = mean.reshape(clips, frames, *mean.shape[1:])  # (K'F, C, h, w) -> (K', F, C, h, w)
        std = std.reshape(clips, frames, *std.shape[1:])  # (K'F, C, h, w) -> (K', F, C, h, w)
        return mean.half().numpy(), std.half().numpy()


def load_vae(
    vae_id: str,
    device: str | torch.device = "cpu",
    dtype: str = "auto",
    scaling_factor: float | None = None,
    subfolder: str | None = None,
    batch_frames: int = 32,
) -> LatentEncoder:
    """Load ``AutoencoderKL`` from a local directory or hub id; ``scaling_factor`` overrides the config's.

    Raises ``VaeError`` with one line if it cannot be loaded.
    """
    device = torch.device(device)
    vae, torch_dtype = load_autoencoder(vae_id, device, dtype, subfolder)
    factor = float(scaling_factor if scaling_factor is not None else vae.config.scaling_factor)
    return LatentEncoder(vae, factor, device, torch_dtype, batch_frames)
