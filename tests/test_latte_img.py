"""Video-image joint training (Latte-img): equality with the original ``latte_img.py``, images kept out of the
temporal blocks, image labels and their dropout, gradient checkpointing, input checks."""

from __future__ import annotations

import pytest
import torch
from make_reference_outputs import machine_key
from reference_case import CASES_IMG, build_joint_case, joint_drop_ids
from test_model import _goldens, _rel_err

from latte.models import Latte


def _labels(inp: dict) -> dict:
    return {k: inp[k] for k in ("y", "y_image") if k in inp}


def _joint(model: Latte, inp: dict, x: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    """The joint forward of a ``build_joint_case`` input (x replaced if given): (N, F+K, C_out, H, W)."""
    with torch.no_grad():
        x = inp["x"] if x is None else x
        return model(x, inp["t"], use_image_num=inp["use_image_num"], **{**_labels(inp), **kwargs})


def _original_goldens(case: str) -> dict[str, torch.Tensor]:
    """The original's joint outputs of ``case`` recorded on this CPU kind (``test_model._goldens``), by
    machine; entries recorded before the joint cases existed have none."""
    return {key: g[case]["forward"] for key, g in _goldens().items() if case in g}


# ------------------------------------------------------------------------------------------------------
# Equality with the original latte_img.py (its training-mode forward: the one that takes images)
# ------------------------------------------------------------------------------------------------------


def _ours(case: str, attention: str) -> torch.Tensor:
    model, inp = build_joint_case(CASES_IMG[case], attention=attention)
    # Training mode as the original ran; label dropout: none, or the original's seeded draws as force ids.
    return _joint(model.train(), inp, **joint_drop_ids(CASES_IMG[case]))


@pytest.mark.parametrize("case", sorted(CASES_IMG))
def test_joint_math_equals_original_bit_for_bit(case: str) -> None:
    """As ``test_model.test_math_equals_original_bit_for_bit``: bitwise equal to the original's outputs
    recorded on this machine kind; on a CPU kind none was recorded on, within rounding and skipped."""
    ours, goldens = _ours(case, "math"), _original_goldens(case)
    if not goldens:
        pytest.skip(f"NO JOINT GOLDEN OUTPUTS FOR '{machine_key()}' (tests/make_reference_outputs.py)")
    if any(torch.equal(ours, g) for g in goldens.values()):
        return
    if machine_key() in goldens:
        raise AssertionError(f"ours differs from the original's joint outputs recorded on '{machine_key()}'")
    worst = max(_rel_err(ours, g) for g in goldens.values())
    assert worst <= 1e-4, f"ours is {worst:.3g} (relative) from the original's outputs: not rounding"
    pytest.skip(f"NO JOINT GOLDEN OUTPUTS FOR '{machine_key()}' (ours is within {worst:.2g} of the others')")


@pytest.mark.parametrize("case", sorted(CASES_IMG))
def test_joint_sdpa_close_to_original(case: str) -> None:
    goldens = _original_goldens(case)
    if not goldens:
        pytest.skip(f"NO JOINT GOLDEN OUTPUTS FOR CPU CAPABILITY {torch.backends.cpu.get_cpu_capability()}")
    assert _rel_err(_ours(case, "sdpa"), next(iter(goldens.values()))) <= 1e-4


# ------------------------------------------------------------------------------------------------------
# Images stay out of the temporal blocks
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["math", "sdpa"])
@pytest.mark.parametrize("case", ["joint_class_conditional", "joint_unconditional"])
def test_image_changes_only_its_own_output(case: str, backend: str) -> None:
    """An image's latent (and label) reach its own output alone: never a video frame's or another image's
    (bitwise: the batch is the same, only that image's values differ)."""
    model, inp = build_joint_case(CASES_IMG[case], attention=backend)
    k = inp["use_image_num"]
    f = inp["x"].shape[1] - k
    base = _joint(model, inp)
    x = inp["x"].clone()
    x[0, f + 1] = torch.randn(x[0, f + 1].shape, generator=torch.Generator().manual_seed(5)) * 3
    changed = _joint(model, inp, x)
    others = [i for i in range(f + k) if i != f + 1]
    assert torch.equal(changed[:, others], base[:, others])
    assert torch.equal(changed[1:], base[1:])  # other samples
    assert not torch.allclose(changed[0, f + 1], base[0, f + 1])
    if "y_image" in inp:  # each image is conditioned on its own label, in the spatial and final layers
        y_image = inp["y_image"].clone()
        y_image[0, 1] = (y_image[0, 1] + 1) % model.num_classes
        relabelled = _joint(model, inp, y_image=y_image)
        assert torch.equal(relabelled[:, others], base[:, others]) and torch.equal(relabelled[1:], base[1:])
        assert not torch.allclose(relabelled[0, f + 1], base[0, f + 1])


