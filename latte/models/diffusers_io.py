"""LatteT2V <-> a diffusers ``LatteTransformer3DModel`` folder (config.json + safetensors weights).

``from_diffusers(path)`` reads a folder such as Latte-1's ``transformer/`` (one
``diffusion_pytorch_model.safetensors``, or shards listed by
``diffusion_pytorch_model.safetensors.index.json``) and loads it strictly; ``to_diffusers(model, path)``
writes one that ``LatteTransformer3DModel.from_pretrained`` loads strictly. Neither imports diffusers.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from latte.models.latte_t2v import LatteT2V

CLASS_NAME = "LatteTransformer3DModel"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = WEIGHTS_NAME + ".index.json"
DIFFUSERS_VERSION = "0.42.1"  # written as ``_diffusers_version``: the release this format was checked with


def read_config(path: str | Path) -> dict[str, object]:
    """The folder's config.json; a ValueError when it is missing or names another class."""
    config_path = Path(path) / CONFIG_NAME
    if not config_path.is_file():
        raise ValueError(f"{config_path} does not exist: not a diffusers model folder")
    config = json.loads(config_path.read_text())
    class_name = config.get("_class_name", CLASS_NAME)
    if class_name != CLASS_NAME:
        raise ValueError(f"{config_path} describes a {class_name}, not a {CLASS_NAME}")
    return config


def read_weights(path: str | Path) -> dict[str, Tensor]:
    """All tensors of the folder: the single safetensors file, or every shard its index names."""
    folder = Path(path)
    if (folder / WEIGHTS_NAME).is_file():
        return load_file(folder / WEIGHTS_NAME)
    if (folder / INDEX_NAME).is_file():
        weight_map = json.loads((folder / INDEX_NAME).read_text())["weight_map"]
        tensors: dict[str, Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            tensors.update(load_file(folder / shard))
        missing = sorted(set(weight_map) - tensors.keys())
        if missing:
            raise ValueError(f"{INDEX_NAME} in {folder} lists tensors its shards lack: {', '.join(missing)}")
        return tensors
    raise ValueError(f"{folder} has neither {WEIGHTS_NAME} nor {INDEX_NAME}")


def check_state_dict(model: torch.nn.Module, tensors: dict[str, Tensor], source: str = "weights") -> None:
    """One ValueError naming every missing key, extra key and shape mismatch of ``tensors`` for ``model``."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = [f"missing {k}" for k in sorted(expected.keys() - tensors.keys())]
    problems += [f"unexpected {k}" for k in sorted(tensors.keys() - expected.keys())]
    problems += [
        f"{k}: shape {tuple(tensors[k].shape)} != {expected[k]}"
        for k in sorted(expected.keys() & tensors.keys())
        if tuple(tensors[k].shape) != expected[k]
    ]
    if problems:
        raise ValueError(f"{source} do not match {type(model).__name__}: " + "; ".join(problems))


def from_diffusers(
    path: str | Path, attention: str = "auto", gradient_checkpointing: bool = False
) -> LatteT2V:
    """A LatteT2V with the folder's config and weights (fp32 parameters, whatever dtype the file holds)."""
    model = LatteT2V.from_config(
        read_config(path), attention=attention, gradient_checkpointing=gradient_checkpointing
    )
    tensors = read_weights(path)
    check_state_dict(model, tensors, source=f"weights in {path}")
    model.load_state_dict(tensors, strict=True)
    return model


def to_diffusers(model: LatteT2V, path: str | Path) -> Path:
    """Write ``model`` as a diffusers folder at ``path`` (replacing one there): written in a temporary folder
    beside it, then renamed into place, so a reader never sees half a folder."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    config = {"_class_name": CLASS_NAME, "_diffusers_version": DIFFUSERS_VERSION, **model.diffusers_config()}
    # Own contiguous CPU copies: safetensors refuses shared or strided storage.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the folder is meant to be shared
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file(tensors, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        if target.exists():  # swap: the old folder moves aside, the new one takes its name, the old one goes
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / target.name)
            os.replace(tmp, target)
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
