"""Fixed tiny configurations with deterministic weights and inputs, shared by the reference-equality test
and the script that produced ``tests/data/reference_outputs.pt``.

The golden outputs were computed by the original Latte ``models/latte.py`` (attention_mode="math", commit
b27c24a of github.com/Vchitect/Latte) after loading exactly these state dicts with strict=True, once per
machine kind (``tests/make_reference_outputs.py``), since ATen, MKL and oneDNN round differently on AVX2,
AVX-512 and AMX CPUs: "AVX512" on the machine of the first sessions, "AVX2" on an AMD EPYC (Zen 3), and an
Intel Sapphire Rapids entry (up to ~1e-4 from the other two; ours equals each on its machine bit for bit).
The weights are random (not the zero-initialised adaLN of a fresh model) so that every block matters.
"""

from __future__ import annotations

import torch

from latte.models import Latte

CFG_SCALE = 4.0  # the guidance scale of the golden forward_with_cfg outputs

CASES: dict[str, dict] = {
    "class_conditional": dict(
        input_size=8,
        patch_size=2,
        in_channels=4,
        hidden_size=32,
        depth=4,
        num_heads=2,
        mlp_ratio=4.0,
        num_frames=4,
        class_dropout_prob=0.1,
        num_classes=5,
        learn_sigma=True,
        batch=2,
    ),
    "unconditional": dict(
        input_size=16,
        patch_size=4,
        in_channels=4,
        hidden_size=48,
        depth=6,
        num_heads=3,
        mlp_ratio=2.0,
        num_frames=3,
        class_dropout_prob=0.0,
        num_classes=0,
        learn_sigma=False,
        batch=3,
    ),
}


def build_case(case: dict, attention: str = "math") -> tuple[Latte, dict[str, torch.Tensor]]:
    """Our model with seeded random weights (sin-cos tables left as built) and seeded inputs."""
    kwargs = {k: v for k, v in case.items() if k != "batch"}
    model = Latte(attention=attention, **kwargs).eval()
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in model.state_dict().items():
            if name not in ("pos_embed", "temp_embed"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    n, f = case["batch"], case["num_frames"]
    x = torch.randn(n, f, case["in_channels"], case["input_size"], case["input_size"], generator=g)
    inputs = {"x": x, "t": torch.randint(0, 1000, (n,), generator=g)}
    if case["num_classes"]:
        inputs["y"] = torch.randint(0, case["num_classes"], (n,), generator=g)
        null = torch.full((n,), case["num_classes"])
        inputs["y_cfg"] = torch.cat([inputs["y"], null])
        inputs["x"] = torch.cat([x, x])  # guided batches are [cond | uncond] over the same latents
        inputs["t"] = torch.cat([inputs["t"], inputs["t"]])
        inputs["y"] = torch.cat([inputs["y"], inputs["y"]])
    return model, inputs