@pytest.mark.parametrize("backend", ["math", "sdpa"])
@pytest.mark.parametrize("case", ["joint_class_conditional", "joint_unconditional"])
def test_video_frames_as_the_video_only_forward(case: str, backend: str) -> None:
    """With images on, the video frames' outputs are the video-only forward's. Bitwise when the hidden size
    is a multiple of 32 (the class-conditional case's 32). Otherwise within float32 rounding (the
    unconditional case's 48: ~3e-7 relative): the images ride in the same spatial batch, as in the
    original, and an elementwise kernel (SiLU, GELU, ...) computes the last partial block of its vector loop
    (32 floats on AVX-512) by another code path whose exp rounds differently, and which elements fall in that
    tail depends on the tensor's length, F+K frames or F. Computing the images apart would change the
    original's numerics, so ours does not."""
    model, inp = build_joint_case(CASES_IMG[case], attention=backend)
    f = inp["x"].shape[1] - inp["use_image_num"]
    joint = _joint(model, inp)
    with torch.no_grad():
        video = model(inp["x"][:, :f], inp["t"], inp.get("y"))  # (N, F, C_out, H, W)
    if model.pos_embed.shape[-1] % 32 == 0:
        assert torch.equal(joint[:, :f], video)
    else:
        assert _rel_err(joint[:, :f], video) <= 1e-6


def test_images_get_no_temporal_position() -> None:
    """With the temporal blocks made the identity (zero gates), a video frame and an image of the same
    latent and label differ by the temporal table alone: apart with it, equal (to rounding) without it."""
    model, inp = build_joint_case(CASES_IMG["joint_class_conditional"])  # F = 4, K = 2
    with torch.no_grad():
        for block in model.blocks[1::2]:
            block.adaLN_modulation[-1].weight.zero_()
            block.adaLN_modulation[-1].bias.zero_()
    x, y_image = inp["x"].clone(), inp["y_image"].clone()
    f = x.shape[1] - 2
    x[:, f + 1], y_image[:, 1] = x[:, 1], inp["y"]  # image 1: a copy of video frame 1, with the clip's label
    out = _joint(model, inp, x, y_image=y_image)
    assert not torch.allclose(out[:, f + 1], out[:, 1], atol=1e-3)
    with torch.no_grad():
        model.temp_embed.zero_()
    out = _joint(model, inp, x, y_image=y_image)
    assert _rel_err(out[:, f + 1], out[:, 1]) <= 1e-6


def test_attention_mask_covers_all_frames() -> None:
    """attention_mask (N, F+K): a padded video frame is no key to the other video frames (and images never
    see it: they attend within themselves only)."""
    model, inp = build_joint_case(CASES_IMG["joint_unconditional"], attention="math")  # F = 3, K = 3
    n, frames = inp["x"].shape[:2]
    mask = torch.ones(n, frames, dtype=torch.bool)
    mask[:, 2] = False  # the last video frame is padding
    x = inp["x"].clone()
    x[:, 2] = torch.randn(x[:, 2].shape, generator=torch.Generator().manual_seed(3)) * 3
    a, b = _joint(model, inp, attention_mask=mask), _joint(model, inp, x, attention_mask=mask)
    kept = [0, 1, 3, 4, 5]
    assert torch.equal(a[:, kept], b[:, kept])
    unmasked_a, unmasked_b = _joint(model, inp), _joint(model, inp, x)
    assert not torch.allclose(unmasked_a[:, :2], unmasked_b[:, :2])  # without the mask it leaks
    assert torch.equal(unmasked_a[:, 3:], unmasked_b[:, 3:])  # but never into the images


