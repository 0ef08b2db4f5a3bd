"""LatteT2V against diffusers' LatteTransformer3DModel: state-dict layout, the function computed (masks, frame
counts, image mode, table scaling, both reference backends), the diffusers folder format, strict loading,
gradient checkpointing, flavors and the FLOPs count.

Every parameter is drawn at random before a comparison: fresh models zero some layers (ours: the output and
cross-attention projections), which would hide errors behind them.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from diffusers import LatteTransformer3DModel
from safetensors.torch import load_file, save_file
from torch.utils.flop_counter import FlopCounterMode

from latte.metrics import t2v_flops_per_sample
from latte.models import (
    BACKENDS,
    LATTE_ARCHS,
    LATTE_T2V_ARCHS,
    LATTE_T2V_MODELS,
    LatteT2V,
    from_diffusers,
    t2v_arch,
    to_diffusers,
)

TOL = 1e-5  # max |ours - diffusers'| <= TOL * max |diffusers'| + ABS (fp32)
ABS = 1e-6
# A tiny Latte-1: 2 pairs, 4 heads x 8, 8x8 latents (16 tokens per frame), a 16-wide caption, 4 frames.
TINY = dict(
    sample_size=8,
    num_layers=2,
    patch_size=2,
    attention_head_dim=8,
    num_attention_heads=4,
    caption_channels=16,
    in_channels=4,
    cross_attention_dim=32,
    out_channels=8,
    attention_bias=True,
    activation_fn="gelu-approximate",
    num_embeds_ada_norm=1000,
    norm_type="ada_norm_single",
    norm_elementwise_affine=False,
    norm_eps=1e-6,
    video_length=4,
)


def _randomize(model: torch.nn.Module, seed: int = 0, scale: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def _pair(backend: str = "math", seed: int = 0, **overrides) -> tuple[LatteT2V, LatteTransformer3DModel]:
    """Ours with random weights, and diffusers' model of the same config with the same weights."""
    config = {**TINY, **overrides}
    ours = LatteT2V.from_config(config, attention=backend)
    _randomize(ours, seed)
    ref = LatteTransformer3DModel(**config)
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ours.eval(), ref.eval()


def _inputs(n: int = 2, f: int = 4, h: int = 8, w: int = 8, length: int = 5, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(n, f, 4, h, w, generator=g),  # (N, F, C, H, W)
        "t": torch.tensor([17, 803][:n]),
        "encoder_hidden_states": torch.randn(n, length, TINY["caption_channels"], generator=g),
    }


def _reference(ref: LatteTransformer3DModel, x, t, encoder_hidden_states, mask=None, temporal=True):
    """diffusers' output in our layout; a mask goes in as the original's bias, (1 - mask) * -10000, shaped
    (N, 1, L) and repeated per frame sample by sample: (N*F, 1, L)."""
    bias = None
    if mask is not None:
        bias = ((1 - mask.float()) * -10000.0)[:, None].repeat_interleave(x.shape[1], dim=0)  # (N*F, 1, L)
    hidden = x.permute(0, 2, 1, 3, 4)  # (N, F, C, H, W) -> diffusers' (N, C, F, H, W)
    with torch.no_grad():
        out = ref(hidden, t, encoder_hidden_states, bias, enable_temporal_attentions=temporal).sample
    return out.permute(0, 2, 1, 3, 4)  # (N, C, F, H, W) -> (N, F, C, H, W)


def _assert_close(out: torch.Tensor, ref: torch.Tensor, what: str, tol: float = TOL) -> None:
    err, peak = (out - ref).abs().max().item(), ref.abs().max().item()
    print(f"{what}: max |diff| {err:.3g}, max |ref| {peak:.3g}, relative {err / peak:.3g}")
    assert out.shape == ref.shape
    assert err <= tol * peak + ABS, f"{what}: max |diff| {err} > {tol} x {peak} + {ABS}"


AFFINE_NO_BIAS = {"norm_elementwise_affine": True, "attention_bias": False}
PADDED = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])  # sample 0: 3 real tokens of 5

