"""Latte model, its attention backends and the flavors dict ``LATTE_MODELS``."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

from latte.models.attention import BACKENDS, resolve_backend
from latte.models.flavors import LATTE_ARCHS, LatteArch
from latte.models.latte import Latte

LATTE_MODELS: dict[str, Callable[..., Latte]] = {
    name: functools.partial(Latte, **dataclasses.asdict(arch)) for name, arch in LATTE_ARCHS.items()
}

__all__ = ["BACKENDS", "LATTE_ARCHS", "LATTE_MODELS", "Latte", "LatteArch", "resolve_backend"]
