"""Add this machine's golden outputs of the original Latte to ``tests/data/reference_outputs.pt``.

    python tests/make_reference_outputs.py --original PATH/TO/Latte   # a github.com/Vchitect/Latte checkout

The original ``models/latte.py`` (attention_mode="math") is loaded by path (``benchmarks/vs_original.py``'s
loader, with its timm shim when timm is absent), loads each case's state dict of ``reference_case.py`` with
strict=True and computes ``forward`` (and ``forward_with_cfg`` for the class-conditional case). The joint
video-image model ``models/latte_img.py`` computes the training-mode ``forward`` of each ``CASES_IMG`` case
(with images; label dropout drawn after ``torch.manual_seed(DROP_SEED)``). The outputs are stored under
``machine_key()``: ATen's CPU capability and the CPU's model and ISA extensions, since MKL and oneDNN pick
kernels (and so roundings) by CPU, not only by ATen's capability. Existing entries are kept (this machine's
cases are replaced one by one: an entry made before the joint cases keeps its video cases' tensors).
"""

from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "benchmarks")]
GOLDEN = HERE / "data" / "reference_outputs.pt"
ISA_FLAGS = ("avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile")  # what MKL/oneDNN dispatch on


def machine_key() -> str:
    """e.g. "AVX512 | Intel(R) Xeon(R) Processor | avx512f avx512_bf16 avx512_fp16 amx_bf16 amx_tile"."""
    model, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    present = " ".join(f for f in ISA_FLAGS if f in flags) or "-"
    return f"{torch.backends.cpu.get_cpu_capability()} | {model} | {present}"


def _original_model(module, case: dict, ours: torch.nn.Module) -> torch.nn.Module:
    """The original's Latte for ``case`` (eval mode), holding ``ours``' weights (strict)."""
    params = inspect.signature(module.Latte.__init__).parameters
    kwargs = {k: v for k, v in case.items() if k in params and k != "num_classes"}
    classes = case["num_classes"]
    ref = module.Latte(
        **kwargs, num_classes=classes or 1000, extras=2 if classes else 1, attention_mode="math"
    ).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ref


def original_outputs(checkout: Path) -> dict[str, dict[str, torch.Tensor | None]]:
    from reference_case import CASES, CASES_IMG, CFG_SCALE, DROP_SEED, build_case, build_joint_case
    from vs_original import load_original

    module, _ = load_original(checkout)
    joint, _ = load_original(checkout, "latte_img")
    out = {}
    for name, case in CASES.items():
        ours, inp = build_case(case, attention="math")
        classes = case["num_classes"]
        ref = _original_model(module, case, ours)
        with torch.no_grad():
            forward = ref(inp["x"], inp["t"], y=inp.get("y")) if classes else ref(inp["x"], inp["t"])
            guided = (
                ref.forward_with_cfg(inp["x"], inp["t"], y=inp["y_cfg"], cfg_scale=CFG_SCALE)
                if classes
                else None
            )
        out[name] = {"forward": forward, "forward_with_cfg": guided}
    for name, case in CASES_IMG.items():
        ours, inp = build_joint_case(case, attention="math")
        ref = _original_model(joint, case, ours).train()  # its forward takes images in training mode only
        labels = {"y": inp["y"], "y_image": inp["y_image"]} if case["num_classes"] else {}
        torch.manual_seed(DROP_SEED)  # its label dropout's draws (reference_case.joint_drop_ids)
        with torch.no_grad():
            forward = ref(inp["x"], inp["t"], use_image_num=inp["use_image_num"], **labels)
        out[name] = {"forward": forward}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--original", type=Path, required=True, help="checkout of github.com/Vchitect/Latte")
    args = parser.parse_args()
    golden = torch.load(GOLDEN) if GOLDEN.is_file() else {}
    key = machine_key()
    golden[key] = {**golden.get(key, {}), **original_outputs(args.original)}
    torch.save(golden, GOLDEN)
    print(f"{GOLDEN}: added '{key}' ({len(golden)} machines)")


if __name__ == "__main__":
    main()