# name -> (config overrides, input overrides, mask, temporal on, diffusers' overrides)
CASES = {
    "no_mask": ({}, {}, None, True, {}),
    "padded_mask": ({}, {}, PADDED, True, {}),
    "one_frame": ({}, {"f": 1}, PADDED, True, {}),  # the temporal table is skipped
    "image_mode": ({}, {"f": 6}, PADDED, False, {}),  # spatial blocks only, F beyond video_length
    "fewer_frames": ({}, {"f": 3}, PADDED, True, {"video_length": 3}),  # our table sliced to 3 frames
    "interpolation_scale_2": ({"sample_size": 128, "patch_size": 16}, {"h": 128, "w": 128}, PADDED, True, {}),
    "other_latent_size": ({}, {"h": 8, "w": 12}, PADDED, True, {}),  # a stretched 4x6 table
    "affine_norms_no_qkv_bias": (AFFINE_NO_BIAS, {}, None, True, {}),
}


@pytest.mark.parametrize("backend", ["math", "sdpa"])
@pytest.mark.parametrize("case", list(CASES))
def test_forward_matches_diffusers(case: str, backend: str) -> None:
    config, shape, mask, temporal, ref_overrides = CASES[case]
    ours, ref = _pair(backend, **config)
    if ref_overrides:  # diffusers needs F == video_length: the same weights in a model built for F frames
        ref = LatteTransformer3DModel(**{**TINY, **config, **ref_overrides})
        ref.load_state_dict(ours.state_dict(), strict=True)
        ref.eval()
    inputs = _inputs(**shape)
    with torch.no_grad():
        out = ours(**inputs, encoder_attention_mask=mask, enable_temporal_attentions=temporal)
    _assert_close(out, _reference(ref, **inputs, mask=mask, temporal=temporal), f"{case}/{backend}")


@pytest.mark.parametrize("case", list(CASES))
def test_forward_matches_diffusers_in_fp64(case: str) -> None:
    """In float64 the two agree to ~1e-12: the fp32 differences above are rounding, not a different function
    (diffusers' own fp32 output is further from its fp64 one than ours is from it)."""
    config, shape, mask, temporal, ref_overrides = CASES[case]
    ours, _ = _pair("math", **config)
    ref = LatteTransformer3DModel(**{**TINY, **config, **ref_overrides})
    ref.load_state_dict(ours.state_dict(), strict=True)
    ours, ref = ours.double(), ref.eval().double()
    inputs = {k: v.double() if v.is_floating_point() else v for k, v in _inputs(**shape).items()}
    with torch.no_grad():
        out = ours(**inputs, encoder_attention_mask=mask, enable_temporal_attentions=temporal)
    expected = _reference(ref, **inputs, mask=mask, temporal=temporal)
    err = (out - expected).abs().max().item()
    print(f"{case}/fp64: max |diff| {err:.3g}")
    assert err <= 1e-10 * expected.abs().max().item()


def test_interpolation_scale_follows_diffusers_rule() -> None:
    assert LatteT2V.from_config({**TINY, "sample_size": 128, "patch_size": 16}).interpolation_scale == 2
    assert LatteT2V.from_config(TINY).interpolation_scale == 1


def test_state_dict_layout_matches_diffusers() -> None:
    for overrides in ({}, AFFINE_NO_BIAS):
        config = {**TINY, **overrides}
        ours = {k: tuple(v.shape) for k, v in LatteT2V.from_config(config).state_dict().items()}
        theirs = {k: tuple(v.shape) for k, v in LatteTransformer3DModel(**config).state_dict().items()}
        assert ours == theirs
    assert LatteT2V.FIXED_TABLES == ()  # both sin-cos tables are non-persistent buffers, as in diffusers
    assert not any("pos_embed.table" in k or "temp_pos_embed" in k for k in ours)


