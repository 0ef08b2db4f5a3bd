"""The weights a run starts from (``model.init_from``), and their identity.

``init_from`` is one of

* a diffusers transformer folder (``config.json`` + safetensors, e.g. Latte-1's ``transformer/``): the
  text-to-video model;
* a checkpoint directory of ours, or one ``step_XXXXXXXX`` directory: its consolidated EMA;
* a weights file: a released Latte checkpoint (``.pt``: a bare state dict, or its ``ema``) or our export
  (``.pt`` / ``.safetensors``: its ``ema``).

``base_identity(path)`` is ``{"path", "sha256"}`` of the bytes the weights are read from: a LoRA run records
it in every ``meta.json`` and a resume refuses a base whose bytes changed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from latte.config import ConfigError
from latte.errors import first_line


def _step_dir(path: Path) -> Path:
    from latte import checkpoint as ckpt

    step_dir = ckpt.choose(str(path), path)
    meta = json.loads((step_dir / ckpt.META).read_text())
    if (meta["config"]["model"].get("lora") or {}).get("rank"):
        raise ConfigError(
            f"{step_dir} is a LoRA run's checkpoint (its EMA holds adapters only): export it merged "
            "(python -m latte.export CKPT OUT.pt) and start from that"
        )
    return step_dir


def base_files(path: str | Path) -> list[Path]:
    """The files ``read_base`` reads (their bytes are what ``base_identity`` hashes)."""
    from latte import checkpoint as ckpt
    from latte.models.diffusers_io import CONFIG_NAME, INDEX_NAME, WEIGHTS_NAME

    where = Path(path)
    if where.is_file():
        return [where]
    if not where.is_dir():
        raise ConfigError(f"no such file or directory: {path}")
    if (where / CONFIG_NAME).is_file():  # a diffusers folder: its weights, one file or the shards
        if (where / WEIGHTS_NAME).is_file():
            return [where / WEIGHTS_NAME]
        if (where / INDEX_NAME).is_file():
            shards = sorted(set(json.loads((where / INDEX_NAME).read_text())["weight_map"].values()))
            return [where / INDEX_NAME, *(where / s for s in shards)]
    return [_step_dir(where) / ckpt.EMA_FULL]


def read_base(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict ``model.init_from`` names (see the module docstring); one-line ``ConfigError``s."""
    from latte.models.diffusers_io import CONFIG_NAME, read_weights
    from latte.sampling.weights import read_weights_file

    where = Path(path)
    try:
        if where.is_dir() and (where / CONFIG_NAME).is_file():
            return read_weights(where)
        (file,) = base_files(where)[-1:]
        if file.name.endswith("ema_consolidated.pt"):
            return torch.load(file, map_location="cpu", weights_only=True)
        return read_weights_file(file, "ema")
    except (OSError, ValueError, RuntimeError) as exc:  # ConfigErrors too: one line, prefixed once
        raise ConfigError(f"model.init_from: {first_line(exc)}") from None


_IDENTITY_CACHE: dict[tuple, dict[str, str]] = {}


def base_identity(path: str | Path) -> dict[str, str]:
    """``{"path": path, "sha256": <hex of the bytes of base_files(path), in order>}`` (cached per process
    for files whose size and mtime did not change: a run hashes its base once)."""
    try:
        files = base_files(path)
    except ConfigError as exc:
        raise ConfigError(f"model.init_from: {exc}") from None
    key = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    if key not in _IDENTITY_CACHE:
        digest = hashlib.sha256()
        for file in files:
            with open(file, "rb") as f:
                while block := f.read(16 << 20):
                    digest.update(block)
        _IDENTITY_CACHE[key] = {"path": str(path), "sha256": digest.hexdigest()}
    return dict(_IDENTITY_CACHE[key])
