"""Multi-head attention with interchangeable kernels: FlashAttention-3 (Hopper), flash-attn 2, xformers, torch
SDPA and plain math.

Every backend takes q, k, v as (B, N, H, D) and returns (B, Nq, H, D), with the same semantics:

* ``key_padding_mask``: optional (B, Nk) bool, True = this key may be attended to. It is how the model drops
  padded frames (temporal attention) and padded tokens (spatial attention).
* A query whose keys are all masked gets an output of exactly zero (never NaN): such sequences are run
  unmasked and their output multiplied by zero afterwards, so forward and backward stay finite everywhere.

``math`` is the reference path: it reproduces the original Latte attention operation for operation.
``auto`` picks the fastest backend that can run the given tensors (device, dtype, head dim) and falls back
cleanly when a package is missing or refuses the input (xformers raises NotImplementedError on CPU). An
explicit backend that cannot run is an error on CUDA and a warning + sdpa on CPU. ``report()`` says, once
at start-up, what runs and why each faster kernel does not (its import error, dtype, head dim, GPU).
The per-call choice reads only dicts filled beforehand by ``load_kernels()``, so ``torch.compile`` traces
it without graph breaks.
"""

from __future__ import annotations

import functools
import importlib
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BACKENDS = ("auto", "flash3", "flash", "xformers", "sdpa", "math")
_HALF = (torch.float16, torch.bfloat16)
_PACKAGES = {"flash3": "flash_attn_interface", "flash": "flash_attn", "xformers": "xformers.ops"}
# auto's order on CUDA (the fastest first); sdpa is the fallback everywhere.
_AUTO_CHAIN = ("flash3", "flash", "xformers")
_FALLBACK_CHAIN = {"auto": _AUTO_CHAIN, "flash3": ("flash3",), "flash": ("flash",), "xformers": ("xformers",)}

# Filled once by `load_kernels()`, outside any traced region (model construction calls it), so that the
# per-call choice below is plain dict and attribute reads that torch.compile traces without graph breaks.
_modules: dict[str, object | None] = {}
_import_errors: dict[str, str] = {}
_hopper_devices: set[int] = set()  # CUDA device indices of compute capability 9.x (FlashAttention-3)
_refused: dict[tuple[str, torch.dtype, int], str] = {}  # (backend, dtype, head dim) -> what a probe raised
_deterministic = [False]  # flash kernels' deterministic backward (`set_deterministic`)


def load_kernels() -> None:
    """Import the optional kernel packages once and remember why each that failed did (idempotent)."""
    if _modules:
        return
    for backend, name in _PACKAGES.items():
        try:
            _modules[backend] = importlib.import_module(name)
        except Exception as exc:  # ImportError, or a CUDA-linked package failing to load its library
            _modules[backend] = None
            first = (str(exc).strip().splitlines() or [""])[0]
            _import_errors[backend] = f"{name} does not import ({type(exc).__name__}: {first})"
    if torch.cuda.is_available():
        _hopper_devices.update(
            i for i in range(torch.cuda.device_count()) if torch.cuda.get_device_capability(i)[0] == 9
        )


def set_deterministic(enabled: bool) -> None:
    """Deterministic backward for the flash kernels (slower; ``train.deterministic``)."""
    _deterministic[0] = enabled


def flash_available() -> bool:
    load_kernels()
    return _modules["flash"] is not None


def xformers_available() -> bool:
    load_kernels()
    return _modules["xformers"] is not None


def why_not(backend: str, q: Tensor) -> str | None:
    """Why ``backend`` cannot run on tensors like ``q`` (device, dtype, head dim, package), or None."""
    if backend in ("sdpa", "math"):
        return None
    if _modules.get(backend) is None:
        return _import_errors.get(backend, f"{_PACKAGES[backend]} is not loaded")
    if not q.is_cuda:
        return "it needs CUDA tensors"
    head_dim = q.shape[-1]
    if backend in ("flash", "flash3"):
        if q.dtype not in _HALF:
            return f"it needs fp16/bf16 inputs, got {q.dtype} (train.precision bf16)"
        if head_dim > 256 or head_dim % 8:
            return f"it needs a head dim <= 256 and a multiple of 8, got {head_dim}"
        if backend == "flash3" and q.device.index not in _hopper_devices:
            return "FlashAttention-3 runs on Hopper (sm90) GPUs only"
    return _refused.get((backend, q.dtype, head_dim))