def test_latte1_flavor_is_latte1_transformer() -> None:
    """Latte-1's transformer config, and its layout equal to diffusers' (built on the meta device: 1.06e9
    parameters, no memory)."""
    latte1 = {
        "num_attention_heads": 16,
        "attention_head_dim": 72,
        "in_channels": 4,
        "out_channels": 8,
        "num_layers": 28,
        "dropout": 0.0,
        "cross_attention_dim": 1152,
        "attention_bias": True,
        "sample_size": 64,
        "patch_size": 2,
        "activation_fn": "gelu-approximate",
        "num_embeds_ada_norm": 1000,
        "norm_type": "ada_norm_single",
        "norm_elementwise_affine": False,
        "norm_eps": 1e-6,
        "caption_channels": 4096,
        "video_length": 16,
    }
    assert t2v_arch("Latte-1") == t2v_arch("LatteT2V-XL/2") == LATTE_T2V_ARCHS["LatteT2V-XL/2"]
    with torch.device("meta"):
        ours = LATTE_T2V_MODELS["Latte-1"]()
        theirs = LatteTransformer3DModel(**latte1)
    assert ours.diffusers_config() == latte1
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in theirs.state_dict().items()
    }
    assert not set(LATTE_T2V_ARCHS) & set(LATTE_ARCHS)


def test_flavor_lookup_and_tiny_flavor() -> None:
    with pytest.raises(ValueError, match="LatteT2V-T/2"):
        t2v_arch("LatteT2V-Z/9")
    model = LATTE_T2V_MODELS["LatteT2V-T/2"](input_size=8, num_frames=4).eval()
    assert (model.num_layers, model.hidden_size, model.caption_channels) == (2, 64, 32)
    with torch.no_grad():
        out = model(torch.randn(1, 4, 4, 8, 8), torch.tensor([5]), torch.randn(1, 3, 32))
    assert out.shape == (1, 4, 8, 8, 8)
    model.to(torch.bfloat16)  # as a DeepSpeed engine casts it: the timestep frequencies stay fp32
    assert model.adaln_single.emb["timestep_embedder"].freqs.dtype == torch.float32
    with torch.no_grad():
        x, caption = torch.randn(1, 2, 4, 8, 8).bfloat16(), torch.randn(1, 3, 32).bfloat16()
        out = model(x, torch.tensor([5]), caption)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


# ------------------------------------------------------------------------------------------------------
# Caption mask semantics
# ------------------------------------------------------------------------------------------------------


def test_mask_forms_agree_and_padding_is_ignored() -> None:
    ours, _ = _pair()
    inputs = _inputs()
    with torch.no_grad():
        outs = [ours(**inputs, encoder_attention_mask=m) for m in (PADDED.bool(), PADDED, PADDED.float())]
        assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
        changed = dict(inputs, encoder_hidden_states=inputs["encoder_hidden_states"].clone())
        changed["encoder_hidden_states"][0, 3:] = 100.0  # sample 0's padded tokens
        assert torch.equal(ours(**changed, encoder_attention_mask=PADDED), outs[0])
        with pytest.raises(ValueError, match="bias"):
            ours(**inputs, encoder_attention_mask=((1 - PADDED.float()) * -10000.0)[:, None])


def test_caption_without_real_tokens_is_finite_and_ignored() -> None:
    ours, _ = _pair()
    inputs = _inputs()
    mask = torch.tensor([[0, 0, 0, 0, 0], [1, 1, 1, 0, 0]])
    with torch.no_grad():
        out = ours(**inputs, encoder_attention_mask=mask)
        assert torch.isfinite(out).all()
        other = dict(inputs, encoder_hidden_states=torch.randn_like(inputs["encoder_hidden_states"]))
        other["encoder_hidden_states"][1] = inputs["encoder_hidden_states"][1]
        assert torch.equal(ours(**other, encoder_attention_mask=mask)[0], out[0])  # no caption value counts
        alone = {k: v[1:] for k, v in inputs.items()}
        # (batch 1 vs 2 runs other GEMM blockings: 1.2e-5 relative on an AMX Xeon; a masking error is O(1))
        _assert_close(ours(**alone, encoder_attention_mask=mask[1:])[0], out[1], "batch independence", 1e-4)


# ------------------------------------------------------------------------------------------------------
# diffusers folder format
# ------------------------------------------------------------------------------------------------------


def test_from_diffusers_reads_save_pretrained(tmp_path: Path) -> None:
    ours, ref = _pair()
    ref.save_pretrained(tmp_path / "single")
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    inputs = _inputs()
    with torch.no_grad():
        expected = ours(**inputs, encoder_attention_mask=PADDED)
        for folder in ("single", "sharded"):
            loaded = from_diffusers(tmp_path / folder, attention="math").eval()
            assert loaded.diffusers_config() == ours.diffusers_config()
            assert torch.equal(loaded(**inputs, encoder_attention_mask=PADDED), expected)


