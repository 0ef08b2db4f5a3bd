"""FLOPs per sample against torch's own FLOP counter, the peak table, and MFU arithmetic."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from latte.metrics import flops_per_sample, peak_flops, peak_for_name
from latte.models import LATTE_ARCHS, Latte
from latte.models.flavors import LatteArch


@pytest.mark.parametrize(
    "arch, frames, latent",
    [
        (LATTE_ARCHS["Latte-T/2"], 4, 8),
        (LatteArch(depth=4, hidden_size=48, num_heads=3, patch_size=4), 3, 16),
    ],
)
def test_flops_match_torch_flop_counter(arch, frames, latent):
    """Counted from shapes == what torch counts when it runs the model (math attention: plain matmuls)."""
    model = Latte(
        input_size=latent, num_frames=frames, num_classes=5, attention="math", **arch.__dict__
    ).eval()
    x = torch.randn(2, frames, 4, latent, latent)
    t, y = torch.tensor([3, 500]), torch.tensor([1, 2])
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, t, y)
    ours = flops_per_sample(arch, frames, latent, in_channels=4, learn_sigma=True)
    assert ours.forward * 2 == pytest.approx(counter.get_total_flops(), rel=1e-9)
    assert ours.training == 3 * ours.forward


def test_latte_xl2_is_about_11_tflop_per_training_sample():
    b = flops_per_sample(LATTE_ARCHS["Latte-XL/2"], 16, 32)
    assert 11.0e12 < b.training < 11.7e12
    assert 0.01 < b.adaln / b.forward < 0.02  # the per-sequence adaLN the released model computes


def test_peak_table():
    assert peak_for_name("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert peak_for_name("NVIDIA H100 PCIe", "bf16") == 756e12
    assert peak_for_name("NVIDIA A100-SXM4-80GB", "bf16") == 312e12
    assert peak_for_name("Some Future GPU", "bf16") is None
    assert peak_flops(torch.device("cpu"), "fp32") == (None, "cpu")


@pytest.mark.parametrize(
    "name, bf16",
    [
        ("NVIDIA H100 NVL", 835e12),  # not the SXM figure its "H100" substring would give
        ("NVIDIA H200 NVL", 835e12),
        ("NVIDIA H800 PCIe", 756e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA GH200 480GB", 989e12),
        ("NVIDIA H800", 989e12),
    ],
)
def test_specific_names_before_their_families(name, bf16):
    assert peak_for_name(name, "bf16") == bf16


def test_fp32_peak_is_tf32_only_with_tf32_on():
    assert peak_for_name("NVIDIA H100 80GB HBM3", "fp32", tf32=True) == 494e12
    assert peak_for_name("NVIDIA H100 80GB HBM3", "fp32", tf32=False) == 67e12
    assert peak_for_name("NVIDIA A100-SXM4-80GB", "fp32", tf32=False) == 19.5e12
    assert peak_for_name("NVIDIA B200", "fp32", tf32=False) is None  # not in the table: MFU n/a


def test_frozen_weights_training_flops_match_torch_flop_counter():
    """LoRA's count (``frozen``): with every weight frozen and the gradient flowing back through every block
    (here: into the spatial position table, as into the first adapters), forward + backward is what torch
    counts: no weight gradients, no input gradient for the patch embedding, adaLN and the embeddings."""
    arch, frames, latent = LATTE_ARCHS["Latte-T/2"], 4, 8
    model = Latte(input_size=latent, num_frames=frames, num_classes=5, attention="math", **arch.__dict__)
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.no_grad():  # adaLN-Zero's zeros would make some products vanish from the graph
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    model.pos_embed.requires_grad_(True)
    x = torch.randn(2, frames, 4, latent, latent)
    t, y = torch.tensor([3, 500]), torch.tensor([1, 2])
    with FlopCounterMode(display=False) as counter:
        model(x, t, y).square().sum().backward()
    ours = dataclasses.replace(flops_per_sample(arch, frames, latent), frozen=True)
    assert ours.training * 2 == pytest.approx(counter.get_total_flops(), rel=1e-9)
    assert 0.6 < ours.training / flops_per_sample(arch, frames, latent).training < 0.7
