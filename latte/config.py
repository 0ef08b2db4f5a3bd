"""One typed configuration for every entry point: defaults < YAML preset < ``--set key.sub=value``.

Each field is documented where it is declared. ``load_config`` parses, type-checks and validates in one
step; every mistake is a single ``ConfigError`` line that names the key (and the closest valid key when the
name is misspelt) or the reason a combination of values cannot work.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from latte.errors import first_line
from latte.files import atomic_write

PRECISIONS = ("fp32", "bf16", "fp16")
SAMPLERS = ("ddpm", "ddim")
NOISE_SCHEDULES = ("linear", "squaredcos_cap_v2")
ZERO_STAGES = ("2", "3", "3_offload")  # presets in ds_configs/ (latte.engine.ZERO_PRESETS)


class ConfigError(ValueError):
    """A configuration mistake; the message is one line meant for the user."""


# Keys that existed once and were renamed or removed: old dotted key -> the key that now holds its value, or
# None (its value is dropped). Presets, run directories' config.yaml and checkpoints' meta.json written by
# older versions keep loading; a key added later simply takes its default when an old config lacks it.
RETIRED_KEYS: dict[str, str | None] = {}


@dataclass
class LoraConfig:
    """LoRA fine-tuning (``latte.lora``, peft's adapters): a frozen base (``model.init_from``) and trainable
    low-rank adapters on the target linear layers; the optimizer, gradients, EMA and checkpoints cover the
    adapters alone. rank 0 = off (every parameter trains)."""

    rank: int = 0
    alpha: float | None = None  # the adapter's output is scaled by alpha / rank; None = rank (scale 1)
    # dropout on the adapters' input (0 = none); its masks are drawn per global sample (seed, step, index),
    # so any layout of one global batch trains identically
    dropout: float = 0.0
    # module-name suffixes of the adapted linear layers; [] = the model's defaults (lora.DEFAULT_TARGETS:
    # attn.qkv/attn.proj/mlp.fc1/mlp.fc2, or the T2V model's to_q/to_k/to_v/to_out.0 and ff.net.*)
    target_modules: list[str] = field(default_factory=list)
    adaln: bool = False  # also adapt the adaLN modulation (adaLN_modulation.1 / adaln_single.linear)


@dataclass
class ModelConfig:
    # a flavor of LATTE_MODELS: "Latte-S/2" ... "Latte-XL/8", or tiny "Latte-T/2"; text-to-video (LatteT2V):
    # "LatteT2V-XL/2" (= "Latte-1"), or tiny "LatteT2V-T/2"
    name: str = "Latte-XL/2"
    num_classes: int = 0  # 0 = unconditional; N = class-conditional with N classes (UCF101: 101)
    learn_sigma: bool = True  # predict the variance interpolation too (2C output channels), as released
    class_dropout_prob: float = 0.1  # label dropout for classifier-free guidance (class-conditional only)
    caption_dropout_prob: float = 0.1  # text-to-video: captions replaced by the empty prompt's, for guidance
    # the weights a run starts from ("" = random): a released checkpoint or our export (.pt/.safetensors, its
    # EMA), a checkpoint dir of ours (its EMA), or for a text-to-video model a diffusers transformer folder
    # (e.g. Latte-1's transformer/); with model.lora, the frozen base (named by path + sha256 in meta.json)
    init_from: str = ""
    lora: LoraConfig = field(default_factory=LoraConfig)
    in_channels: int = 4  # latent channels of the VAE
    # auto | flash3 | flash | xformers | sdpa | math (math = the original's reference path). On CUDA an
    # explicit backend that cannot run is an error naming why; auto takes the fastest that can (rank 0 says).
    attention: str = "auto"
    gradient_checkpointing: bool = False  # recompute blocks in backward: less memory, ~1/3 more compute
    compile: bool = False  # regional torch.compile of each transformer block (training and sampling)
    # Architecture overrides; None takes the flavor's value. Changing them breaks checkpoint compatibility.
    depth: int | None = None  # spatial + temporal blocks together (even)
    hidden_size: int | None = None
    num_heads: int | None = None
    patch_size: int | None = None


@dataclass
class DataConfig:
    index: str = ""  # the dataset's index.json (local path or s3://bucket/prefix/index.json); "" = synthetic
    val_index: str = ""  # a held-out dataset (same format) for the validation loss (train.val_*); "" = none
    image_size: int = 256  # pixels (square); latents are image_size / vae_downsample
    num_frames: int = 16  # frames per clip
    frame_interval: int = 3  # stride between sampled frames (used by the sharding job)
    vae_downsample: int = 8  # spatial factor of the VAE (8 for the SD VAE)
    num_workers: int = 8  # loader worker processes per rank
    shuffle_buffer: int = 256  # samples per loader worker's shuffle window (a worker holds up to two windows)
    scaling_factor: float | None = None  # VAE scaling factor data.index must have; None = take the index's
    # Video-image joint training (Latte-img): K single-frame image latents after each clip's F frames (0 =
    # off); they go through the spatial blocks and the loss, not the temporal blocks. From data.image_index
    # (an image dataset: same shard format, latent_shape (1, C, h, w), the clip dataset's classes), or
    # synthetic images when data.index is "" (README "Video-image joint training": the image epoch).
    use_image_num: int = 0
    image_index: str = ""  # the image dataset's index.json; needed when use_image_num > 0 and data.index set

    @property
    def latent_size(self) -> int:
        return self.image_size // self.vae_downsample


@dataclass
class DiffusionConfig:
    diffusion_steps: int = 1000  # T of the forward process
    noise_schedule: str = "linear"  # linear (betas 1e-4..0.02, as Latte) | squaredcos_cap_v2
    timestep_respacing: str = ""  # training: "" = all steps
    sampling_steps: str = "250"  # respacing for sampling: "250" (DDPM, as the reference) or "ddim50"


@dataclass
class TrainConfig:
    seed: int = 3407  # global seed (the reference's)
    micro_batch_size: int = 5  # clips per rank per forward ("local_batch_size")
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    max_steps: int = 1_000_000  # optimizer steps
    lr: float = 1e-4  # AdamW learning rate after warmup (constant)
    warmup_steps: int = 0  # linear warmup from 0
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    clip_max_norm: float = 0.1  # gradient clipping norm, applied from clip_start_step on
    clip_start_step: int = 100_000  # no clipping before this step (the reference's start_clip_iter)
    ema_decay: float = 0.9999  # EMA of the weights; the EMA starts as a copy of the initial weights
    precision: str = "fp32"  # fp32 | bf16 | fp16 (fp16: dynamic loss scaling, GPU only); GPU presets: bf16
    tf32: bool = True  # CUDA: fp32 matmuls and convolutions on TF32 tensor cores (also for sampling)
    # CUDA: bitwise repeatable steps (flash-attn's deterministic backward, cuBLAS workspace, deterministic
    # algorithms; slower). Without it a GPU run is repeatable only to rounding: see the README.
    deterministic: bool = False
    zero_stage: str = "2"  # DeepSpeed ZeRO: "2", "3", "3_offload" (ds_configs/*.json) or a path to a JSON
    # sequence parallelism: groups of P consecutive ranks share each sample (frames split in the spatial
    # blocks, token positions in the temporal blocks; latte.parallel.sequence); data parallelism across the
    # groups (world = P x data-parallel size); ZeRO shards over the whole world. 1 = off
    sequence_parallel: int = 1
    global_batch_size: int | None = None  # optional check: must equal micro x accumulation x data-parallel
    log_every: int = 50  # steps between metric reductions/prints (no per-step host sync)
    # Steps between the ranks' agreement on a stop signal (one gloo all-reduce; a stop waits for the next
    # multiple). At 512 ranks a gloo ring all-reduce of one flag costs ~20-50 ms of host time (2 x 511 TCP
    # hops), ~10-25% of a 0.2 s Latte-XL/2 step if done every step; every 50 steps it is < 0.5%, and the
    # stop waits at most 50 steps (~10 s there) of SLURM's 180 s warning.
    stop_check_every: int = 50
    # validation loss on data.val_index (when set): its first val_clips readable clips x val_buckets evenly
    # spaced timesteps, fixed noise, raw and EMA weights (latte/evaluation/validation_loss.py)
    val_every: int = 1000  # steps between validations (and one at the end)
    val_clips: int = 64
    val_buckets: int = 10
    ckpt_every: int = 10_000  # steps between checkpoints (and one at the end)
    results_dir: str = "./results"  # one run directory per job is created under it
    # Checkpoints live outside the per-job run directories so that a rerun of the same command finds them.
    ckpt_dir: str = ""  # "" = <results_dir>/checkpoints; holds step_XXXXXXXX/ dirs and the `latest` pointer
    keep_last: int = 3  # complete checkpoints kept (the newest ones); `latest` is never removed
    keep_every: int | None = None  # also keep every checkpoint whose step is a multiple of this (None: none)
    resume: str = "auto"  # auto (newest complete checkpoint in ckpt_dir, else fresh) | none | a step/ckpt dir

    def data_parallel_size(self, world_size: int) -> int:
        """Data-parallel ranks of ``world_size`` ranks: a sequence-parallel group shares its samples."""
        return world_size // self.sequence_parallel

    # Config keys that may differ from the checkpoint's on resume, beyond the always-allowed ones
    # (train.max_steps, log_every, ckpt_every, results_dir, ckpt_dir, keep_*, resume*), e.g. [train.lr].
    resume_allow_changes: list[str] = field(default_factory=list)


@dataclass
class SampleConfig:
    """``python -m latte.sample``; its flags override these. The step count is diffusion.sampling_steps."""

    num_samples: int = 4  # videos to generate (sample i on rank i % world size)
    classes: list[int] = field(default_factory=list)  # classes, cycled over the samples; [] = 0, 1, 2, ...
    seed: int = 0  # sample i's noise depends on (seed, i) alone: not on the number of ranks
    sampler: str = ""  # ddpm | ddim; "" = ddim when diffusion.sampling_steps is "ddimN", else ddpm
    eta: float = 0.0  # DDIM noise: 0 = deterministic given x_T
    cfg_scale: float = 1.0  # classifier-free guidance (eps channels); 1 = off (the reference: 7 on UCF101)
    precision: str = "fp32"  # model compute: fp32 | bf16 (autocast) | fp16 (autocast, GPU only)
    batch_size: int = 1  # samples per forward; batch j = samples [jB, jB + B) runs on rank j % world size
    fps: int = 8  # frame rate of the written videos (the reference's 8)
    total_frames: int = 0  # frames per video; 0 = data.num_frames; more = clips extended autoregressively
    overlap: int | None = None  # latent frames a clip shares with the previous one; None = num_frames // 4
    # text-to-video: prompts cycled over the samples (or --prompt / --prompts FILE), the negative prompt (the
    # null condition of guidance; "" = the empty prompt), the T5 encoder ("" = the dataset index's)
    prompts: list[str] = field(default_factory=list)
    negative_prompt: str = ""
    text_encoder: str = ""
    images: bool = False  # text-to-video models: text-to-image (one frame, temporal blocks off), PNGs
    # sequence parallelism: groups of P ranks denoise each clip together (frames / token positions split
    # over them, as train.sequence_parallel); the groups share out the samples. 1 = off
    sequence_parallel: int = 1


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def hash(self) -> str:
        """Stable short hash of the resolved values (to recognise a checkpoint's config)."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def save(self, path: str | os.PathLike) -> None:
        """Write the resolved config as YAML atomically (temp name, then rename)."""
        atomic_write(path, lambda tmp: tmp.write_text(self.to_yaml()))


# ----------------------------------------------------------------------------------------------------------
# Loading, overriding, type checking
# ----------------------------------------------------------------------------------------------------------


def _all_keys(cfg: Any, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            keys += _all_keys(value, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _unknown_key(key: str, cfg: Config) -> ConfigError:
    close = difflib.get_close_matches(key, _all_keys(cfg), n=1, cutoff=0.5)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against a field's annotation; accept the lossless conversions YAML needs."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        (hint,) = [a for a in args if a is not type(None)]
    origin = typing.get_origin(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' expects a list, got {value!r}")
        return [_coerce(key, v, item) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):  # e.g. sampling_steps: 250
            return str(value)
    raise ConfigError(f"config key '{key}' expects {getattr(hint, '__name__', hint)}, got {value!r}")


def _apply(cfg: Any, updates: dict[str, Any], root: Config, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(cfg))
    names = {f.name for f in dataclasses.fields(cfg)}
    for name, value in updates.items():
        key = f"{prefix}{name}"
        if name not in names:
            while isinstance(value, dict) and len(value) == 1:  # name the whole dotted key: 'modle.name'
                ((sub, value),) = value.items()
                key = f"{key}.{sub}"
            raise _unknown_key(key, root)
        current = getattr(cfg, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{key}' is a section; give its keys, e.g. {key}.<name>=...")
            _apply(current, value, root, f"{key}.")
        else:
            setattr(cfg, name, _coerce(key, value, hints[name]))


def _parse_override(item: str) -> dict[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key.sub=value")
    key, raw = item.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else ""
    nested: dict[str, Any] = {}
    node = nested
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return nested


def add_set_argument(parser, example: str = "model.attention=sdpa") -> None:
    """The ``--set KEY=VALUE ...`` option of every entry point (repeatable; applied after the YAML)."""
    parser.add_argument(
        "--set",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help=f"override config values, e.g. --set {example}",
    )


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file at ``path``, then ``overrides`` ("key.sub=value"); then validate."""
    data: Any = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {first_line(e)}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections")
    return config_from_dict(data, overrides)


def config_from_dict(data: dict[str, Any], overrides: list[str] | None = None) -> Config:
    """Defaults, then the nested mapping ``data`` (e.g. a checkpoint's saved config), then ``overrides``;
    then validate."""
    cfg = resolve_saved(data)
    for item in overrides or []:
        _apply(cfg, upgrade(_parse_override(item)), cfg)
    validate(cfg)
    return cfg


def resolve_saved(data: dict[str, Any]) -> Config:
    """Defaults, then ``data`` written by this or an older version (retired keys mapped or dropped, keys it
    lacks at their defaults); not validated, so that an old run's values can be compared with a new run's."""
    cfg = Config()
    _apply(cfg, upgrade(data), cfg)
    return cfg


def upgrade(tree: dict[str, Any]) -> dict[str, Any]:
    """``tree`` with every key of ``RETIRED_KEYS`` moved to its successor (or dropped). A successor key that
    ``tree`` also sets keeps its own value."""
    flat = flatten(tree)
    if not any(key in RETIRED_KEYS for key in flat):
        return tree
    out: dict[str, Any] = {}
    for key, value in flat.items():
        if key in RETIRED_KEYS:
            successor = RETIRED_KEYS[key]
            if successor is None or successor in flat:
                continue
            key = successor
        out[key] = value
    nested: dict[str, Any] = {}
    for key, value in out.items():
        node = nested
        *sections, name = key.split(".")
        for section in sections:
            node = node.setdefault(section, {})
        node[name] = value
    return nested


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1}} -> {"train.lr": 1}."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# ----------------------------------------------------------------------------------------------------------
# Validation: combinations that cannot work fail here, with the reason
# ----------------------------------------------------------------------------------------------------------


def resolved_arch(cfg: Config):
    """The model's architecture: its flavor (``LatteArch``, or ``LatteT2VArch`` for a text-to-video one)
    with any overrides applied (``model.depth`` counts blocks for both: a T2V model has depth / 2 pairs)."""
    from latte.models.flavors import LATTE_ARCHS, LATTE_T2V_ARCHS

    m = cfg.model
    names = {**LATTE_ARCHS, **LATTE_T2V_ARCHS}
    if m.name not in names:
        close = difflib.get_close_matches(m.name, list(names), n=1, cutoff=0.5)
        hint = f" (did you mean '{close[0]}'?)" if close else f"; choose one of {', '.join(names)}"
        raise ConfigError(f"model.name '{m.name}' is not a Latte flavor{hint}")
    overrides = {k: getattr(m, k) for k in ("hidden_size", "num_heads", "patch_size")}
    if m.name in LATTE_T2V_ARCHS:
        overrides["num_layers"] = None if m.depth is None else m.depth // 2
    else:
        overrides["depth"] = m.depth
    return dataclasses.replace(names[m.name], **{k: v for k, v in overrides.items() if v is not None})


def caption_channels_of(model: ModelConfig) -> int:
    """The caption width a text-to-video flavor takes (its text encoder's); 0 for the other models."""
    from latte.models.flavors import LATTE_T2V_ARCHS

    arch = LATTE_T2V_ARCHS.get(model.name)
    return arch.caption_channels if arch is not None else 0


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key} '{value}' is not one of {', '.join(choices)}")


def _positive(cfg: Config, keys: list[str]) -> None:
    for key in keys:
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) < 1:
            raise ConfigError(f"{key} must be >= 1, got {getattr(getattr(cfg, section), name)}")


def validate(cfg: Config) -> None:
    from latte.models.attention import BACKENDS

    arch = resolved_arch(cfg)
    _choice("model.attention", cfg.model.attention, BACKENDS)
    _choice("train.precision", cfg.train.precision, PRECISIONS)
    zero = cfg.train.zero_stage
    if zero not in ZERO_STAGES and not zero.endswith(".json"):
        raise ConfigError(
            f"train.zero_stage '{zero}' is not one of {', '.join(ZERO_STAGES)} nor a .json path"
        )
    gbs, micro = cfg.train.global_batch_size, cfg.train.micro_batch_size
    if gbs is not None and gbs % (micro * cfg.train.gradient_accumulation_steps):
        raise ConfigError(
            f"train.global_batch_size {gbs} is not divisible by micro_batch_size {micro} x "
            f"gradient_accumulation_steps {cfg.train.gradient_accumulation_steps}"
        )
    _choice("diffusion.noise_schedule", cfg.diffusion.noise_schedule, NOISE_SCHEDULES)
    _positive(
        cfg,
        [
            "model.in_channels",
            "data.image_size",
            "data.num_frames",
            "data.frame_interval",
            "data.vae_downsample",
            "diffusion.diffusion_steps",
            "train.micro_batch_size",
            "train.gradient_accumulation_steps",
            "train.max_steps",
            "train.log_every",
            "train.stop_check_every",
            "train.ckpt_every",
            "train.keep_last",
            "train.val_every",
            "train.val_clips",
            "train.val_buckets",
        ],
    )
    if cfg.train.val_buckets > cfg.diffusion.diffusion_steps:
        raise ConfigError(
            f"train.val_buckets {cfg.train.val_buckets} exceeds diffusion.diffusion_steps "
            f"{cfg.diffusion.diffusion_steps}"
        )
    if cfg.train.keep_every is not None and cfg.train.keep_every < 1:
        raise ConfigError(f"train.keep_every must be >= 1 or null, got {cfg.train.keep_every}")
    valid_keys = _all_keys(cfg)
    for key in cfg.train.resume_allow_changes:
        if key not in valid_keys:
            raise _unknown_key(key, cfg)
    if cfg.model.num_classes < 0:
        raise ConfigError(f"model.num_classes must be >= 0 (0 = unconditional), got {cfg.model.num_classes}")
    if cfg.data.num_workers < 0:
        raise ConfigError(f"data.num_workers must be >= 0, got {cfg.data.num_workers}")
    _validate_images(cfg)
    _validate_lora(cfg)
    _validate_sequence_parallel(cfg, arch)
    if cfg.data.image_size % cfg.data.vae_downsample:
        raise ConfigError(
            f"data.image_size {cfg.data.image_size} is not divisible by the VAE factor "
            f"{cfg.data.vae_downsample}"
        )
    latent = cfg.data.latent_size
    if latent % arch.patch_size:
        raise ConfigError(
            f"patch size {arch.patch_size} of {cfg.model.name} does not divide the latent size {latent} "
            f"(data.image_size {cfg.data.image_size} / {cfg.data.vae_downsample})"
        )
    if arch.hidden_size % arch.num_heads:
        raise ConfigError(f"hidden size {arch.hidden_size} is not divisible by num_heads {arch.num_heads}")
    if arch.hidden_size % 4:
        raise ConfigError(f"hidden size {arch.hidden_size} must be a multiple of 4 for the sin-cos tables")
    if arch.depth < 2 or arch.depth % 2:
        raise ConfigError(f"model depth {arch.depth} must be even and >= 2 (spatial/temporal pairs)")
    for key in ("class_dropout_prob", "caption_dropout_prob"):
        if not 0.0 <= getattr(cfg.model, key) < 1.0:
            raise ConfigError(f"model.{key} must be in [0, 1), got {getattr(cfg.model, key)}")
    if caption_channels_of(cfg.model) and cfg.model.num_classes:
        raise ConfigError(
            f"{cfg.model.name} is text-to-video: it is conditioned on captions, not classes "
            f"(model.num_classes must be 0, got {cfg.model.num_classes})"
        )
    if not 0.0 <= cfg.train.ema_decay <= 1.0:
        raise ConfigError(f"train.ema_decay must be in [0, 1], got {cfg.train.ema_decay}")
    for key in (
        "train.lr",
        "train.weight_decay",
        "train.clip_max_norm",
        "train.ema_decay",
        "model.class_dropout_prob",
        "model.caption_dropout_prob",
        "sample.cfg_scale",
        "sample.eta",
    ):
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value}")
    if cfg.train.lr <= 0:
        raise ConfigError(f"train.lr must be > 0, got {cfg.train.lr}")
    for key in ("weight_decay", "clip_max_norm", "warmup_steps", "clip_start_step"):
        if getattr(cfg.train, key) < 0:
            raise ConfigError(f"train.{key} must be >= 0, got {getattr(cfg.train, key)}")
    for key in ("train.seed", "sample.seed"):
        section, name = key.split(".")
        seed = getattr(getattr(cfg, section), name)
        if not 0 <= seed < 2**32:
            raise ConfigError(f"{key} must be in [0, 2**32) (numpy's seed range), got {seed}")
    if len(cfg.train.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.train.adam_betas):
        raise ConfigError(f"train.adam_betas must be two values in [0, 1), got {cfg.train.adam_betas}")
    for key in ("timestep_respacing", "sampling_steps"):
        _check_respacing(f"diffusion.{key}", getattr(cfg.diffusion, key), cfg.diffusion.diffusion_steps)
    _validate_sample(cfg)


def _validate_sequence_parallel(cfg: Config, arch) -> None:
    """train.sequence_parallel P: frames, token positions (and joint images) split evenly over P ranks."""
    p = cfg.train.sequence_parallel
    if p < 1:
        raise ConfigError(f"train.sequence_parallel must be >= 1 (1 = off), got {p}")
    if p == 1:
        return
    tokens = (cfg.data.latent_size // arch.patch_size) ** 2
    counts = (("data.num_frames", cfg.data.num_frames), ("tokens per frame", tokens))
    for what, n in (*counts, ("data.use_image_num", cfg.data.use_image_num)):
        if n % p:
            raise ConfigError(f"train.sequence_parallel {p} must divide {what} ({n})")


def _validate_lora(cfg: Config) -> None:
    """model.lora (which target names match the model's layers is checked where it is built)."""
    lora = cfg.model.lora
    if lora.rank < 0:
        raise ConfigError(f"model.lora.rank must be >= 0 (0 = off), got {lora.rank}")
    if not lora.rank:
        return
    if lora.alpha is not None and not (math.isfinite(lora.alpha) and lora.alpha > 0):
        raise ConfigError(f"model.lora.alpha must be > 0 (or null = rank), got {lora.alpha}")
    if not 0.0 <= lora.dropout < 1.0:
        raise ConfigError(f"model.lora.dropout must be in [0, 1), got {lora.dropout}")
    if not cfg.model.init_from:
        raise ConfigError(
            "model.lora.rank > 0 needs model.init_from: the base weights the adapters fine-tune "
            "(a released checkpoint, an export, a checkpoint dir or a diffusers folder)"
        )


def _validate_images(cfg: Config) -> None:
    """Video-image joint training (data.use_image_num, data.image_index)."""
    d = cfg.data
    if d.use_image_num < 0:
        raise ConfigError(f"data.use_image_num must be >= 0 (0 = no images), got {d.use_image_num}")
    if not d.use_image_num:
        if d.image_index:
            raise ConfigError("data.image_index is set but data.use_image_num is 0 (no images per clip)")
        return
    if d.index and not d.image_index:
        raise ConfigError(
            f"data.use_image_num {d.use_image_num} with data.index set needs data.image_index (an image "
            "dataset sharded with `python -m data_pipeline.shard_latents --images`)"
        )
    if d.image_index and not d.index:
        raise ConfigError(
            "data.image_index is set but data.index is empty (synthetic clips take synthetic images)"
        )


def _validate_sample(cfg: Config) -> None:
    s = cfg.sample
    if s.sampler:
        _choice("sample.sampler", s.sampler, SAMPLERS)
    _choice("sample.precision", s.precision, PRECISIONS)
    _positive(cfg, ["sample.num_samples", "sample.batch_size", "sample.fps", "sample.sequence_parallel"])
    p = s.sequence_parallel
    tokens = (cfg.data.latent_size // resolved_arch(cfg).patch_size) ** 2
    frames = 1 if s.images else cfg.data.num_frames
    if p > 1 and (frames % p or tokens % p):
        raise ConfigError(
            f"sample.sequence_parallel {p} must divide the frames of a clip ({frames}) and the tokens per "
            f"frame ({tokens})"
        )
    if s.eta < 0:
        raise ConfigError(f"sample.eta must be >= 0, got {s.eta}")
    if s.total_frames < 0:
        raise ConfigError(f"sample.total_frames must be >= 0 (0 = data.num_frames), got {s.total_frames}")
    frames = cfg.data.num_frames
    if s.overlap is not None and not 1 <= s.overlap < frames:
        raise ConfigError(f"sample.overlap must be in [1, data.num_frames {frames}), got {s.overlap}")
    if s.total_frames > frames and frames < 2:
        raise ConfigError(f"sample.total_frames {s.total_frames} needs clips of >= 2 frames to overlap")
    if s.cfg_scale < 0:
        raise ConfigError(f"sample.cfg_scale must be >= 0, got {s.cfg_scale}")
    from latte.conditioning import RequestError, conditioning_of

    try:  # what the request may ask of the model's conditioning (class ids, guidance)
        conditioning_of(cfg.model).check_request(s)
    except RequestError as exc:
        raise ConfigError(str(exc)) from None


def sampler_of(cfg: Config) -> str:
    """The sampling loop: sample.sampler, or by default ddim for a "ddimN" respacing and ddpm otherwise."""
    if cfg.sample.sampler:
        return cfg.sample.sampler
    return "ddim" if cfg.diffusion.sampling_steps.startswith("ddim") else "ddpm"


def _check_respacing(key: str, value: str, steps: int) -> None:
    """Respacing strings: "" (all steps), "250", "10,20,30" (per-section counts) or "ddimN"."""
    if value == "":
        return
    body = value[len("ddim") :] if value.startswith("ddim") else value
    try:
        counts = [int(x) for x in body.split(",")]
    except ValueError:
        raise ConfigError(f"{key} '{value}' must be '', 'N', 'N1,N2,...' or 'ddimN'") from None
    if any(c < 1 for c in counts) or sum(counts) > steps:
        raise ConfigError(f"{key} '{value}' asks for zero or more than diffusion_steps ({steps}) steps")
