"""Add this machine's golden outputs of the original Latte to ``tests/data/reference_outputs.pt``.

    python tests/make_reference_outputs.py --original PATH/TO/Latte   # a github.com/Vchitect/Latte checkout

The original ``models/latte.py`` (attention_mode="math") is loaded by path (``benchmarks/vs_original.py``'s
loader, with its timm shim when timm is absent), loads each case's state dict of ``reference_case.py`` with
strict=True and computes ``forward`` (and ``forward_with_cfg`` for the class-conditional case). The outputs
are stored under ``machine_key()``: ATen's CPU capability and the CPU's model and ISA extensions, since MKL
and oneDNN pick kernels (and so roundings) by CPU, not only by ATen's capability. Existing entries are kept.
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


def original_outputs(checkout: Path) -> dict[str, dict[str, torch.Tensor | None]]:
    from reference_case import CASES, CFG_SCALE, build_case
    from vs_original import load_original

    module, _ = load_original(checkout)
    params = inspect.signature(module.Latte.__init__).parameters
    out = {}
    for name, case in CASES.items():
        ours, inp = build_case(case, attention="math")
        kwargs = {k: v for k, v in case.items() if k in params and k != "num_classes"}
        classes = case["num_classes"]
        ref = module.Latte(
            **kwargs, num_classes=classes or 1000, extras=2 if classes else 1, attention_mode="math"
        ).eval()
        ref.load_state_dict(ours.state_dict(), strict=True)
        with torch.no_grad():
            forward = ref(inp["x"], inp["t"], y=inp.get("y")) if classes else ref(inp["x"], inp["t"])
            guided = (
                ref.forward_with_cfg(inp["x"], inp["t"], y=inp["y_cfg"], cfg_scale=CFG_SCALE)
                if classes
                else None
            )
        out[name] = {"forward": forward, "forward_with_cfg": guided}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--original", type=Path, required=True, help="checkout of github.com/Vchitect/Latte")
    args = parser.parse_args()
    golden = torch.load(GOLDEN) if GOLDEN.is_file() else {}
    key = machine_key()
    golden[key] = original_outputs(args.original)
    torch.save(golden, GOLDEN)
    print(f"{GOLDEN}: added '{key}' ({len(golden)} machines)")


if __name__ == "__main__":
    main()
