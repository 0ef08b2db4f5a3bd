"""Tiny random stand-ins for the FVD / FID detectors, with the real files' interfaces, saved as TorchScript.

``TinyI3D``: ``forward(videos (N, 3, T, H, W), rescale=False, resize=False, return_features=False)`` as
``i3d_torchscript.pt`` is called (uint8 in [0, 255]; rescale -> [-1, 1]); ``TinyInception``:
``forward(images (N, 3, H, W), return_features=False)`` as ``inception-2015-12-05.pt``. Their features are a
fixed random projection of pooled pixels through tanh, 400 and 2048 wide like the real ones by default
(``dim`` makes a narrower one: a detector the protocol refuses, or a fast FID in library tests).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F


class TinyI3D(torch.nn.Module):
    def __init__(self, dim: int = 400, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("weight", torch.randn(3 * 4 * 8 * 8, dim, generator=g) / 8)

    def forward(
        self, x: torch.Tensor, rescale: bool = False, resize: bool = False, return_features: bool = False
    ) -> torch.Tensor:
        x = x.float()
        if rescale:
            x = x / 127.5 - 1.0
        if resize:  # the real one resizes to 224; pooling below makes the size irrelevant here
            x = F.interpolate(x, size=(x.shape[2], 32, 32), mode="trilinear", align_corners=False)
        pooled = F.adaptive_avg_pool3d(x, (4, 8, 8)).flatten(1)  # (N, 3, T, H, W) -> (N, 768)
        features = torch.tanh(pooled @ self.weight)
        return features if return_features else features.softmax(dim=1)


class TinyInception(torch.nn.Module):
    def __init__(self, dim: int = 2048, seed: int = 1) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("weight", torch.randn(3 * 8 * 8, dim, generator=g) / 64)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        pooled = F.adaptive_avg_pool2d(x.float() / 255.0, (8, 8)).flatten(1)  # (N, 3, H, W) -> (N, 192)
        features = torch.tanh(pooled @ self.weight * 8)
        return features if return_features else features.softmax(dim=1)


def save_detector(module: torch.nn.Module, path: str | Path) -> Path:
    """``module`` scripted and saved where ``torch.jit.load`` reads it, as the real files are."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.script(module.eval()).save(str(path))
    return path
