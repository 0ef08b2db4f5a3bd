"""Multi-head attention with interchangeable kernels: flash-attn, xformers, torch SDPA and plain math.

Every backend takes q, k, v as (B, N, H, D) and returns (B, Nq, H, D), with the same semantics:

* ``key_padding_mask``: optional (B, Nk) bool, True = this key may be attended to. It is how the model drops
  padded frames (temporal attention), padded tokens (spatial attention) and padded encoder states
  (cross-attention, ``encoder_attention_mask``).
* A query whose keys are all masked gets an output of exactly zero (never NaN): such sequences are run
  unmasked and their output multiplied by zero afterwards, so forward and backward stay finite everywhere.

``math`` is the reference path: it reproduces the original Latte attention operation for operation.
``auto`` picks the fastest backend that can run the given tensors (device, dtype, head dim) and falls back
cleanly when a package is missing or refuses the input (xformers raises NotImplementedError on CPU).
"""

from __future__ import annotations

import functools
import importlib
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BACKENDS = ("auto", "flash", "xformers", "sdpa", "math")
_HALF = (torch.float16, torch.bfloat16)


@functools.cache
def _optional_module(name: str):
    """Import an optional kernel package once; None when it is missing or broken."""
    try:
        return importlib.import_module(name)
    except Exception:  # ImportError, or a CUDA-linked package failing to load its library
        return None


def flash_available() -> bool:
    return _optional_module("flash_attn") is not None


def xformers_available() -> bool:
    return _optional_module("xformers.ops") is not None


def _usable(backend: str, q: Tensor) -> bool:
    """Whether ``backend`` can run on these tensors at all (device, dtype, head dim, package present)."""
    if backend in ("sdpa", "math"):
        return True
    head_dim = q.shape[-1]
    if backend == "flash":
        return flash_available() and q.is_cuda and q.dtype in _HALF and head_dim <= 256 and head_dim % 8 == 0
    return backend == "xformers" and xformers_available() and q.is_cuda


