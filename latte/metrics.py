"""Training metrics: FLOPs per sample from the model config, a peak-FLOPs table, MFU, and the logger.

MFU in three pieces (as torchtitan): ``flops_per_sample`` beside the model's shape, ``peak_flops`` keyed by
device name, and ``MetricsLogger`` logging ``flops x samples/s / peak`` with the peak it used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from latte.models.flavors import LatteArch


@dataclass(frozen=True)
class FlopsBreakdown:
    """Forward FLOPs of one sample, by where they are spent (multiply-add = 2 FLOPs)."""

    linear: float  # token-wise matmuls: patch embed, qkv, proj, MLP, final linear
    attention: float  # QK^T and AV, spatial and temporal
    adaln: float  # adaLN modulation, computed per sequence (per frame / per token position) as the original
    embed: float  # timestep MLP

    @property
    def forward(self) -> float:
        return self.linear + self.attention + self.adaln + self.embed

    @property
    def training(self) -> float:
        """Model FLOPs of forward + backward (backward = 2x forward); recomputation is not counted."""
        return 3 * self.forward


def flops_per_sample(
    arch: LatteArch, num_frames: int, latent_size: int, in_channels: int = 4, learn_sigma: bool = True
) -> FlopsBreakdown:
    """FLOPs of one clip through Latte (forward), counted from the shapes of every matmul."""
    d, p, f = arch.hidden_size, arch.patch_size, num_frames
    t = (latent_size // p) ** 2  # tokens per frame
    n = f * t  # tokens per clip
    c_out = in_channels * (2 if learn_sigma else 1)
    mlp = int(d * arch.mlp_ratio)
    pairs = arch.depth // 2  # spatial + temporal blocks
    per_token_block = 2 * (3 * d * d + d * d + 2 * d * mlp)  # qkv, proj, fc1 + fc2
    patch_in, patch_out = 2 * n * (in_channels * p * p) * d, 2 * n * d * (p * p * c_out)
    linear = arch.depth * n * per_token_block + patch_in + patch_out
    attention = pairs * (4 * f * t * t * d + 4 * t * f * f * d)  # QK^T + AV: over T (spatial), F (temporal)
    adaln = pairs * (f + t) * 2 * d * 6 * d + f * 2 * d * 2 * d  # blocks' 6D and the final layer's 2D rows
    embed = 2 * (256 * d + d * d)
    return FlopsBreakdown(float(linear), float(attention), float(adaln), float(embed))


# Dense (no sparsity) peak FLOP/s from NVIDIA's datasheets, by a substring of torch.cuda.get_device_name(),
# the most specific names first ("H100 NVL" before "H100", "GH200" before "H200"). "tf32": fp32 matmuls on
# tensor cores (train.tf32, torch.backends.cuda.matmul.allow_tf32); "fp32": plain fp32 without it.
PEAK_FLOPS: list[tuple[str, dict[str, float]]] = [
    ("H100 NVL", {"bf16": 835e12, "fp16": 835e12, "tf32": 417e12, "fp32": 60e12}),
    ("H100 PCIe", {"bf16": 756e12, "fp16": 756e12, "tf32": 378e12, "fp32": 51e12}),
    ("H200 NVL", {"bf16": 835e12, "fp16": 835e12, "tf32": 417e12, "fp32": 60e12}),
    ("H800 PCIe", {"bf16": 756e12, "fp16": 756e12, "tf32": 378e12, "fp32": 51e12}),
    ("GH200", {"bf16": 989e12, "fp16": 989e12, "tf32": 494e12, "fp32": 67e12}),
    ("H100", {"bf16": 989e12, "fp16": 989e12, "tf32": 494e12, "fp32": 67e12}),  # SXM ("H100 80GB HBM3")
    ("H200", {"bf16": 989e12, "fp16": 989e12, "tf32": 494e12, "fp32": 67e12}),  # SXM
    ("H800", {"bf16": 989e12, "fp16": 989e12, "tf32": 494e12, "fp32": 67e12}),  # SXM
    ("B200", {"bf16": 2250e12, "fp16": 2250e12, "tf32": 1100e12}),
    ("A100", {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
    ("A800", {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
    ("L40S", {"bf16": 362e12, "fp16": 362e12, "tf32": 183e12, "fp32": 91.6e12}),
    ("A10G", {"bf16": 70e12, "fp16": 70e12, "tf32": 35e12}),
    ("V100", {"fp16": 125e12, "fp32": 15.7e12}),
]


def peak_for_name(name: str, precision: str, tf32: bool = True) -> float | None:
    """Table lookup by device name (first matching substring); None when unknown. fp32 counts at the TF32
    peak only when TF32 is on."""
    column = "tf32" if precision == "fp32" and tf32 else precision
    for key, peaks in PEAK_FLOPS:
        if key in name:
            return peaks.get(column)
    return None


def peak_flops(device: torch.device, precision: str, tf32: bool = True) -> tuple[float | None, str]:
    """(peak FLOP/s, device name) for MFU; None when the device is not in the table (e.g. CPU)."""
    if device.type != "cuda":
        return None, "cpu"
    name = torch.cuda.get_device_name(device)
    return peak_for_name(name, precision, tf32), name


class MetricsLogger:
    """Console lines on rank 0 and TensorBoard scalars under ``run_dir/tensorboard`` (rank 0 only)."""

    def __init__(self, run_dir: Path | None, enabled: bool) -> None:
        self.enabled = enabled
        self.writer = None
        if enabled and run_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.writer is not None:
            for key, value in values.items():
                if value is not None and math.isfinite(value):
                    self.writer.add_scalar(key, value, step)
        print(f"step {step:>7d} | " + " | ".join(_fmt(k, v) for k, v in values.items()), flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _fmt(key: str, value: float | None) -> str:
    name = key.split("/")[-1]
    if value is None:
        return f"{name} n/a"
    if name in ("lr",):
        return f"{name} {value:.2e}"
    if name in ("mfu", "data_wait"):
        return f"{name} {100 * value:.1f}%"
    if abs(value) >= 1000:
        return f"{name} {value:,.0f}"
    return f"{name} {value:.4g}"
