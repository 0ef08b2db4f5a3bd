"""Fixed tiny configurations with deterministic weights and inputs, shared by the reference-equality test
and the script that produced ``tests/data/reference_outputs.pt``.

The golden outputs were computed by the original Latte ``models/latte.py`` (attention_mode="math", commit
b27c24a of github.com/Vchitect/Latte) after loading exactly these state dicts with strict=True, once per
machine kind (``tests/make_reference_outputs.py``), since ATen, MKL and oneDNN round differently on AVX2,
AVX-512 and AMX CPUs: "AVX512" on the machine of the first sessions, "AVX2" on an AMD EPYC (Zen 3), and an
Intel Sapphire Rapids entry (up to ~1e-4 from the other two; ours equals each on its machine bit for bit).
The weights are random (not the zero-initialised adaLN of a fresh model) so that every block matters.

``CASES_IMG``: the joint video-image model (the original's ``models/latte_img.py``), F video frames then K
images per sample, its training-mode forward (the one that takes images). Label dropout is off in one
class-conditional case, and on in another, made deterministic by seeding: the original draws it from the
global RNG after ``torch.manual_seed(DROP_SEED)``, and ours gets the same draws as force-drop ids
(``joint_drop_ids``).
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


CASES_IMG: dict[str, dict] = {
    "joint_class_conditional": dict(CASES["class_conditional"], class_dropout_prob=0.0, use_image_num=2),
    "joint_class_dropout": dict(CASES["class_conditional"], class_dropout_prob=0.5, use_image_num=3, batch=4),
    "joint_unconditional": dict(CASES["unconditional"], use_image_num=3),
}
DROP_SEED = 2  # its draws give the 4 samples all 4 (clip label, image labels) kept/dropped pairs


def _seeded_model(case: dict, attention: str, g: torch.Generator) -> Latte:
    """Our model with seeded random weights (sin-cos tables left as built), in eval mode."""
    kwargs = {k: v for k, v in case.items() if k not in ("batch", "use_image_num")}
    model = Latte(attention=attention, **kwargs).eval()
    with torch.no_grad():
        for name, p in model.state_dict().items():
            if name not in ("pos_embed", "temp_embed"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def build_case(case: dict, attention: str = "math") -> tuple[Latte, dict[str, torch.Tensor]]:
    """Our model with seeded random weights (sin-cos tables left as built) and seeded inputs."""
    g = torch.Generator().manual_seed(1234)
    model = _seeded_model(case, attention, g)
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


def build_joint_case(case: dict, attention: str = "math") -> tuple[Latte, dict]:
    """A ``CASES_IMG`` case: our model (eval mode) and the joint forward's inputs, x (N, F+K, C, H, W) with
    the K images last, t, ``use_image_num`` K, and y (N,), y_image (N, K) for class-conditional cases."""
    g = torch.Generator().manual_seed(1234)
    model = _seeded_model(case, attention, g)
    n, f, k, size = case["batch"], case["num_frames"], case["use_image_num"], case["input_size"]
    x = torch.randn(n, f + k, case["in_channels"], size, size, generator=g)  # (N, F+K, C, H, W)
    inputs = {"x": x, "t": torch.randint(0, 1000, (n,), generator=g), "use_image_num": k}
    if case["num_classes"]:
        inputs["y"] = torch.randint(0, case["num_classes"], (n,), generator=g)  # (N,)
        inputs["y_image"] = torch.randint(0, case["num_classes"], (n, k), generator=g)  # (N, K)
    return model, inputs


def joint_drop_ids(case: dict) -> dict[str, torch.Tensor]:
    """The label dropout the original's training-mode joint forward draws after ``torch.manual_seed(
    DROP_SEED)``, as our force-drop ids: ``rand(N)`` for the clips' labels, then one ``rand(1)`` per sample
    for all its K image labels (it embeds ``y_image[n].reshape(1, K)`` sample by sample). {}: no dropout."""
    p, n = case["class_dropout_prob"], case["batch"]
    if not (case["num_classes"] and p > 0):
        return {}
    g = torch.Generator().manual_seed(DROP_SEED)  # the same stream as the default CPU generator's
    clips = torch.rand(n, generator=g) < p  # (N,)
    images = torch.cat([torch.rand(1, generator=g) < p for _ in range(n)])  # (N,), one draw per sample
    return {"force_drop_ids": clips.long(), "force_drop_image_ids": images.long()}