def _check_backend(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")


def resolve_backend(requested: str, q: Tensor) -> str:
    """The backend that will actually run for ``requested`` on tensors like ``q``.

    ``auto`` prefers flash > xformers > sdpa. An explicit GPU backend that cannot run here falls back along
    the same chain (with one warning per pair), so one config serves a GPU cluster and a CPU test machine.
    """
    _check_backend(requested)
    if requested in ("sdpa", "math"):
        return requested
    chain = {"auto": ("flash", "xformers"), "flash": ("flash", "xformers"), "xformers": ("xformers",)}
    for candidate in chain[requested]:
        if _usable(candidate, q):
            return candidate
    if requested != "auto":
        _warn_fallback(requested, "sdpa", f"{q.device.type}/{q.dtype}")
    return "sdpa"


@functools.cache
def _warn_fallback(requested: str, used: str, where: str) -> None:
    warnings.warn(f"attention backend {requested!r} cannot run on {where}; using {used!r}", stacklevel=3)


# --------------------------------------------------------------------------------------------------------
# Kernels. Inputs (B, N, H, D); the mask, when given, has no fully-masked rows (see `attention`).
# --------------------------------------------------------------------------------------------------------


def _math(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    # The original Latte layout: contiguous (B, H, N, D), scores scaled after the product.
    q, k, v = (u.transpose(1, 2).contiguous() for u in (q, k, v))  # (B, H, N, D)
    scale = q.shape[-1] ** -0.5
    attn = (q @ k.transpose(-2, -1)) * scale  # (B, H, Nq, Nk)
    if mask is not None:
        attn = attn.masked_fill(~mask[:, None, None, :], float("-inf"))
    attn = attn.softmax(dim=-1)
    return (attn @ v).transpose(1, 2)  # (B, H, Nq, D) -> (B, Nq, H, D)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    attn_mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, Nk), True = attend
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask)
    return out.transpose(1, 2)  # (B, H, Nq, D) -> (B, Nq, H, D)


def _xformers(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    xops = _optional_module("xformers.ops")
    bias = None
    if mask is not None:
        b, nq, h, _ = q.shape
        nk = k.shape[1]
        # xformers wants the bias' last dim 8-aligned in memory: allocate padded, then slice.
        bias = q.new_zeros(b, h, nq, (nk + 7) // 8 * 8)[..., :nk]  # (B, H, Nq, Nk)
        bias.masked_fill_(~mask[:, None, None, :], float("-inf"))
    return xops.memory_efficient_attention(q, k, v, attn_bias=bias)  # (B, Nq, H, D)


def _flash(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    fa = _optional_module("flash_attn")
    if mask is None:
        return fa.flash_attn_func(q, k, v)  # (B, Nq, H, D)
    # Key padding through the varlen kernel: every query is kept, keys are unpadded per sequence.
    b, nq, h, d = q.shape
    nk = k.shape[1]
    cu_q = torch.arange(0, (b + 1) * nq, nq, device=q.device, dtype=torch.int32)  # (B+1,)
    lengths = mask.sum(dim=1, dtype=torch.int32)  # (B,)
    cu_k = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))  # (B+1,)
    k_unpad, v_unpad = k[mask], v[mask]  # (total_k, H, D); boolean indexing syncs with the host
    out = fa.flash_attn_varlen_func(q.reshape(b * nq, h, d), k_unpad, v_unpad, cu_q, cu_k, nq, nk)
    return out.reshape(b, nq, h, d)  # (B*Nq, H, D) -> (B, Nq, H, D)


_KERNELS: dict[str, Callable[[Tensor, Tensor, Tensor, Tensor | None], Tensor]] = {
    "flash": _flash,
    "xformers": _xformers,
    "sdpa": _sdpa,
    "math": _math,
}


def attention(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None = None, backend: str = "auto"
) -> Tensor:
    """Softmax attention, scale 1/sqrt(D). q (B, Nq, H, D), k/v (B, Nk, H, D) -> (B, Nq, H, D)."""
    has_keys = None
    if key_padding_mask is not None:
        if key_padding_mask.shape != (k.shape[0], k.shape[1]) or key_padding_mask.dtype != torch.bool:
            raise ValueError(
                f"key_padding_mask must be bool of shape {(k.shape[0], k.shape[1])}, "
                f"got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)}"
            )
        has_keys = key_padding_mask.any(dim=1)  # (B,)
        # Fully masked sequences attend to everything (finite), then their output is zeroed below.
        key_padding_mask = key_padding_mask | ~has_keys[:, None]
    name = resolve_backend(backend, q)
    try:
        out = _KERNELS[name](q, k, v, key_padding_mask)
    except NotImplementedError:  # a kernel package that imports but refuses this input
        if name not in ("flash", "xformers"):
            raise
        _warn_fallback(name, "sdpa", f"{q.device.type}/{q.dtype} (NotImplementedError)")
        out = _sdpa(q, k, v, key_padding_mask)
    if has_keys is not None:
        out = out * has_keys[:, None, None, None].to(out.dtype)
    return out


def _check_heads_and_backend(dim: int, num_heads: int, backend: str) -> None:
    if dim % num_heads:
        raise ValueError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
    _check_backend(backend)


class Attention(nn.Module):
    """Multi-head self-attention; parameter names (``qkv``, ``proj``) match the released checkpoints."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, backend: str = "auto") -> None:
        super().__init__()
        _check_heads_and_backend(dim, num_heads, backend)
        self.num_heads = num_heads
        self.backend = backend
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """x (B, N, C); attention_mask (B, N) bool, True = real token. Returns (B, N, C)."""
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)  # (B, N, 3, H, D)
        q, k, v = qkv.unbind(2)  # each (B, N, H, D), views
        out = attention(q, k, v, attention_mask, self.backend)  # (B, N, H, D)
        return self.proj(out.reshape(b, n, c))


class CrossAttention(nn.Module):
    """Multi-head attention from x to an encoder sequence (text, image or other conditioning states).

    The class-conditional and unconditional Latte models have none; conditioned variants add one per block.
    """

    def __init__(
        self, dim: int, context_dim: int, num_heads: int, qkv_bias: bool = True, backend: str = "auto"
    ) -> None:
        super().__init__()
        _check_heads_and_backend(dim, num_heads, backend)
        self.num_heads = num_heads
        self.backend = backend
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(context_dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor, encoder_attention_mask: Tensor | None = None) -> Tensor:
        """x (B, N, C); context (B, M, Cc); encoder_attention_mask (B, M) bool. Returns (B, N, C)."""
        b, n, c = x.shape
        h = self.num_heads
        q = self.q(x).reshape(b, n, h, c // h)  # (B, N, H, D)
        k, v = self.kv(context).reshape(b, context.shape[1], 2, h, c // h).unbind(2)  # each (B, M, H, D)
        out = attention(q, k, v, encoder_attention_mask, self.backend)  # (B, N, H, D)
        return self.proj(out.reshape(b, n, c))
