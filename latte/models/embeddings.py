"""Input embeddings of Latte: patches, diffusion timesteps, class labels, captions, sin-cos positions."""

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


class Fp32Frequencies(nn.Module):
    """Base of the timestep embedders: their ``freqs`` buffer (``timestep_frequencies`` of
    ``frequency_embedding_size``) stays fp32 when the module is cast; ``_apply`` rebuilds it then."""

    frequency_embedding_size: int
    freqs: Tensor

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        if self.freqs.dtype != torch.float32:  # a cast: the exact fp32 values again, on the new device
            self.freqs = timestep_frequencies(self.frequency_embedding_size).to(self.freqs.device)
        return self


class TimestepEmbedder(Fp32Frequencies):
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
    Labels are (N,) or (N, K) (a sample's K image labels): dropout is one draw per sample, shared by its K
    labels, as the original joint model's ``y_embedder(labels.reshape(1, -1))`` per sample draws it.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    def token_drop(self, labels: Tensor, force_drop_ids: Tensor | None = None) -> Tensor:
        """labels (N,) or (N, K); force_drop_ids (N,) per sample or labels' shape, 1 = drop."""
        if force_drop_ids is None:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob  # (N,)
        else:
            drop = force_drop_ids == 1
        drop = drop.reshape(drop.shape + (1,) * (labels.dim() - drop.dim()))  # (N,) -> (N, 1): per sample
        return torch.where(drop, self.num_classes, labels)

    def forward(self, labels: Tensor, train: bool, force_drop_ids: Tensor | None = None) -> Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)  # (N, D) or (N, K, D)


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


def sincos_2d_grid(
    embed_dim: int, grid_h: int, grid_w: int, base_size: int, interpolation_scale: float = 1.0
) -> np.ndarray:
    """(grid_h * grid_w, embed_dim) table, row-major over (h, w), in PixArt-alpha's convention: a grid of
    another size than ``base_size`` is stretched onto the base grid's coordinate range, and every coordinate
    is divided by ``interpolation_scale``. First half encodes w, second half h (as ``sincos_2d``, which this
    equals for ``grid_h == grid_w == base_size`` and scale 1). Coordinates in float32, as the reference's.
    """

    def coords(g: int) -> np.ndarray:  # (g,) float32: g cells stretched onto base_size, then scaled
        steps = torch.arange(g, dtype=torch.float32, device="cpu")  # on the host even under a meta device
        return (steps / (g / base_size) / interpolation_scale).numpy()

    pos_h, pos_w = coords(grid_h), coords(grid_w)
    coord_w, coord_h = np.meshgrid(pos_w, pos_h)  # each (Gh, Gw); w varies along columns
    return np.concatenate([sincos_1d(embed_dim // 2, coord_w), sincos_1d(embed_dim // 2, coord_h)], axis=1)


class SinCosPatchEmbed(PatchEmbed):
    """Patches of a latent frame -> tokens with the fixed 2-D table added (PixArt-alpha / Latte-1 layout).

    The table is a non-persistent buffer (it is not in the checkpoints) for the configured square grid; a
    frame of another size gets its own table, stretched onto the same coordinate range (built on the host at
    each call: a host-to-device copy per forward, only for sizes other than the configured one).
    """

    def __init__(
        self, input_size: int, patch_size: int, in_channels: int, hidden_size: int, interpolation_scale: float
    ) -> None:
        super().__init__(input_size, patch_size, in_channels, hidden_size)
        self.interpolation_scale = interpolation_scale
        g = self.grid_size
        table = sincos_2d_grid(hidden_size, g, g, g, interpolation_scale)  # (T, D)
        self.register_buffer("table", torch.from_numpy(table).float()[None], persistent=False)  # (1, T, D)

    def forward(self, x: Tensor) -> Tensor:
        gh, gw = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        tokens = super().forward(x)  # (B, Gh*Gw, D)
        table = self.table
        if (gh, gw) != (self.grid_size, self.grid_size):
            grid = sincos_2d_grid(table.shape[-1], gh, gw, self.grid_size, self.interpolation_scale)
            table = torch.from_numpy(grid).to(device=tokens.device, dtype=torch.float32)[None]  # (1, T', D)
        return tokens + table.to(tokens.dtype)


class PixArtTimestepEmbedder(Fp32Frequencies):
    """Diffusion step t -> vector: [cos | sin] features (as ``TimestepEmbedder``) through linear_1, SiLU,
    linear_2, with diffusers' parameter names. The frequencies stay fp32 through casts, as there."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256) -> None:
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.linear_1 = nn.Linear(frequency_embedding_size, hidden_size, bias=True)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(hidden_size, hidden_size, bias=True)
        self.register_buffer("freqs", timestep_frequencies(frequency_embedding_size), persistent=False)

    def forward(self, t: Tensor) -> Tensor:
        t_freq = TimestepEmbedder.timestep_embedding(t, self.frequency_embedding_size, freqs=self.freqs)
        return self.linear_2(self.act(self.linear_1(t_freq.to(self.linear_1.weight.dtype))))  # (N, D)


class AdaLNSingle(nn.Module):
    """PixArt-alpha's adaLN-single: one timestep embedding per sample, mapped once to the six modulation
    vectors that every block adds to its own learned ``scale_shift_table``.

    ``emb.timestep_embedder`` nests as diffusers nests it, so the parameter names are the same.
    """

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.emb = nn.ModuleDict({"timestep_embedder": PixArtTimestepEmbedder(hidden_size)})
        self.silu = nn.SiLU()
        self.linear = nn.Linear(hidden_size, 6 * hidden_size, bias=True)

    def forward(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """t (N,) -> (modulation (N, 6D), embedded timestep (N, D) for the final layer)."""
        embedded = self.emb["timestep_embedder"](t)  # (N, D)
        return self.linear(self.silu(embedded)), embedded


class CaptionProjection(nn.Module):
    """Text-encoder states (N, L, C_text) -> (N, L, D): linear_1, GELU(tanh), linear_2 (PixArt-alpha)."""

    def __init__(self, in_features: int, hidden_size: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_features, hidden_size, bias=True)
        self.act_1 = nn.GELU(approximate="tanh")
        self.linear_2 = nn.Linear(hidden_size, hidden_size, bias=True)

    def forward(self, caption: Tensor) -> Tensor:
        return self.linear_2(self.act_1(self.linear_1(caption)))
