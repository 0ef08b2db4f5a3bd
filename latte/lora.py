"""LoRA adapters on a Latte model (``model.lora``), with peft's layers and peft's adapter format.

``add_adapters(model, lora)`` injects peft LoRA layers into the target linear layers of a plain ``Latte`` /
``LatteT2V`` (in place: the model stays our ``nn.Module``; a target ``blocks.0.attn.qkv`` keeps its name,
its base weight becomes ``...qkv.base_layer.weight`` and the adapter adds ``...qkv.lora_A.default.weight``
and ``lora_B``) and freezes everything else. ``lora_B`` starts at zero, so the adapted model starts equal to
its base. Adapter dropout (``lora.dropout`` > 0) draws its masks per global sample: ``set_dropout_seeds``
gives each training forward its samples' seeds (``latte.seeding``), so any layout of one global batch trains
identically and a resume needs no RNG state for it.

Around the model:

* ``is_adapter_key`` / ``load_adapter_state``: the adapter tensors under our key names (what the optimizer,
  the EMA and a LoRA checkpoint hold; the frozen base comes from ``model.init_from``);
* ``merged_state_dict``: base + scale x adapter, in the base model's (= the released) key names;
* ``save_adapter`` / ``read_adapter``: peft's format, a folder with ``adapter_config.json`` and
  ``adapter_model.safetensors`` (keys ``base_model.model.<module>.lora_A.weight``;
  ``PeftModel.from_pretrained`` loads it onto the base model), with the base it was trained on recorded.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from latte.config import ConfigError, LoraConfig
from latte.files import atomic_write
from latte.seeding import splitmix64

ADAPTER = "default"  # peft's adapter name; the only one a model holds here
DEFAULT_TARGETS = {  # module-name suffixes (peft matches ``name == t`` or ``name.endswith("." + t)``)
    "Latte": ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"),
    "LatteT2V": ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"),
}
ADALN_TARGETS = {"Latte": ("adaLN_modulation.1",), "LatteT2V": ("adaln_single.linear",)}
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # a PeftModel's key prefix: how peft's files name the adapters
_DROPOUT_STREAM = 0x10A4D20F  # separates the adapters' dropout masks from the noise of the same sample


def enabled(lora: LoraConfig) -> bool:
    return lora.rank > 0


def targets_of(model: nn.Module, lora: LoraConfig) -> list[str]:
    kind = type(model).__name__
    targets = list(lora.target_modules) or list(DEFAULT_TARGETS[kind])
    if lora.adaln:
        targets += [t for t in ADALN_TARGETS[kind] if t not in targets]
    return targets


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def peft_config(model: nn.Module, lora: LoraConfig):
    """peft's ``LoraConfig`` for ``model``; every target must name at least one linear layer."""
    from peft import LoraConfig as PeftLoraConfig

    targets = targets_of(model, lora)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    for target in targets:
        if not any(_matches(n, target) for n in linears):
            examples = ", ".join(DEFAULT_TARGETS[type(model).__name__])
            raise ConfigError(
                f"model.lora.target_modules: '{target}' names no linear layer of the model (e.g. {examples})"
            )
    return PeftLoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha if lora.alpha is not None else lora.rank,
        lora_dropout=0.0,  # ours below: seeded per sample
        target_modules=targets,
        bias="none",
    )


class SampleSeededDropout(nn.Module):
    """Dropout whose mask for sample b is drawn from ``seeds[b]`` and this layer's stream alone.

    The input's first dimension holds the samples outermost, ``(B * k, ...)`` (Latte's ``(b f)`` and ``(b t)``
    rows, captions repeated per frame): sample b's rows ``[b k, (b + 1) k)`` get the mask drawn from its seed,
    whatever else is in the batch. Recomputed forwards (activation checkpointing) draw the same masks."""

    def __init__(self, p: float, stream: int) -> None:
        super().__init__()
        self.p, self.stream = p, stream
        self.seeds: tuple[int, ...] | None = None

    def extra_repr(self) -> str:
        return f"p={self.p}, per-sample seeded"

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        if not self.seeds:
            raise RuntimeError(
                "LoRA dropout: set_dropout_seeds(model, seeds) must precede a training forward"
            )
        samples = len(self.seeds)
        if x.shape[0] % samples:
            raise RuntimeError(f"LoRA dropout: {x.shape[0]} rows are not a multiple of {samples} samples")
        mask = _seeded_masks(self.seeds, self.stream, self.p, x)  # (B * k, ...) of sample b's own draws
        return x * mask / (1.0 - self.p)


