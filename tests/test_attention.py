"""Attention backends agree with the plain-math reference, masks behave, modules validate their inputs.

Only backends that really run here are compared: "sdpa" and "auto" everywhere, "flash"/"xformers" only with
CUDA and the package importable (skipped with the reason otherwise; on CPU they silently become sdpa, which
would make such a comparison meaningless).
"""

from __future__ import annotations

import importlib
import warnings

import pytest
import torch

from latte.models.attention import BACKENDS, Attention, attention, resolve_backend

# `latte.models` re-exports the function `attention`, which shadows the submodule of the same name as an
# attribute (`from latte.models import attention` gives the function): fetch the module itself.
attn_mod = importlib.import_module("latte.models.attention")

FP32_TOL = 1e-5  # sdpa vs math, fp32, relative to the reference's largest magnitude
BF16_TOL = 2e-2  # bf16 kernels vs fp32 math
CUDA = torch.cuda.is_available()


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    return ((out.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


def _qkv(b: int = 3, nq: int = 7, nk: int | None = None, h: int = 2, d: int = 8, seed: int = 0, **to):
    g = torch.Generator().manual_seed(seed)
    nk = nq if nk is None else nk
    q = torch.randn(b, nq, h, d, generator=g)  # (B, Nq, H, D)
    k, v = (torch.randn(b, nk, h, d, generator=g) for _ in range(2))  # (B, Nk, H, D)
    return tuple(u.to(**to) for u in (q, k, v))


def _random_mask(b: int, n: int, seed: int = 1, device: str = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, n, generator=g) > 0.4  # (B, N), True = real key
    mask[:, 0] = True  # no fully masked rows here; those have their own test
    mask[0, -1] = False  # at least one padded key
    return mask.to(device)


def _naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Independent float64 reference: softmax(q k^T / sqrt(D)) v, fully masked query rows -> 0."""
    q, k, v = (u.double() for u in (q, k, v))
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5  # (B, H, Nq, Nk)
    if mask is None:
        return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)
    m = mask[:, None, None, :]  # (B, 1, 1, Nk)
    weights = torch.where(m, scores, torch.finfo(scores.dtype).min).softmax(-1) * m
    return torch.einsum("bhqk,bkhd->bqhd", weights, v)


def _setup(backend: str) -> dict:
    """Device, dtype and tolerance on which ``backend`` genuinely runs; skip when it cannot run here."""
    if backend in ("sdpa", "auto", "math"):
        return {"device": "cpu", "dtype": torch.float32, "tol": FP32_TOL, "expect": None}
    if not CUDA:
        pytest.skip(f"{backend!r} needs CUDA, which this machine lacks (on CPU it falls back to sdpa)")
    available = attn_mod.flash_available() if backend == "flash" else attn_mod.xformers_available()
    if not available:
        pytest.skip(f"{backend!r}: its package does not import here (it would fall back to sdpa)")
    if backend == "flash":  # flash-attn only takes half precision
        return {"device": "cuda", "dtype": torch.bfloat16, "tol": BF16_TOL, "expect": "flash"}
    return {"device": "cuda", "dtype": torch.float32, "tol": 1e-4, "expect": "xformers"}


RUNNABLE = ["sdpa", "auto", "flash", "xformers"]


def _run(backend: str, q, k, v, mask=None) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a backend that runs here must not warn about falling back
        return attention(q, k, v, mask, backend)


@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "key_padding"])
def test_math_matches_float64_reference(masked: bool) -> None:
    q, k, v = _qkv(nq=6, nk=9)
    mask = _random_mask(3, 9) if masked else None
    assert _rel_err(attention(q, k, v, mask, "math"), _naive(q, k, v, mask)) < 1e-6


@pytest.mark.parametrize("backend", RUNNABLE)
@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "key_padding"])
def test_backend_matches_math(backend: str, masked: bool) -> None:
    s = _setup(backend)
    q, k, v = _qkv(device=s["device"])
    mask = _random_mask(3, 7, device=s["device"]) if masked else None
    if s["expect"]:
        assert resolve_backend(backend, q.to(s["dtype"])) == s["expect"]
    out = _run(backend, *(u.to(s["dtype"]) for u in (q, k, v)), mask)
    ref = attention(q, k, v, mask, "math")
    assert out.shape == ref.shape == (3, 7, 2, 8)
    assert out.dtype == s["dtype"]
    assert _rel_err(out, ref) <= s["tol"]


@pytest.mark.parametrize("backend", RUNNABLE)
def test_cross_attention_lengths(backend: str) -> None:
    """Nq != Nk (cross-attention), with a key padding mask over the context."""
    s = _setup(backend)
    q, k, v = _qkv(b=2, nq=5, nk=11, device=s["device"])
    mask = _random_mask(2, 11, device=s["device"])
    out = _run(backend, *(u.to(s["dtype"]) for u in (q, k, v)), mask)
    assert out.shape == (2, 5, 2, 8)
    assert _rel_err(out, _naive(q, k, v, mask)) <= s["tol"]


@pytest.mark.parametrize("backend", ["math", *RUNNABLE])
def test_fully_masked_sequences_give_zeros_and_finite_grads(backend: str) -> None:
    s = _setup(backend)
    q, k, v = _qkv(b=4, nq=6, nk=6, device=s["device"], dtype=s["dtype"])
    for u in (q, k, v):
        u.requires_grad_(True)
    mask = _random_mask(4, 6, device=s["device"])
    mask[1] = False
    mask[3] = False
    out = _run(backend, q, k, v, mask) if backend != "math" else attention(q, k, v, mask, "math")
    assert torch.isfinite(out).all()
    assert torch.equal(out[[1, 3]], torch.zeros_like(out[[1, 3]]))  # exactly zero, not just small
    live = [0, 2]
    assert _rel_err(out[live], _naive(q.detach(), k.detach(), v.detach(), mask)[live]) <= s["tol"]

    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(out)
    out.backward(grad_out)
    for u in (q, k, v):
        assert torch.isfinite(u.grad).all()
        assert torch.equal(u.grad[[1, 3]], torch.zeros_like(u.grad[[1, 3]]))
        assert u.grad[live].abs().sum() > 0


def test_fully_masked_grads_match_math() -> None:
    """Backward of sdpa equals backward of math, fully masked rows included."""
    grads = {}
    for backend in ("math", "sdpa"):
        q, k, v = _qkv(b=3, nq=5, nk=5)
        for u in (q, k, v):
            u.requires_grad_(True)
        mask = _random_mask(3, 5)
        mask[2] = False
        attention(q, k, v, mask, backend).square().sum().backward()
        grads[backend] = [u.grad for u in (q, k, v)]
    for g_sdpa, g_math in zip(grads["sdpa"], grads["math"], strict=True):
        assert _rel_err(g_sdpa, g_math) <= 1e-4


def test_bf16_sdpa_close_to_fp32_math() -> None:
    q, k, v = _qkv(b=2, nq=16, h=2, d=16)
    mask = _random_mask(2, 16)
    ref = attention(q, k, v, mask, "math")
    out = attention(*(u.bfloat16() for u in (q, k, v)), mask, "sdpa")
    assert out.dtype == torch.bfloat16
    err = _rel_err(out, ref)
    assert 0 < err <= BF16_TOL  # nonzero: the computation really ran in bf16


@pytest.mark.parametrize("backend", ["math", *RUNNABLE])
def test_masked_keys_do_not_matter(backend: str) -> None:
    s = _setup(backend)
    q, k, v = _qkv(b=3, nq=7, device=s["device"], dtype=s["dtype"])
    mask = _random_mask(3, 7, device=s["device"])
    out = attention(q, k, v, mask, backend) if backend == "math" else _run(backend, q, k, v, mask)
    k2, v2 = k.clone(), v.clone()
    k2[~mask] = 50.0  # large keys would dominate the softmax if they were attended to
    v2[~mask] = -30.0
    out2 = attention(q, k2, v2, mask, backend) if backend == "math" else _run(backend, q, k2, v2, mask)
    assert torch.equal(out, out2)
    # The same perturbation without the mask changes the output: the check above can fail.
    assert not torch.allclose(attention(q, k2, v2, None, backend), attention(q, k, v, None, backend))


# ------------------------------------------------------------------------------------------------------
# Modules
# ------------------------------------------------------------------------------------------------------


def _module(backend: str) -> Attention:
    torch.manual_seed(0)
    return Attention(32, num_heads=4, backend=backend)


def _module_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {
        "x": torch.randn(2, 6, 32, generator=g),  # (B, N, C)
        "mask": _random_mask(2, 6),
    }


@pytest.mark.parametrize("backend", BACKENDS)
def test_modules_agree_across_backends(backend: str) -> None:
    ref_self = _module("math")
    self_attn = _module(backend)
    self_attn.load_state_dict(ref_self.state_dict())
    inp = _module_inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flash"/"xformers" fall back to sdpa on CPU, with a warning
        for mask in (None, inp["mask"]):
            out = self_attn(inp["x"], mask)
            assert out.shape == (2, 6, 32)
            assert _rel_err(out, ref_self(inp["x"], mask)) <= FP32_TOL


@pytest.mark.parametrize(
    "bad",
    [
        lambda m: m[:, :-1],  # wrong length
        lambda m: m[:1],  # wrong batch
        lambda m: m.float(),  # wrong dtype
        lambda m: m.long(),
        lambda m: m[:, :, None],  # wrong rank
    ],
    ids=["short", "batch", "float", "long", "rank3"],
)
def test_bad_mask_raises(bad) -> None:
    self_attn = _module("sdpa")
    inp = _module_inputs()
    with pytest.raises(ValueError, match="key_padding_mask"):
        self_attn(inp["x"], bad(inp["mask"]))
    q, k, v = _qkv(b=2, nq=6)
    with pytest.raises(ValueError, match="key_padding_mask"):
        attention(q, k, v, bad(inp["mask"]), "math")


def test_unknown_backend_names_the_choices() -> None:
    names = "".join(f"(?=.*{name})" for name in BACKENDS)  # every choice appears, in any order
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=f"'nope'{names}"):
        attention(q, k, v, backend="nope")
    with pytest.raises(ValueError, match=names):
        resolve_backend("nope", q)
    with pytest.raises(ValueError, match=names):
        Attention(32, num_heads=4, backend="nope")


def test_auto_on_cpu_is_sdpa_without_warning() -> None:
    q, _, _ = _qkv()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_backend("auto", q) == "sdpa"
        assert resolve_backend("auto", q.bfloat16()) == "sdpa"


def test_explicit_flash_on_cpu_warns_and_equals_sdpa() -> None:
    # The fallback warning is emitted once per process (functools.cache); reset it so this test sees it
    # whatever ran before.
    getattr(attn_mod._warn_fallback, "cache_clear", lambda: None)()
    ref_self = _module("sdpa")
    flash_self = _module("flash")
    flash_self.load_state_dict(ref_self.state_dict())
    inp = _module_inputs()
    with pytest.warns(UserWarning, match="'flash'.*'sdpa'"):
        out = flash_self(inp["x"], inp["mask"])
    assert torch.equal(out, ref_self(inp["x"], inp["mask"]))
    q, k, v = _qkv()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert resolve_backend("flash", q) == "sdpa"
        assert torch.equal(attention(q, k, v, backend="flash"), attention(q, k, v, backend="sdpa"))


def test_report_names_the_kernel_and_why_faster_ones_were_not_taken() -> None:
    line = attn_mod.report("auto", torch.device("cpu"), torch.float32, head_dim=16, num_heads=4)
    assert line.startswith("attention: 'sdpa' (requested 'auto'; cpu float32, head dim 16); not taken: ")
    for backend in ("flash3", "flash", "xformers"):
        assert f"{backend}: " in line
    if not attn_mod.flash_available():  # the import error itself, not a bare "missing"
        assert "flash: flash_attn does not import (ModuleNotFoundError: No module named 'flash_attn')" in line
    explicit = attn_mod.report("math", torch.device("cpu"), torch.float32, head_dim=16, num_heads=4)
    assert explicit == "attention: 'math' (requested 'math'; cpu float32, head dim 16)"


class _FakeCuda:
    """What resolve_backend reads of q, as a CUDA tensor would answer (no GPU needed)."""

    is_cuda = True
    dtype = torch.float32
    shape = (1, 8, 4, 72)
    device = torch.device("cuda", 0)


def test_explicit_backend_that_cannot_run_on_cuda_is_an_error_auto_falls_back(monkeypatch) -> None:
    attn_mod.load_kernels()
    monkeypatch.setitem(attn_mod._modules, "flash", object())  # "installed"
    monkeypatch.setitem(attn_mod._modules, "flash3", None)
    monkeypatch.setitem(attn_mod._modules, "xformers", None)
    reason = r"'flash' cannot run: it needs fp16/bf16 inputs, got torch.float32"
    with pytest.raises(RuntimeError, match=reason):
        resolve_backend("flash", _FakeCuda())
    assert resolve_backend("auto", _FakeCuda()) == "sdpa"  # auto may fall back


def test_a_kernel_that_failed_its_probe_is_skipped_by_auto(monkeypatch) -> None:
    attn_mod.load_kernels()
    q = _FakeCuda()
    q.dtype = torch.bfloat16
    monkeypatch.setitem(attn_mod._modules, "flash", object())
    monkeypatch.setitem(attn_mod._modules, "flash3", None)
    monkeypatch.setitem(attn_mod._modules, "xformers", None)
    assert resolve_backend("auto", q) == "flash"
    monkeypatch.setitem(attn_mod._refused, ("flash", torch.bfloat16, 72), "its kernel failed on a probe (X)")
    assert resolve_backend("auto", q) == "sdpa"
    with pytest.raises(RuntimeError, match="failed on a probe"):
        resolve_backend("flash", q)