def test_to_diffusers_loads_strictly_in_diffusers(tmp_path: Path) -> None:
    ours, ref = _pair()
    target = tmp_path / "transformer"
    to_diffusers(ours, target)
    to_diffusers(ours, target)  # replaces the folder there
    assert sorted(p.name for p in tmp_path.iterdir()) == ["transformer"]  # no temporary folder left
    assert json.loads((target / "config.json").read_text())["_class_name"] == "LatteTransformer3DModel"
    loaded, info = LatteTransformer3DModel.from_pretrained(target, output_loading_info=True)
    assert all(not v for v in info.values()), info
    inputs = _inputs()
    expected = _reference(ref, **inputs, mask=PADDED)
    assert torch.equal(_reference(loaded.eval(), **inputs, mask=PADDED), expected)
    with torch.no_grad():
        _assert_close(ours(**inputs, encoder_attention_mask=PADDED), expected, "to_diffusers round trip")


def _edited_folder(tmp_path: Path, edit) -> Path:
    ours, _ = _pair()
    folder = to_diffusers(ours, tmp_path / "model")
    weights = folder / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    edit(tensors)
    save_file(tensors, weights)
    return folder


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda sd: sd.pop("transformer_blocks.0.attn2.to_k.weight"), "missing transformer_blocks.0.attn2"),
        (lambda sd: sd.update({"extra.weight": torch.zeros(3)}), "unexpected extra.weight"),
        (lambda sd: sd.update({"proj_out.bias": torch.zeros(5)}), r"proj_out.bias: shape \(5,\) != \(32,\)"),
    ],
    ids=["missing", "extra", "wrong_shape"],
)
def test_strict_load_errors(tmp_path: Path, edit, message: str) -> None:
    folder = _edited_folder(tmp_path, edit)
    with pytest.raises(ValueError, match=message):
        from_diffusers(folder)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"norm_type": "layer_norm"}, "norm_type 'layer_norm'"),
        ({"activation_fn": "geglu"}, "activation_fn 'geglu'"),
        ({"cross_attention_dim": 24}, "cross_attention_dim 24"),
        ({"use_rope": True}, "unknown key 'use_rope'"),
    ],
)
def test_unrepresentable_config_is_one_clear_error(tmp_path: Path, change: dict, message: str) -> None:
    folder = to_diffusers(_pair()[0], tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ValueError, match=message):
        from_diffusers(folder)


# ------------------------------------------------------------------------------------------------------
# Backends, checkpointing, FLOPs
# ------------------------------------------------------------------------------------------------------


def test_every_backend_runs_and_agrees() -> None:
    ours, ref = _pair()
    inputs = _inputs()
    expected = _reference(ref, **inputs, mask=PADDED)
    for backend in BACKENDS:
        model = LatteT2V.from_config(TINY, attention=backend)
        model.load_state_dict(ours.state_dict())
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # on CPU the CUDA kernels fall back to sdpa with a warning
            out = model.eval()(**inputs, encoder_attention_mask=PADDED)
        tol = TOL if inputs["x"].device.type == "cpu" else 2e-2
        assert (out - expected).abs().max() <= tol * expected.abs().max() + ABS, backend


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    ours, _ = _pair()
    inputs = _inputs()

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        ours.zero_grad()
        ours.gradient_checkpointing = checkpointing
        ours.train()(**inputs, encoder_attention_mask=PADDED).square().mean().backward()
        return {k: p.grad.clone() for k, p in ours.named_parameters()}

    plain, recomputed = grads(False), grads(True)
    assert plain.keys() == recomputed.keys()
    for key in plain:
        torch.testing.assert_close(recomputed[key], plain[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("temporal", [True, False])
def test_flops_count_every_matmul(temporal: bool) -> None:
    model = LATTE_T2V_MODELS["LatteT2V-T/2"](input_size=8, num_frames=4, attention="math").eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, 4, 4, 8, 8), torch.tensor([3]), torch.randn(1, 7, 32), None, temporal)
    flops = t2v_flops_per_sample(t2v_arch("LatteT2V-T/2"), 4, 8, caption_len=7, temporal=temporal)
    assert flops.forward == counter.get_total_flops()
    assert flops.training == 3 * flops.forward