@torch.compiler.disable  # a generator per call: runs eagerly between compiled regions (model.compile)
def _seeded_masks(seeds: tuple[int, ...], stream: int, p: float, x: Tensor) -> Tensor:
    """Keep masks of x's shape in x's dtype, rows ``[b k, (b + 1) k)`` drawn from ``seeds[b]`` and
    ``stream``."""
    rows = x.shape[0] // len(seeds)
    g = torch.Generator(device=x.device)
    keep = []
    for seed in seeds:
        g.manual_seed(splitmix64(seed ^ stream) >> 1)
        keep.append(torch.rand((rows, *x.shape[1:]), generator=g, device=x.device) >= p)
    return torch.cat(keep).to(x.dtype)


def lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def add_adapters(model: nn.Module, lora: LoraConfig) -> nn.Module:
    """Inject LoRA layers into ``model``'s targets (in place) and freeze everything but them."""
    from peft import inject_adapter_in_model

    config = peft_config(model, lora)
    model = inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    for name, param in model.named_parameters():
        param.requires_grad_(is_adapter_key(name))
    if lora.dropout > 0:
        for i, (_, layer) in enumerate(lora_layers(model)):
            layer.lora_dropout[ADAPTER] = SampleSeededDropout(lora.dropout, splitmix64(_DROPOUT_STREAM + i))
    model.lora_config = config  # what save_adapter writes
    return model


