"""Input embeddings of Latte: patches, diffusion timesteps, class labels, fixed sin-cos positions."""

from __future__ import annotations

import math

import numpy as np
import torch
from einops import rearrange
from torch import Tensor, nn


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches of a latent frame -> tokens (``proj``, as in the checkpoints)."""

    def __init__(self, input_size: int, patch_size: int, in_channels: int, hidden_size: int) -> None:
        super().__init__()
        self.grid_size = input_size // patch_size
        self.num_patches = self.grid_size**2
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x)  # (B, C, H, W) -> (B, D, H/p, W/p)
        # Contiguous: the residual stream starts here, and a channel-first view (stride(-1) == T) would make
        # every block's LayerNorm copy and every add stride.
        return rearrange(x, "b d h w -> b (h w) d").contiguous()  # (B, T, D), T = (H/p)(W/p) row-major


def timestep_frequencies(dim: int, max_period: float = 10000.0) -> Tensor:
    """(dim // 2,) float32 frequencies of the sinusoidal timestep features, computed on the CPU (as GLIDE/DiT
    compute them, so the values are the reference's bits on every device)."""
    half = dim // 2
    return torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)


class TimestepEmbedder(nn.Module):
    """Diffusion step t -> vector: sinusoidal frequencies (cos first, as GLIDE/DiT) through a 2-layer MLP.

    The frequencies are a non-persistent buffer: built once, moved with the module (no host-to-device copy
    per step), absent from the state dict, and kept fp32 when the module is cast to bf16/fp16 (a DeepSpeed
    engine casts the whole module): ``_apply`` rebuilds them on the new device from the float32 values.
    """

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256) -> None:
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.register_buffer("freqs", timestep_frequencies(frequency_embedding_size), persistent=False)

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        if self.freqs.dtype != torch.float32:  # a cast: the exact fp32 values again, on the new device
            self.freqs = timestep_frequencies(self.frequency_embedding_size).to(self.freqs.device)
        return self

    @staticmethod
    def timestep_embedding(
        t: Tensor, dim: int, max_period: float = 10000.0, freqs: Tensor | None = None
    ) -> Tensor:
        """(N,) possibly fractional timesteps -> (N, dim) float32 [cos | sin] features. ``freqs``: the
        precomputed ``timestep_frequencies(dim, max_period)`` on t's device (else built here)."""
        if freqs is None:
            freqs = timestep_frequencies(dim, max_period).to(device=t.device)  # (half,)
        args = t[:, None].float() * freqs[None]  # (N, half)
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, 2*half)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t: Tensor) -> Tensor:
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size, freqs=self.freqs)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))  # (N, D)


class LabelEmbedder(nn.Module):
    """Class label -> vector, with label dropout for classifier-free guidance.

    With ``dropout_prob > 0`` the table has one extra row (index ``num_classes``): the "no class" embedding
    used for dropped labels in training and for the unconditional half of a guided forward.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    def token_drop(self, labels: Tensor, force_drop_ids: Tensor | None = None) -> Tensor:
        if force_drop_ids is None:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop = force_drop_ids == 1
        return torch.where(drop, self.num_classes, labels)

    def forward(self, labels: Tensor, train: bool, force_drop_ids: Tensor | None = None) -> Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)  # (N, D)


# ----------------------------------------------------------------------------------------------------------
# Fixed sin-cos tables (MAE convention: [sin | cos] halves, float64 math, stored as float32 buffers-as-params)
# ----------------------------------------------------------------------------------------------------------


def sincos_1d(embed_dim: int, positions: np.ndarray) -> np.ndarray:
    """(M,) positions -> (M, embed_dim) [sin | cos] features, float64."""
    if embed_dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dimension, got {embed_dim}")
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega  # (D/2,)
    out = np.einsum("m,d->md", positions.reshape(-1).astype(np.float64), omega)  # (M, D/2)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(embed_dim: int, grid_size: int) -> np.ndarray:
    """(grid_size**2, embed_dim) table for a square grid, row-major; first half encodes w, second half h."""
    coords = np.arange(grid_size, dtype=np.float32)
    grid_w, grid_h = np.meshgrid(coords, coords)  # each (G, G); w varies along columns
    emb_first = sincos_1d(embed_dim // 2, grid_w)  # (G*G, D/2)
    emb_second = sincos_1d(embed_dim // 2, grid_h)  # (G*G, D/2)
    return np.concatenate([emb_first, emb_second], axis=1)


def sincos_temporal(embed_dim: int, num_frames: int) -> np.ndarray:
    """(num_frames, embed_dim) 1-D table over frame index."""
    return sincos_1d(embed_dim, np.arange(num_frames))
