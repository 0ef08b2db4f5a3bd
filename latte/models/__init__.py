"""Latte models: the class-conditional ``Latte`` and its flavors dict ``LATTE_MODELS``; the text-to-video
``LatteT2V`` (Latte-1) and ``LATTE_T2V_MODELS``, with diffusers' folder format (``from_diffusers`` /
``to_diffusers``); the attention backends."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

from latte.models.attention import BACKENDS, resolve_backend
from latte.models.diffusers_io import from_diffusers, to_diffusers
from latte.models.flavors import LATTE_ARCHS, LATTE_T2V_ARCHS, LatteArch, LatteT2VArch, t2v_arch
from latte.models.latte import Latte
from latte.models.latte_t2v import LatteT2V

LATTE_MODELS: dict[str, Callable[..., Latte]] = {
    name: functools.partial(Latte, **dataclasses.asdict(arch)) for name, arch in LATTE_ARCHS.items()
}
# LATTE_T2V_MODELS[name](input_size=..., num_frames=..., ...): the other arguments default to Latte-1's.
LATTE_T2V_MODELS: dict[str, Callable[..., LatteT2V]] = {
    name: functools.partial(LatteT2V, **dataclasses.asdict(arch)) for name, arch in LATTE_T2V_ARCHS.items()
}

__all__ = [
    "BACKENDS",
    "LATTE_ARCHS",
    "LATTE_MODELS",
    "LATTE_T2V_ARCHS",
    "LATTE_T2V_MODELS",
    "Latte",
    "LatteArch",
    "LatteT2V",
    "LatteT2VArch",
    "from_diffusers",
    "resolve_backend",
    "t2v_arch",
    "to_diffusers",
]
