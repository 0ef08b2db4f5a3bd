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
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from latte import checkpoint as ckpt
from latte.files import atomic_write


def export(
    source: str | os.PathLike, out: str | os.PathLike, step: int | None = None, ema_only: bool = False
) -> Path:
    """Write checkpoint ``source`` (a step dir, or a checkpoint dir + ``step`` / its newest) to ``out``."""
    source, out = Path(source), Path(out)
    if out.suffix not in (".pt", ".safetensors"):
        raise ckpt.CheckpointError(f"output '{out}' must end in .pt or .safetensors")
    step_dir = ckpt.choose(str(source / ckpt.tag_for(step) if step is not None else source), source)
    weights = {"ema": torch.load(step_dir / ckpt.EMA_FULL, map_location="cpu", weights_only=True)}
    if not ema_only:
        weights["model"] = {k: v.float().contiguous() for k, v in ckpt.consolidated_model(step_dir).items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".pt":
        atomic_write(out, lambda tmp: torch.save(weights, tmp))
    else:
        from safetensors.torch import save_file

        flat = {f"{part}.{k}": v for part, sd in weights.items() for k, v in sd.items()}
        meta = json.loads((step_dir / ckpt.META).read_text())
        info = {
            "step": str(meta["step"]),
            "config_hash": meta["config_hash"],
            "model": meta["config"]["model"]["name"],
        }
        flat = weights["ema"] if ema_only else flat
        atomic_write(out, lambda tmp: save_file(flat, str(tmp), metadata=info))
    return step_dir


def export_diffusers(
    source: str | os.PathLike, out: str | os.PathLike, step: int | None = None, weights: str = "ema"
) -> Path:
    """Write a text-to-video checkpoint's EMA (``weights="model"``: the raw weights) as a diffusers folder."""
    from latte.builders import build_model
    from latte.config import caption_channels_of, resolve_saved
    from latte.models import to_diffusers

    source = Path(source)
    step_dir = ckpt.choose(str(source / ckpt.tag_for(step) if step is not None else source), source)
    cfg = resolve_saved(json.loads((step_dir / ckpt.META).read_text())["config"])
    if not caption_channels_of(cfg.model):
        raise ckpt.CheckpointError(
            f"--diffusers writes text-to-video models; {step_dir} holds {cfg.model.name} (export it as .pt)"
        )
    cfg.model.init_from = ""  # the checkpoint's weights, not those the run started from
    model = build_model(cfg)
    if weights == "ema":
        state = torch.load(step_dir / ckpt.EMA_FULL, map_location="cpu", weights_only=True)
    else:
        state = ckpt.consolidated_model(step_dir)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
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
    parser.add_argument("--weights", choices=("ema", "model"), default="ema", help="with --diffusers")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed's first import
    try:
        if args.diffusers:
            step_dir = export_diffusers(args.checkpoint, args.out, args.step, args.weights)
        else:
            step_dir = export(args.checkpoint, args.out, args.step, args.ema_only)
    except ckpt.CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"exported {step_dir} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