def _check_backend(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")


def resolve_backend(requested: str, q: Tensor) -> str:
    """The backend that will actually run for ``requested`` on tensors like ``q``.

    ``auto`` prefers flash3 > flash > xformers > sdpa among those that can run. An explicit backend that
    cannot run is an error on CUDA (naming the reason); on CPU it falls back to sdpa with one warning per
    pair, so one config serves a GPU cluster and a CPU test machine.
    """
    _check_backend(requested)
    if requested in ("sdpa", "math"):
        return requested
    for candidate in _FALLBACK_CHAIN[requested]:
        reason = why_not(candidate, q)
        if reason is None:
            return candidate
    if requested != "auto":
        if q.is_cuda:
            raise RuntimeError(f"attention backend {requested!r} cannot run: {reason}")
        _warn_fallback(requested, "sdpa", f"{q.device.type}/{q.dtype}")
    return "sdpa"


@functools.cache
def _warn_fallback(requested: str, used: str, where: str) -> None:
    warnings.warn(f"attention backend {requested!r} cannot run on {where}; using {used!r}", stacklevel=3)


def probe(device: torch.device, dtype: torch.dtype, head_dim: int, num_heads: int) -> None:
    """Run each kernel that claims to fit once on a tiny input; one that raises is remembered as refused
    (``why_not`` then gives the error and ``auto`` skips it). Call before training or sampling, not traced."""
    load_kernels()
    q = torch.randn(1, 8, num_heads, head_dim, device=device, dtype=dtype)
    mask = torch.ones(1, 8, dtype=torch.bool, device=device)
    mask[0, -1] = False
    for backend in _AUTO_CHAIN:
        if why_not(backend, q) is not None:
            continue
        try:
            for m in (None, mask):
                _KERNELS[backend](q, q, q, m)
        except Exception as exc:  # noqa: BLE001 (whatever the kernel raises is the reason it cannot run)
            first = (str(exc).strip().splitlines() or [""])[0]
            _refused[(backend, dtype, head_dim)] = (
                f"its kernel failed on a probe ({type(exc).__name__}: {first})"
            )


def report(requested: str, device: torch.device, dtype: torch.dtype, head_dim: int, num_heads: int) -> str:
    """One line: the backend the model's attention runs for ``requested`` on this device/dtype/head dim, and
    why each faster one was not taken. Probes the kernels first. Raises ``RuntimeError`` (naming the reason)
    for an explicit backend that cannot run on CUDA."""
    probe(device, dtype, head_dim, num_heads)
    q = torch.empty(1, 1, num_heads, head_dim, device=device, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the line below says it
        used = resolve_backend(requested, q)
    kind = str(dtype).replace("torch.", "")
    line = f"attention: {used!r} (requested {requested!r}; {device.type} {kind}, head dim {head_dim})"
    if requested == "auto":  # why each faster kernel was not taken
        faster = _AUTO_CHAIN[: _AUTO_CHAIN.index(used)] if used in _AUTO_CHAIN else _AUTO_CHAIN
        line += "; not taken: " + "; ".join(f"{b}: {why_not(b, q)}" for b in faster) if faster else ""
    elif used != requested:
        line += f"; {requested}: {why_not(requested, q)}"
    return line


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
    xops = _modules["xformers"]
    bias = None
    if mask is not None:
        b, nq, h, _ = q.shape
        nk = k.shape[1]
        # xformers wants the bias' last dim 8-aligned in memory: allocate padded, then slice.
        bias = q.new_zeros(b, h, nq, (nk + 7) // 8 * 8)[..., :nk]  # (B, H, Nq, Nk)
        bias.masked_fill_(~mask[:, None, None, :], float("-inf"))
    return xops.memory_efficient_attention(q, k, v, attn_bias=bias)  # (B, Nq, H, D)


def _varlen(func: Callable, q: Tensor, k: Tensor, v: Tensor, mask: Tensor, **kw) -> Tensor:
    """Key padding through a flash varlen kernel: every query is kept, keys are unpadded per sequence."""
    b, nq, h, d = q.shape
    nk = k.shape[1]
    cu_q = torch.arange(0, (b + 1) * nq, nq, device=q.device, dtype=torch.int32)  # (B+1,)
    lengths = mask.sum(dim=1, dtype=torch.int32)  # (B,)
    cu_k = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))  # (B+1,)
    k_unpad, v_unpad = k[mask], v[mask]  # (total_k, H, D); boolean indexing syncs with the host
    out = func(q.reshape(b * nq, h, d), k_unpad, v_unpad, cu_q, cu_k, nq, nk, **kw)
    out = out[0] if isinstance(out, tuple) else out  # some FlashAttention-3 versions also return the LSE
    return out.reshape(b, nq, h, d)  # (B*Nq, H, D) -> (B, Nq, H, D)


def _flash(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    fa = _modules["flash"]
    if mask is None:
        return fa.flash_attn_func(q, k, v, deterministic=_deterministic[0])  # (B, Nq, H, D)
    return _varlen(fa.flash_attn_varlen_func, q, k, v, mask, deterministic=_deterministic[0])


def _flash3(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    fa3 = _modules["flash3"]
    if mask is None:
        out = fa3.flash_attn_func(q, k, v, deterministic=_deterministic[0])
        return out[0] if isinstance(out, tuple) else out  # (B, Nq, H, D)
    return _varlen(fa3.flash_attn_varlen_func, q, k, v, mask, deterministic=_deterministic[0])


_KERNELS: dict[str, Callable[[Tensor, Tensor, Tensor, Tensor | None], Tensor]] = {
    "flash3": _flash3,
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
    load_kernels()  # a no-op after the first call (model construction makes it); keeps direct calls working
    name = resolve_backend(backend, q)
    if name in ("sdpa", "math"):
        out = _KERNELS[name](q, k, v, key_padding_mask)
    else:
        try:
            out = _KERNELS[name](q, k, v, key_padding_mask)
        except NotImplementedError:  # a kernel package that imports but refuses this input
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
        load_kernels()  # here, not in forward: the per-call choice must stay traceable
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


class MultiHeadAttention(nn.Module):
    """Multi-head attention with separate q/k/v projections, named as diffusers names them (``to_q``,
    ``to_k``, ``to_v``, ``to_out.0``): self-attention, or cross-attention to a context of another length and
    width (the caption in Latte-T2V's spatial blocks)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        context_dim: int | None = None,
        qkv_bias: bool = False,
        dropout: float = 0.0,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        _check_heads_and_backend(dim, num_heads, backend)
        load_kernels()  # here, not in forward: the per-call choice must stay traceable
        self.num_heads = num_heads
        self.backend = backend
        self.to_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=qkv_bias)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=qkv_bias)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(dropout)])

    def forward(self, x: Tensor, context: Tensor | None = None, key_mask: Tensor | None = None) -> Tensor:
        """x (B, Nq, C); context (B, Nk, C_ctx) or None (self-attention); key_mask (B, Nk) bool, True = a
        real key. Returns (B, Nq, C)."""
        b, nq, c = x.shape
        context = x if context is None else context
        h = self.num_heads
        q = self.to_q(x).reshape(b, nq, h, c // h)  # (B, Nq, H, D)
        k = self.to_k(context).reshape(b, context.shape[1], h, c // h)  # (B, Nk, H, D)
        v = self.to_v(context).reshape(b, context.shape[1], h, c // h)  # (B, Nk, H, D)
        out = attention(q, k, v, key_mask, self.backend)  # (B, Nq, H, D)
        return self.to_out[1](self.to_out[0](out.reshape(b, nq, c)))
