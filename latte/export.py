"""Export a training checkpoint as plain weights in the model's (= the released checkpoints') key names.

    python -m latte.export CKPT_DIR [--step N] OUT.pt            {"model": ..., "ema": ...}
    python -m latte.export CKPT_DIR/step_00000040 OUT.safetensors [--ema-only]

``OUT.pt`` holds ``{"model": state_dict, "ema": state_dict}`` (``--ema-only``: just ``{"ema": ...}``),
each loadable with ``LATTE_MODELS[name](...).load_state_dict(sd, strict=True)``. safetensors has one flat
namespace: keys are ``model.<key>`` / ``ema.<key>``, or the bare model keys with ``--ema-only``. Without
``--step`` the newest complete checkpoint of CKPT_DIR is taken. Runs on one CPU process (no process group).

    python -m latte.export CKPT_DIR OUT_DIR --diffusers [--weights model]      (text-to-video models)

writes a diffusers ``LatteTransformer3DModel`` folder (config.json + safetensors) of the EMA (or the raw
model) weights: ``LattePipeline``'s ``transformer/``, and what ``model.init_from`` starts a run from.

A LoRA run's checkpoint (``model.lora``) holds adapters only. The forms above write the merged full model
(its base, ``model.init_from``, checked against the sha256 the checkpoint recorded, plus the adapters) in
the released key names; and

    python -m latte.export CKPT_DIR OUT_DIR --adapter [--weights model]

writes the adapter alone in peft's format (``adapter_config.json`` + ``adapter_model.safetensors``), which
``latte.sample BASE --lora OUT_DIR`` and ``peft.PeftModel.from_pretrained`` apply to the base.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from latte import checkpoint as ckpt
from latte.config import ConfigError
from latte.files import atomic_write


def export(
    source: str | os.PathLike, out: str | os.PathLike, step: int | None = None, ema_only: bool = False
) -> Path:
    """Write checkpoint ``source`` (a step dir, or a checkpoint dir + ``step`` / its newest) to ``out``."""
    source, out = Path(source), Path(out)
    if out.suffix not in (".pt", ".safetensors"):
        raise ckpt.CheckpointError(f"output '{out}' must end in .pt or .safetensors")
    step_dir, meta, cfg = _checkpoint(source, step)
    lora_model = _lora_model(step_dir, meta, cfg)  # first: a LoRA checkpoint's base is checked
    weights = {"ema": _weights(step_dir, "ema")}
    if not ema_only:
        weights["model"] = _weights(step_dir, "model")
    if lora_model is not None:  # adapters only: merged into their base
        weights = {part: _merged(lora_model, sd, step_dir) for part, sd in weights.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".pt":
        atomic_write(out, lambda tmp: torch.save(weights, tmp))
    else:
        from safetensors.torch import save_file

        flat = {f"{part}.{k}": v for part, sd in weights.items() for k, v in sd.items()}
        info = {
            "step": str(meta["step"]),
            "config_hash": meta["config_hash"],
            "model": meta["config"]["model"]["name"],
        }
        flat = weights["ema"] if ema_only else flat
        atomic_write(out, lambda tmp: save_file(flat, str(tmp), metadata=info))
    return step_dir


def _checkpoint(source: str | os.PathLike, step: int | None):
    """(the step directory ``source`` and ``step`` name, its meta.json, its resolved config)."""
    from latte.config import resolve_saved

    source = Path(source)
    step_dir = ckpt.choose(str(source / ckpt.tag_for(step) if step is not None else source), source)
    meta = json.loads((step_dir / ckpt.META).read_text())
    return step_dir, meta, resolve_saved(meta["config"])


def _weights(step_dir: Path, weights: str) -> dict[str, torch.Tensor]:
    """The checkpoint's EMA (``ema_consolidated.pt``) or raw weights (from the ZeRO shards), fp32."""
    if weights == "ema":
        state = torch.load(step_dir / ckpt.EMA_FULL, map_location="cpu", weights_only=True)
    else:
        state = ckpt.consolidated_model(step_dir)
    return {k: v.float().contiguous() for k, v in state.items()}


