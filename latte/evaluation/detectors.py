"""The feature detectors: TorchScript files the user gives (never downloaded), checked to be of the kind
expected.

* I3D (``i3d_torchscript.pt``, StyleGAN-V's exact port of the tf.hub Kinetics-400 I3D that FVD was defined
  with): ``detector(videos, rescale=True, resize=True, return_features=True)`` on uint8 videos (N, 3, T, H, W)
  in [0, 255]; it rescales to [-1, 1] and resizes to 224 itself and returns the 400 logits before the softmax.
* Inception (``inception-2015-12-05.pt``, NVIDIA's TorchScript translation of TF's 2015 Inception that FID
  was defined with): ``detector(images, return_features=True)`` on uint8 images (N, 3, H, W) in [0, 255]
  (it resizes to 299 itself) and returns the 2048 pool features.

A file is loaded with ``torch.jit.load`` and called once on a small dummy input as its kind is called; an
error there or a feature width other than the protocol's means the wrong file: one line naming it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from latte.errors import first_line
from latte.evaluation import EvaluationError
from latte.evaluation.protocol import DETECTOR_URLS, FEATURE_DIMS

CALLS = {  # the keyword arguments each kind is called with (StyleGAN-V's detector_kwargs)
    "i3d": {"rescale": True, "resize": True, "return_features": True},
    "inception": {"return_features": True},
}
NAMES = {"i3d": "an I3D video detector", "inception": "an Inception image detector"}


def probe_input(kind: str) -> torch.Tensor:
    """A small uint8 input of the kind's shape: a 16-frame video (N, 3, T, H, W) or an image (N, 3, H, W)."""
    shape = (1, 3, 16, 64, 64) if kind == "i3d" else (1, 3, 64, 64)
    return torch.full(shape, 128, dtype=torch.uint8)


@dataclass
class Detector:
    """A checked detector: ``detector(batch)`` -> features (N, D) float32, on the device it was loaded to."""

    kind: str
    path: str
    module: torch.nn.Module
    device: torch.device

    @torch.no_grad()
    def __call__(self, batch: torch.Tensor) -> np.ndarray:
        out = self.module(batch.to(self.device), **CALLS[self.kind])
        return out.float().cpu().numpy()


def load_detector(path: str | Path, kind: str, feature_dim: int, device: torch.device) -> Detector:
    """The TorchScript detector at ``path``, checked to be ``kind`` ("i3d" | "inception") with features of
    width ``feature_dim``; ``EvaluationError`` (one line naming the file) otherwise."""
    path = str(path)
    need = f"{NAMES[kind]} ({Path(DETECTOR_URLS[kind].split('?')[0]).name} from {DETECTOR_URLS[kind]})"
    if not Path(path).is_file():
        raise EvaluationError(f"detector file {path} does not exist: give {need}")
    try:
        module = torch.jit.load(path, map_location=device).eval()
    except Exception as exc:  # not a zip, a pickle or state dict, a truncated file: torch raises RuntimeError
        raise EvaluationError(
            f"detector file {path} is not a TorchScript module ({first_line(exc, 120)}): give {need}"
        ) from None
    detector = Detector(kind, path, module, device)
    try:
        features = detector(probe_input(kind))
    except Exception as exc:  # another kind's forward: a wrong number of dimensions, unexpected keywords
        raise EvaluationError(
            f"detector file {path} is not {NAMES[kind]}: called as one it fails ({first_line(exc, 120)})"
        ) from None
    if features.ndim != 2 or features.shape != (1, feature_dim):
        width = features.shape[-1] if features.ndim else None
        other = next((k for k, d in FEATURE_DIMS.items() if d == width and k != kind), None)
        looks = f"; it looks like {NAMES[other]}" if other else ""
        raise EvaluationError(
            f"detector file {path} is not {NAMES[kind]}: it gives features of shape "
            f"{tuple(features.shape)} per input, {kind} gives (1, {feature_dim}){looks}"
        )
    return detector
