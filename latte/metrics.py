"""Training metrics: FLOPs per sample from the model config, a peak-FLOPs table, MFU, and the logger.

MFU in three pieces (as torchtitan): ``flops_per_sample`` beside the model's shape, ``peak_flops`` keyed by
device name, and ``MetricsLogger`` logging ``flops x samples/s / peak`` with the peak it used.
"""

from __future__ import annotations

import dataclasses
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from latte import lora
from latte.config import Config, resolved_arch
from latte.models.flavors import LatteArch, LatteT2VArch


@dataclass(frozen=True)
class FlopsBreakdown:
    """Forward FLOPs of one sample, by where they are spent (multiply-add = 2 FLOPs)."""

    linear: float  # token-wise matmuls: patch embed, qkv, proj, MLP, final linear
    attention: float  # QK^T and AV, spatial and temporal
    adaln: float  # adaLN modulation, computed per sequence (per frame / per token position) as the original
    embed: float  # timestep MLP
    # of ``linear``: matmuls whose input never needs a gradient (the patch embedding of x_t; LatteT2V's
    # caption keys/values, from the projected caption)
    no_input_grad: float = 0.0
    frozen: bool = False  # the weights are frozen (LoRA): backward computes no weight gradients

    @property
    def forward(self) -> float:
        return self.linear + self.attention + self.adaln + self.embed

    @property
    def training(self) -> float:
        """Model FLOPs of forward + backward (backward = 2x forward: input and weight gradients, the usual
        6N-per-token rule); recomputation is not counted. Frozen weights (LoRA): a weight's matmul costs its
        forward and, where its input needs one, its input gradient; attention's stay 3x; the adaLN and
        embedding matmuls (of the timestep and label, which need no gradient) their forward alone; the
        adapters' own small matmuls (rank / width of a layer's) are not counted."""
        if self.frozen:
            once = self.no_input_grad + self.adaln + self.embed
            return 3 * self.attention + 2 * (self.linear - self.no_input_grad) + once
        return 3 * self.forward


