"""The one place that builds the DeepSpeed engine, and the distributed set-up it needs.

* ``setup_distributed()`` finds the rank layout (``latte.rendezvous.world_from_env``: torchrun/deepspeed
  variables, else SLURM's), picks the accelerator (CUDA + NCCL on GPU ``local_rank % visible GPUs``, else
  CPU + gloo), sets TF32/determinism, and initialises the process group and the gloo control group.
* ``deepspeed_config(cfg, world)`` loads the user-tunable JSON from ``ds_configs/`` and fills in what our
  config owns (batch sizes, accumulation, precision, clipping), asserting global = micro x accum x dp.
* ``build_engine(cfg, model, world)`` wraps the model: activation checkpointing -> ``deepspeed.initialize``.

Nothing else in the project calls DeepSpeed's API, except the checkpoint manager.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

import latte.models.attention as attention_kernels
from latte.config import ZERO_STAGES, Config, ConfigError
from latte.rendezvous import World, control_group, world_from_env

DS_CONFIG_DIR = Path(__file__).resolve().parents[1] / "ds_configs"
ZERO_PRESETS = dict(zip(ZERO_STAGES, ("zero2.json", "zero3.json", "zero3_offload.json"), strict=True))


def _disable_cpu_shm_build() -> None:
    """DeepSpeed compiles a shared-memory op for CPU inference all-reduce on init (25-50 s per fresh
    machine); training never uses it."""
    import importlib

    ds_torch = importlib.import_module("deepspeed.comm.torch")
    ds_torch.build_shm_op = lambda: None


def setup_distributed(cfg: Config | None = None) -> World:
    """Initialise the process group (single process: a world of one) and return this rank's place in it.
    On CUDA, ``cfg`` sets TF32 and determinism (``train.tf32``, ``train.deterministic``) before any kernel."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # must precede the first `import deepspeed`
    place = world_from_env(alone_env=True)  # GPU local_rank % visible: one GPU per task shows each device 0
    import deepspeed

    if place.device.type == "cuda":
        torch.cuda.set_device(place.device)
        backend = "nccl"
        if cfg is not None:
            configure_cuda_numerics(cfg.train.tf32, cfg.train.deterministic)
    else:
        _disable_cpu_shm_build()
        backend = "gloo"
    deepspeed.init_distributed(dist_backend=backend)
    control_group()  # made now, by every rank at once (it is a collective)
    dist = torch.distributed
    return World(dist.get_rank(), dist.get_world_size(), place.local_rank, place.device)


def configure_cuda_numerics(tf32: bool, deterministic: bool) -> None:
    """TF32 tensor cores for fp32 matmuls/convolutions (``train.tf32``), and ``train.deterministic``:
    deterministic algorithms (warnings name any op without one), cuBLAS's fixed workspace, no cuDNN
    autotuning, flash-attn's deterministic backward. Call before the first CUDA kernel."""
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read at cuBLAS's first handle
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        attention_kernels.set_deterministic(True)


# ----------------------------------------------------------------------------------------------------------
# DeepSpeed JSON: user-tunable communication settings + what our config owns
# ----------------------------------------------------------------------------------------------------------


def ds_config_path(zero_stage: str) -> Path:
    """``train.zero_stage`` ("2", "3", "3_offload" or a JSON path, checked by the config) -> the file."""
    return DS_CONFIG_DIR / ZERO_PRESETS[zero_stage] if zero_stage in ZERO_PRESETS else Path(zero_stage)


_OWNED_KEYS = (
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "gradient_clipping",
    "fp16",
    "bf16",
    "optimizer",
    "scheduler",
)