# ------------------------------------------------------------------------------------------------------
# Image labels and their dropout
# ------------------------------------------------------------------------------------------------------


def test_image_label_dropout_is_per_sample() -> None:
    """force_drop_image_ids (N,) drops all K image labels of a sample (the original's granularity), (N, K)
    single images; the clip's force_drop_ids leaves the image labels alone; p = 1 drops them all."""
    model, inp = build_joint_case(dict(CASES_IMG["joint_class_dropout"], class_dropout_prob=1.0))
    null = model.num_classes
    y_image = inp["y_image"]
    first_sample_null = y_image.clone()
    first_sample_null[0] = null
    expected = _joint(model, inp, y_image=first_sample_null)
    per_sample = torch.tensor([1, 0, 0, 0])
    assert torch.equal(_joint(model, inp, force_drop_image_ids=per_sample), expected)
    per_image = per_sample[:, None].expand_as(y_image)
    assert torch.equal(_joint(model, inp, force_drop_image_ids=per_image), expected)

    clip_dropped = _joint(model, inp, force_drop_ids=torch.ones(4, dtype=torch.long))
    clip_null = _joint(model, inp, y=torch.full_like(inp["y"], null))
    assert torch.equal(clip_dropped, clip_null)

    all_null = _joint(model, inp, y=torch.full_like(inp["y"], null), y_image=torch.full_like(y_image, null))
    assert torch.equal(_joint(model.train(), inp), all_null)  # training, p = 1: every label is dropped


# ------------------------------------------------------------------------------------------------------
# Gradient checkpointing, input checks
# ------------------------------------------------------------------------------------------------------


def _loss_and_grads(model: Latte, inp: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.train().zero_grad()
    out = model(inp["x"], inp["t"], use_image_num=inp["use_image_num"], **_labels(inp))
    loss = out.square().mean()  # over all F+K frames, as the original's loss
    loss.backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_gradient_checkpointing_same_outputs_and_grads() -> None:
    case = CASES_IMG["joint_class_conditional"]
    plain, inp = build_joint_case(case)
    ckpt, _ = build_joint_case(dict(case, gradient_checkpointing=True))
    out_a, grads_a = _loss_and_grads(plain, inp)
    out_b, grads_b = _loss_and_grads(ckpt, inp)
    assert torch.equal(out_a, out_b)
    for name, g in grads_a.items():
        assert (g - grads_b[name]).abs().max() <= 1e-6, name
    assert grads_a["y_embedder.embedding_table.weight"][inp["y_image"].unique()].abs().sum() > 0


def test_bad_image_inputs_raise() -> None:
    model, inp = build_joint_case(CASES_IMG["joint_class_conditional"])  # F = 4 = num_frames, K = 2
    x, t, y, y_image = inp["x"], inp["t"], inp["y"], inp["y_image"]
    with pytest.raises(ValueError, match="use_image_num 6 must be in"):
        model(x, t, y, y_image=y_image, use_image_num=6)  # no video frame left
    with pytest.raises(ValueError, match="temporal table covers 4"):
        model(x, t, y, y_image=y_image[:, :1], use_image_num=1)  # 5 video frames
    with pytest.raises(ValueError, match=r"y_image must hold .* \(2, 2\), got None"):
        model(x, t, y, use_image_num=2)
    with pytest.raises(ValueError, match=r"y_image must hold .* \(2, 2\), got \(2, 3\)"):
        model(x, t, y, y_image=torch.zeros(2, 3, dtype=torch.long), use_image_num=2)
    with pytest.raises(ValueError, match=r"y_image must hold .* \(2, 0\), got \(2, 2\)"):
        model(x[:, :4], t, y, y_image=y_image)  # labels of images that are not there