def _lora_model(step_dir: Path, meta: dict, cfg):
    """For a LoRA run's checkpoint: its model (the base from ``model.init_from``, checked against the
    checkpoint's record of it, with empty adapters); None for any other checkpoint."""
    from latte import lora
    from latte.builders import build_model

    if not lora.enabled(cfg.model.lora):
        return None
    changed = ckpt.base_changed(meta.get("base"), cfg)
    if changed:
        raise ckpt.CheckpointError(f"{step_dir} {changed}")
    return build_model(cfg)


def _merged(model, adapters: dict[str, torch.Tensor], step_dir: Path) -> dict[str, torch.Tensor]:
    from latte import lora

    lora.load_adapter_state(model, adapters, f"the checkpoint {step_dir}")
    return lora.merged_state_dict(model)


def export_adapter(
    source: str | os.PathLike, out: str | os.PathLike, step: int | None = None, weights: str = "ema"
) -> Path:
    """Write a LoRA checkpoint's EMA adapter (``weights="model"``: the raw one) in peft's format."""
    from latte import lora

    step_dir, meta, cfg = _checkpoint(source, step)
    model = _lora_model(step_dir, meta, cfg)
    if model is None:
        raise ckpt.CheckpointError(
            f"--adapter writes LoRA adapters; {step_dir} is not a LoRA run's checkpoint"
        )
    lora.load_adapter_state(model, _weights(step_dir, weights), f"the checkpoint {step_dir}")
    lora.save_adapter(model, out, meta.get("base"), meta["config"]["model"]["name"])
    return step_dir


def export_diffusers(
    source: str | os.PathLike, out: str | os.PathLike, step: int | None = None, weights: str = "ema"
) -> Path:
    """Write a text-to-video checkpoint's EMA (``weights="model"``: the raw weights) as a diffusers folder
    (a LoRA run's: merged into its base)."""
    from latte.builders import build_model
    from latte.config import caption_channels_of
    from latte.models import to_diffusers

    step_dir, meta, cfg = _checkpoint(source, step)
    if not caption_channels_of(cfg.model):
        raise ckpt.CheckpointError(
            f"--diffusers writes text-to-video models; {step_dir} holds {cfg.model.name} (export it as .pt)"
        )
    lora_model = _lora_model(step_dir, meta, cfg)
    state = _weights(step_dir, weights)
    if lora_model is not None:
        state = _merged(lora_model, state, step_dir)
    cfg.model.init_from = ""  # the checkpoint's weights, not those the run started from
    cfg.model.lora.rank = 0  # (merged above)
    model = build_model(cfg)
    model.load_state_dict(state, strict=True)
    to_diffusers(model, out)
    return step_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a checkpoint dir (train.ckpt_dir) or one step_XXXXXXXX dir in it")
    parser.add_argument("out", help="OUT.pt or OUT.safetensors (with --diffusers: a folder)")
    parser.add_argument("--step", type=int, help="the step to export (default: the newest complete one)")
    parser.add_argument("--ema-only", action="store_true", help="only the EMA weights (what sampling uses)")
    parser.add_argument(
        "--diffusers", action="store_true", help="a diffusers LatteTransformer3DModel folder (text-to-video)"
    )
    parser.add_argument(
        "--adapter", action="store_true", help="a LoRA run's adapter alone, in peft's format (a folder)"
    )
    parser.add_argument(
        "--weights", choices=("ema", "model"), default="ema", help="with --diffusers/--adapter"
    )
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed's first import
    try:
        if args.diffusers and args.adapter:
            raise ckpt.CheckpointError("--diffusers and --adapter are two different exports: give one")
        if args.adapter:
            step_dir = export_adapter(args.checkpoint, args.out, args.step, args.weights)
        elif args.diffusers:
            step_dir = export_diffusers(args.checkpoint, args.out, args.step, args.weights)
        else:
            step_dir = export(args.checkpoint, args.out, args.step, args.ema_only)
    except ConfigError as exc:  # CheckpointErrors, and a LoRA run's base that cannot be read
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"exported {step_dir} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
