"""Where the sampling weights and config come from, and the check that they fit each other.

A source is one of:

* a checkpoint directory of ours (``train.ckpt_dir``: its newest complete step) or one ``step_XXXXXXXX``
  directory: the EMA from ``ema_consolidated.pt`` (or, with ``weights="model"``, the raw weights assembled
  from the ZeRO shards); the config is the resolved one saved in its ``meta.json`` unless one is given;
* an exported ``.pt`` in the reference's layout, ``{"ema": sd}``, ``{"model": sd, "ema": sd}`` or a bare
  state dict (the released Latte checkpoints load this way), or a ``.safetensors`` from ``latte.export``
  (``model.``/``ema.`` key prefixes, or bare keys); these hold no config, so one must be given.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from latte import checkpoint as ckpt
from latte.config import Config, ConfigError, config_from_dict, load_config
from latte.errors import first_line

WEIGHTS = ("ema", "model")
PARTS = ("model", "ema")  # the top-level keys of an exported file


class SourceError(ConfigError):
    """Weights that cannot be used; one line naming the file (and key)."""


@dataclass
class Source:
    cfg: Config
    state_dict: dict[str, torch.Tensor]
    weights_file: str  # the file the weights were read from (for messages)
    description: str  # e.g. "EMA of /runs/checkpoints/step_00000060, config from its meta.json"
    dataset: dict | None = None  # what the model was trained on, as meta.json records it (VAE, factor)
    base: dict | None = None  # a LoRA run's base weights as meta.json records them (path, sha256)


def load_source(
    path: str, weights: str = "ema", config: str | None = None, overrides: list[str] | None = None
) -> Source:
    """Config (checked first: it is cheap) and weights of ``path``; raises one-line ``ConfigError``s."""
    if weights not in WEIGHTS:
        raise SourceError(f"weights '{weights}' is not one of {', '.join(WEIGHTS)}")
    where = Path(path)
    if where.is_dir():
        step_dir = ckpt.choose(str(where), where)
        meta = _saved_meta(step_dir)
        if config is not None:
            cfg, config_from = load_config(config, overrides), config
        else:
            cfg, config_from = config_from_dict(meta["config"], overrides), f"{step_dir / ckpt.META}"
        if weights == "ema":
            file = step_dir / ckpt.EMA_FULL
            state_dict = torch.load(file, map_location="cpu", weights_only=True)
        else:
            file = step_dir
            state_dict = ckpt.consolidated_model(step_dir)
        what = f"{'EMA' if weights == 'ema' else 'raw weights'} of {step_dir}"
        description = f"{what}, config from {config_from}"
        return Source(cfg, state_dict, str(file), description, meta.get("dataset"), meta.get("base"))
    if not where.is_file():
        raise SourceError(f"no such checkpoint directory or weights file: {path}")
    if config is None:
        raise SourceError(f"{path} holds weights only; pass --config (the YAML the model was trained with)")
    cfg = load_config(config, overrides)
    state_dict = read_weights_file(where, weights)
    return Source(cfg, state_dict, str(where), f"{weights} weights of {where}, config from {config}")


def _saved_meta(step_dir: Path) -> dict:
    try:
        meta = json.loads((step_dir / ckpt.META).read_text())
        meta["config"]  # noqa: B018 (what sampling needs of it)
        return meta
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SourceError(f"{step_dir / ckpt.META} holds no readable config ({type(exc).__name__})") from None


def read_weights_file(path: Path, weights: str) -> dict[str, torch.Tensor]:
    """The state dict ``weights`` names in an exported .pt / .safetensors file."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            flat = load_file(str(path))
            prefixes = {key.split(".", 1)[0] for key in flat}
            parts = {p: {k[len(p) + 1 :]: v for k, v in flat.items() if k.startswith(f"{p}.")} for p in PARTS}
            obj = {p: sd for p, sd in parts.items() if sd} if prefixes <= set(PARTS) else flat  # or bare keys
        else:
            # the reference's training checkpoints also pickle their argparse arguments
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch/safetensors raise RuntimeError, UnpicklingError, OSError...
        raise SourceError(f"cannot read weights from {path}: {first_line(exc)}") from None
    if not isinstance(obj, dict):
        raise SourceError(f"{path} holds a {type(obj).__name__}, not a state dict")
    if any(part in obj for part in PARTS):
        if not isinstance(obj.get(weights), dict):
            other = next(p for p in PARTS if p != weights)
            raise SourceError(
                f"{path} has no '{weights}' weights (it has {', '.join(sorted(obj))}); use --weights {other}"
            )
        obj = obj[weights]
    bad = next((k for k, v in obj.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise SourceError(f"{path} is not a state dict: its entry '{bad}' is not a tensor")
    return obj


def check_fits(
    model: torch.nn.Module,
    state_dict: dict[str, torch.Tensor],
    weights_file: str,
    what: str,
    expected: dict[str, torch.Tensor] | None = None,
) -> None:
    """Raise one line naming ``weights_file`` and the first key whose presence or shape differs from
    ``model``'s (``what`` describes the model), instead of load_state_dict's multi-line report.
    ``expected``: the part of the model's state dict the file must hold (default: all of it)."""
    expected = model.state_dict() if expected is None else expected
    prefix = f"weights in {weights_file} do not fit {what}"
    for key, value in expected.items():
        if key not in state_dict:
            raise SourceError(f"{prefix}: no '{key}' in the file")
        got = tuple(state_dict[key].shape)
        if got != tuple(value.shape):
            raise SourceError(f"{prefix}: '{key}' is {got} in the file, {tuple(value.shape)} in the model")
    extra = [k for k in state_dict if k not in expected]
    if extra:
        raise SourceError(f"{prefix}: unexpected key '{extra[0]}' ({len(extra)} in all)")