def flops_per_sample(
    arch: LatteArch,
    num_frames: int,
    latent_size: int,
    in_channels: int = 4,
    learn_sigma: bool = True,
    images: int = 0,
) -> FlopsBreakdown:
    """FLOPs of one clip through Latte (forward), counted from the shapes of every matmul. ``images``: the
    K single-frame images of video-image joint training, which pass the patch embedding, the spatial blocks
    and the final layer (not the temporal blocks)."""
    d, p, f = arch.hidden_size, arch.patch_size, num_frames
    s = f + images  # frames through the spatial blocks
    t = (latent_size // p) ** 2  # tokens per frame
    n, n_s = f * t, s * t  # tokens of the video frames, of every frame
    c_out = in_channels * (2 if learn_sigma else 1)
    mlp = int(d * arch.mlp_ratio)
    pairs = arch.depth // 2  # spatial + temporal blocks
    per_token_block = 2 * (3 * d * d + d * d + 2 * d * mlp)  # qkv, proj, fc1 + fc2
    patch_in, patch_out = 2 * n_s * (in_channels * p * p) * d, 2 * n_s * d * (p * p * c_out)
    linear = pairs * (n_s + n) * per_token_block + patch_in + patch_out
    attention = pairs * (4 * s * t * t * d + 4 * t * f * f * d)  # QK^T + AV: over T (spatial), F (temporal)
    adaln = pairs * (s + t) * 2 * d * 6 * d + s * 2 * d * 2 * d  # blocks' 6D and the final layer's 2D rows
    embed = 2 * (256 * d + d * d)
    return FlopsBreakdown(float(linear), float(attention), float(adaln), float(embed), float(patch_in))


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
    """The training run's metrics: whose turn it is (``should_log``), the rates of the interval since the
    last log (samples/s, tokens/s, TFLOP/s per device, MFU, data wait, peak memory), console lines on rank 0
    and TensorBoard scalars under ``run_dir/tensorboard`` (rank 0 only).

    ``cfg``/``world_size``/``device`` give the rates; without them (``MetricsLogger(run_dir, enabled)``) it
    only writes what it is given."""

    def __init__(
        self,
        run_dir: Path | None,
        enabled: bool,
        cfg: Config | None = None,
        world_size: int = 1,
        device: torch.device | None = None,
        caption_tokens: int = 0,
    ) -> None:
        self.enabled = enabled
        self.writer = None
        if enabled and run_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
        self.device = device or torch.device("cpu")
        self.log_every, self.max_steps = (cfg.train.log_every, cfg.train.max_steps) if cfg else (1, None)
        self.global_batch = self.flops = self.peak = None
        self.device_name, self.world_size = "cpu", world_size
        if cfg is not None:
            t, d, m = cfg.train, cfg.data, cfg.model
            arch = resolved_arch(cfg)
            data_parallel = t.data_parallel_size(world_size)
            self.global_batch = t.micro_batch_size * t.gradient_accumulation_steps * data_parallel
            if isinstance(arch, LatteT2VArch):  # captions padded to ``caption_tokens`` (the loader's length)
                out = m.in_channels * (2 if m.learn_sigma else 1)
                args = (arch, d.num_frames, d.latent_size, caption_tokens, m.in_channels, out)
                self.flops = t2v_flops_per_sample(*args, images=d.use_image_num)
            else:
                args = (arch, d.num_frames, d.latent_size, m.in_channels, m.learn_sigma, d.use_image_num)
                self.flops = flops_per_sample(*args)
            if lora.enabled(m.lora):  # LoRA: the base's weights get no gradients
                self.flops = dataclasses.replace(self.flops, frozen=True)
            self.tokens_per_sample = (d.num_frames + d.use_image_num) * (
                d.latent_size // arch.patch_size
            ) ** 2
            self.peak, self.device_name = peak_flops(self.device, t.precision, tf32=t.tf32)
        self.start(0)

    def start(self, step: int) -> None:
        """A new interval begins after ``step`` (at the start and after every log)."""
        self.interval_start, self.t0, self.data_wait = step, time.perf_counter(), 0.0

    def should_log(self, done: int) -> bool:
        """Whether to log after ``done`` steps: every ``train.log_every``, and the last step."""
        return done % self.log_every == 0 or done == self.max_steps

    @contextmanager
    def waiting_for_data(self):
        """Time spent inside counts as data wait (the loader could not keep up)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.data_wait += time.perf_counter() - start

    def rates(self, done: int) -> dict[str, float | None]:
        """Throughput of the steps since the interval started, up to ``done``."""
        elapsed = time.perf_counter() - self.t0
        samples_per_s = (done - self.interval_start) * self.global_batch / elapsed
        tflops = self.flops.training * samples_per_s / self.world_size  # per device
        return {
            "perf/samples_per_s": samples_per_s,
            "perf/tokens_per_s": samples_per_s * self.tokens_per_sample,
            "perf/tflops_per_device": tflops / 1e12,
            "perf/mfu": tflops / self.peak if self.peak else None,
            "perf/data_wait": self.data_wait / elapsed,
            "perf/peak_mem_gb": peak_memory_gb(self.device),
        }

    def log_step(self, done: int, values: dict[str, float | None]) -> None:
        """Log ``values`` (the loss, grad norm, lr) and the interval's rates after ``done`` steps; start the
        next interval."""
        self.log(done, {**values, **self.rates(done)})
        self.start(done)

    def log(self, step: int, values: dict[str, float | None]) -> None:
        if not self.enabled:
            return
        if self.writer is not None:
            for key, value in values.items():
                if value is not None and math.isfinite(value):
                    self.writer.add_scalar(key, value, step)
        print(f"step {step:>7d} | " + " | ".join(_fmt(k, v) for k, v in values.items()), flush=True)

    def log_validation(self, step: int, results: dict, seconds: float) -> None:
        """Log a validation (``{"raw": ValidationResult, "ema": ...}``) that took ``seconds``: TensorBoard
        ``val_raw/*`` and ``val_ema/*``, one console line; its time is left out of the interval's rates."""
        from latte.evaluation.validation_loss import format_results

        self.t0 += seconds
        if not self.enabled:
            return
        if self.writer is not None:
            for name, result in results.items():
                for key, value in result.scalars(f"val_{name}").items():
                    self.writer.add_scalar(key, value, step)
        print(format_results(step, results, seconds), flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this process: the CUDA allocator's peak on a GPU, else the host RSS peak."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux -> GiB (host RSS)


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


def t2v_flops_per_sample(
    arch: LatteT2VArch,
    num_frames: int,
    latent_size: int,
    caption_len: int,
    in_channels: int = 4,
    out_channels: int = 8,
    temporal: bool = True,
    images: int = 0,
) -> FlopsBreakdown:
    """FLOPs of one clip and its caption of ``caption_len`` tokens through LatteT2V (forward), counted from
    the shapes of every matmul. Cross-attention: q and the output projection over the video tokens, k/v once
    per sample over the caption (as the model computes them), scores of every video token against the caption.
    ``temporal=False``: image mode (spatial blocks only). adaln: adaLN-single's one 6D map per sample; embed:
    the timestep MLP and the caption projection. ``images``: the K captioned images of video-image joint
    training (spatial blocks against their own captions, no temporal blocks)."""
    d, p, f, length = arch.hidden_size, arch.patch_size, num_frames, caption_len
    s, captions = f + images, 1 + images  # frames through the spatial blocks; captions per sample
    t = (latent_size // p) ** 2  # tokens per frame
    n, n_s = f * t, s * t  # tokens of the video frames, of every frame
    mlp = 4 * d
    spatial_token = 2 * (4 * d * d + 2 * d * d + 2 * d * mlp)  # self q/k/v/out, cross q/out, fc1 + fc2
    temporal_token = 2 * (4 * d * d + 2 * d * mlp) if temporal else 0
    cross_kv = 2 * length * 2 * d * d * captions  # per sample and spatial block
    patch_in, patch_out = 2 * n_s * (in_channels * p * p) * d, 2 * n_s * d * (p * p * out_channels)
    linear = arch.num_layers * (n_s * spatial_token + n * temporal_token + cross_kv) + patch_in + patch_out
    attention = 4 * s * t * t * d + 4 * n_s * length * d + (4 * t * f * f * d if temporal else 0)
    attention *= arch.num_layers  # QK^T + AV: self over T, cross over the caption, temporal over F
    adaln = 2 * d * 6 * d
    embed = 2 * (256 * d + d * d) + 2 * length * captions * (arch.caption_channels * d + d * d)
    no_input_grad = patch_in + arch.num_layers * cross_kv
    return FlopsBreakdown(float(linear), float(attention), float(adaln), float(embed), float(no_input_grad))
