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


# ----------------------------------------------------------------------------------------------------------
# Text-to-video (LatteT2V, Latte-1's layout). A separate table: here ``num_layers`` counts spatial-temporal
# PAIRS (diffusers' ``num_layers``), not blocks as ``LatteArch.depth`` does.
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LatteT2VArch:
    """Transformer shape of one text-to-video flavor; ``num_layers`` = spatial-temporal pairs (Latte-1: 28
    pairs = 56 blocks), ``caption_channels`` = the text encoder's width (T5-XXL: 4096)."""

    num_layers: int
    hidden_size: int
    num_heads: int
    patch_size: int
    caption_channels: int = 4096

    @property
    def depth(self) -> int:
        """Blocks, spatial and temporal together (``LatteArch.depth``'s convention)."""
        return 2 * self.num_layers


LATTE_T2V_ARCHS: dict[str, LatteT2VArch] = {
    # Latte-1's transformer (maxin-cn/Latte-1 transformer/config.json): 28 pairs, 16 heads x 72, T5-XXL.
    "LatteT2V-XL/2": LatteT2VArch(num_layers=28, hidden_size=1152, num_heads=16, patch_size=2),
    # Two pairs, head dim 16, a 32-wide caption: for tests and the CPU demo.
    "LatteT2V-T/2": LatteT2VArch(
        num_layers=2, hidden_size=64, num_heads=4, patch_size=2, caption_channels=32
    ),
}
LATTE_T2V_ARCHS["Latte-1"] = LATTE_T2V_ARCHS["LatteT2V-XL/2"]


def t2v_arch(name: str) -> LatteT2VArch:
    """The text-to-video flavor ``name``; a ValueError listing the known names otherwise."""
    if name not in LATTE_T2V_ARCHS:
        raise ValueError(f"unknown text-to-video flavor {name!r}; choose one of {', '.join(LATTE_T2V_ARCHS)}")
    return LATTE_T2V_ARCHS[name]