def deepspeed_config(cfg: Config, world_size: int, fp16_supported: bool = True) -> dict[str, Any]:
    """The DeepSpeed config dict: the chosen JSON, plus batch/accumulation/precision/clipping from ``cfg``.

    The JSON must not set what our config owns (one value, one place): such keys are an error.
    """
    path = ds_config_path(cfg.train.zero_stage)
    try:
        ds = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"DeepSpeed config '{path}' does not exist") from None
    except ValueError as exc:
        raise ConfigError(f"DeepSpeed config '{path}' is not valid JSON: {exc}") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"DeepSpeed config '{path}' must be a JSON object, got a {type(ds).__name__}")
    typed_twice = [k for k in _OWNED_KEYS if k in ds]
    if typed_twice:
        raise ConfigError(
            f"DeepSpeed config '{path}' sets {', '.join(typed_twice)}: these come from the training config"
        )
    stage = ds.get("zero_optimization", {}).get("stage")
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"DeepSpeed config '{path}': zero_optimization.stage must be 0-3, got {stage!r}")
    t = cfg.train
    micro, accum = t.micro_batch_size, t.gradient_accumulation_steps
    data_parallel = t.data_parallel_size(world_size)
    if t.global_batch_size is not None and t.global_batch_size != micro * accum * data_parallel:
        raise ConfigError(
            f"train.global_batch_size {t.global_batch_size} != micro_batch_size {micro} x "
            f"gradient_accumulation_steps {accum} x data-parallel size {data_parallel} = "
            f"{micro * accum * data_parallel}"
        )
    global_batch = micro * accum * world_size  # DeepSpeed's view: every rank is a data-parallel rank
    if t.precision == "fp16" and not fp16_supported:
        raise ConfigError("train.precision fp16 is not supported on this device; use bf16 or fp32")
    ds.update(
        train_batch_size=global_batch,
        train_micro_batch_size_per_gpu=micro,
        gradient_accumulation_steps=accum,
        gradient_clipping=t.clip_max_norm,  # switched off before clip_start_step by `set_grad_clip`
        bf16={"enabled": t.precision == "bf16"},
        fp16={"enabled": t.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
    )
    ds.setdefault("steps_per_print", 10**9)  # we log ourselves, at log_every
    ds.setdefault("wall_clock_breakdown", False)
    ds["zero_force_ds_cpu_optimizer"] = False  # our torch AdamW also serves CPU offload (no cpu_adam build)
    return ds


# ----------------------------------------------------------------------------------------------------------
# The engine
# ----------------------------------------------------------------------------------------------------------


def lr_multiplier(cfg: Config, step: int) -> float:
    """Linear warmup over ``warmup_steps`` optimizer steps, then constant (x train.lr)."""
    warmup = cfg.train.warmup_steps
    return min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0


def build_engine(cfg: Config, model: torch.nn.Module, world: World, load_universal: bool = False):
    """model -> activation checkpointing -> ``deepspeed.initialize`` with AdamW and the warmup schedule.

    The optimizer is torch's AdamW (no JIT-compiled fused op), the LR schedule a LambdaLR stepped by the
    engine at accumulation boundaries; both are saved in DeepSpeed checkpoints. ``load_universal``: the
    checkpoint to resume from is a universal one (made for a world-size change by ``latte.checkpoint``).
    """
    import deepspeed

    model.gradient_checkpointing = cfg.model.gradient_checkpointing
    ds_config = deepspeed_config(cfg, world.world_size, _fp16_supported())
    if load_universal:
        ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params,
        lr=cfg.train.lr,
        betas=tuple(cfg.train.adam_betas),
        weight_decay=cfg.train.weight_decay,
        fused=fused_adamw(world.device, ds_config),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(cfg, step))
    try:
        engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=ds_config,
            dist_init_required=False,
        )
    except Exception as exc:
        if type(exc).__name__ != "ValidationError":  # pydantic's, for a key DeepSpeed does not know
            raise
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ())) or "?"
        raise ConfigError(
            f"DeepSpeed config '{ds_config_path(cfg.train.zero_stage)}': {where}: {first.get('msg', exc)}"
        ) from None
    return engine


def offloads_optimizer(ds_config: dict[str, Any]) -> bool:
    """Whether the DeepSpeed config keeps the optimizer state (and fp32 master weights) off the GPU."""
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer") or {}
    return offload.get("device", "none") not in ("none", None)


def fused_adamw(device: torch.device, ds_config: dict[str, Any]) -> bool:
    """torch's fused AdamW (one kernel for all tensors) where the master weights live on a GPU; the
    for-each implementation elsewhere (CPU runs keep their bitwise-tested numerics)."""
    return device.type == "cuda" and not offloads_optimizer(ds_config)


def apply_optimizer_config(engine, cfg: Config, step: int) -> None:
    """After a checkpoint load, the optimizer hyperparameters of ``cfg`` (DeepSpeed restores the saved
    ones): a change allowed on resume (``train.resume_allow_changes=[train.lr]``) takes effect."""
    t = cfg.train
    scheduler = engine.lr_scheduler
    if scheduler is not None:
        scheduler.base_lrs = [t.lr] * len(scheduler.base_lrs)
    for group in engine.optimizer.param_groups:
        group.update(
            lr=t.lr * lr_multiplier(cfg, step),
            initial_lr=t.lr,
            betas=tuple(t.adam_betas),
            weight_decay=t.weight_decay,
        )


def set_grad_clip(engine, max_norm: float) -> None:
    """Change the clipping norm between steps (0 = off): the reference clips only from clip_start_step."""
    engine._config.gradient_clipping = max_norm
    if hasattr(engine.optimizer, "clip_grad"):  # ZeRO optimizers read their own copy
        engine.optimizer.clip_grad = max_norm


def _fp16_supported() -> bool:
    """fp16 training (dynamic loss scaling) is for GPUs: DeepSpeed's CPU accelerator reports fp16 support
    on CPUs with AVX512-FP16 (Sapphire Rapids), but its fused CPU optimizers and our tests are fp32/bf16."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    return accelerator.device_name() != "cpu" and bool(accelerator.is_fp16_supported())
