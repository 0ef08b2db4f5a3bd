"""The Latte model zoo: architecture shapes by name ("Latte-XL/2", ..., and a tiny "Latte-T/2")."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LatteArch:
    """Transformer shape of one flavor; ``depth`` counts spatial and temporal blocks together."""

    depth: int
    hidden_size: int
    num_heads: int
    patch_size: int
    mlp_ratio: float = 4.0


_SIZES = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6)}

LATTE_ARCHS: dict[str, LatteArch] = {
    f"Latte-{size}/{patch}": LatteArch(depth, hidden, heads, patch)
    for size, (depth, hidden, heads) in _SIZES.items()
    for patch in (2, 4, 8)
}
# Two spatial-temporal pairs, head dim 16: for tests and the CPU demo.
LATTE_ARCHS["Latte-T/2"] = LatteArch(depth=4, hidden_size=64, num_heads=4, patch_size=2)