def is_adapter_key(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def set_dropout_seeds(model: nn.Module, seeds: tuple[int, ...]) -> None:
    """The per-sample seeds of the next training forward (and its backward's recomputation)."""
    for module in model.modules():
        if isinstance(module, SampleSeededDropout):
            module.seeds = tuple(seeds)


def has_dropout(model: nn.Module) -> bool:
    return any(isinstance(m, SampleSeededDropout) for m in model.modules())


def set_scale(model: nn.Module, scale: float) -> None:
    """Scale every adapter's contribution: ``scale`` x alpha / rank (1 = as trained, 0 = the base)."""
    for _, layer in lora_layers(model):
        layer.set_scale(ADAPTER, scale)


def load_adapter_state(model: nn.Module, adapters: dict[str, Tensor], source: str) -> None:
    """Load adapter tensors (our key names) into an adapted model: exactly its adapter keys, or one line
    naming ``source`` and the first missing or foreign key / wrong shape (``check_fits``)."""
    from latte.sampling.weights import check_fits

    own = {k: v for k, v in model.state_dict().items() if is_adapter_key(k)}
    check_fits(model, adapters, source, "the model's LoRA adapters", expected=own)
    missing, unexpected = model.load_state_dict(adapters, strict=False)
    assert not unexpected and not [k for k in missing if is_adapter_key(k)]


def load_trained(model: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """What a checkpoint's EMA (or raw weights) holds, into ``model``: the adapters of an adapted model (its
    base is already ``model.init_from``'s), else every weight, strictly."""
    if lora_layers(model):
        load_adapter_state(model, state, source)
    else:
        model.load_state_dict(state, strict=True)


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapted model's weights with the adapters merged in (at their current scale), in the base
    model's key names (fp32 CPU copies; the model is left unmerged)."""
    for _, layer in lora_layers(model):
        layer.merge(adapter_names=[ADAPTER])
    try:
        out = {
            k.replace(".base_layer.", "."): v.detach().float().cpu().clone()
            for k, v in model.state_dict().items()
            if not is_adapter_key(k)
        }
    finally:
        for _, layer in lora_layers(model):
            layer.unmerge()
    return out


def to_peft_keys(model: nn.Module) -> dict[str, Tensor]:
    """The model's adapter tensors under peft's file names (``base_model.model.<module>.lora_A.weight``)."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model, adapter_name=ADAPTER)
    return {PEFT_PREFIX + k: v.detach().float().cpu().contiguous().clone() for k, v in state.items()}


def save_adapter(model: nn.Module, out: str | os.PathLike, base: dict | None, model_name: str) -> Path:
    """Write ``model``'s adapters in peft's format to the folder ``out`` (files written under temporary names,
    then renamed). ``base`` (``{"path", "sha256"}`` of the base weights) and ``model_name`` are recorded in
    the safetensors metadata."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = model.lora_config.to_dict()
    config["target_modules"] = sorted(config["target_modules"])  # peft keeps a set
    config = json.loads(json.dumps(config, default=str))
    meta = {"format": "pt", "latte_model": model_name, "latte_base": json.dumps(base or {})}
    atomic_write(out / ADAPTER_CONFIG, lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n"))
    atomic_write(out / ADAPTER_WEIGHTS, lambda tmp: save_file(to_peft_keys(model), str(tmp), metadata=meta))
    return out


def read_adapter(path: str | os.PathLike) -> tuple[dict, dict[str, Tensor], dict]:
    """A peft adapter folder: (its ``adapter_config.json``, its tensors under peft's names, the metadata we
    wrote); one-line ``ConfigError``s for what is not one."""
    from safetensors import safe_open

    folder = Path(path)
    config_file, weights_file = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    if not config_file.is_file() or not weights_file.is_file():
        raise ConfigError(f"{path} is not a LoRA adapter folder ({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS})")
    try:
        config = json.loads(config_file.read_text())
        with safe_open(str(weights_file), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
            meta = f.metadata() or {}
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the LoRA adapter {path}: {exc}") from None
    if config.get("peft_type") != "LORA":
        raise ConfigError(f"{config_file} describes a {config.get('peft_type')} adapter, not LoRA")
    return config, tensors, meta


def lora_config_of(adapter_config: dict) -> LoraConfig:
    """Our ``model.lora`` for a peft adapter config (rank, alpha, targets)."""
    return LoraConfig(
        rank=int(adapter_config["r"]),
        alpha=float(adapter_config.get("lora_alpha", adapter_config["r"])),
        target_modules=sorted(adapter_config["target_modules"]),
    )


def load_peft_tensors(model: nn.Module, tensors: dict[str, Tensor], source: str) -> None:
    """Load adapter tensors named as in peft's files into an adapted model (exactly its adapters)."""
    ours = {}
    for key, value in tensors.items():
        name = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
        module, _, leaf = name.rpartition(".")  # e.g. blocks.0.attn.qkv.lora_A + weight
        ours[f"{module}.{ADAPTER}.{leaf}"] = value
    load_adapter_state(model, ours, source)


def apply_adapter(model: nn.Module, path: str | os.PathLike) -> str:
    """Add the adapter at ``path`` to a (base) model and load it: a peft adapter folder (``latte.export
    --adapter``) or a LoRA run's checkpoint / step directory (its EMA adapter). Returns what was applied,
    for messages; one-line ``ConfigError``s (not an adapter, another model's adapter)."""
    from latte import checkpoint as ckpt
    from latte.config import resolve_saved

    if lora_layers(model):
        raise ConfigError(
            "--lora: the model already has LoRA adapters (a LoRA run's checkpoint); give its base"
        )
    where = Path(path)
    if (where / ADAPTER_CONFIG).is_file():
        config, tensors, meta = read_adapter(where)
        add_adapters(model, lora_config_of(config))
        load_peft_tensors(model, tensors, str(where / ADAPTER_WEIGHTS))
        trained = f", trained on {json.loads(meta['latte_base'])['path']}" if meta.get("latte_base") else ""
        return f"LoRA adapter {where} (rank {config['r']}{trained})"
    if not where.is_dir():
        raise ConfigError(f"--lora {path}: no such adapter folder or checkpoint directory")
    step_dir = ckpt.choose(str(where), where)
    meta = json.loads((step_dir / ckpt.META).read_text())
    saved = resolve_saved(meta["config"]).model.lora
    if not enabled(saved):
        raise ConfigError(f"--lora {path}: {step_dir} is not a LoRA run's checkpoint")
    add_adapters(model, dataclasses.replace(saved, dropout=0.0))
    ema = torch.load(step_dir / ckpt.EMA_FULL, map_location="cpu", weights_only=True)
    load_adapter_state(model, ema, str(step_dir / ckpt.EMA_FULL))
    return f"LoRA adapter: the EMA of {step_dir} (rank {saved.rank})"
