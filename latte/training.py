"""The training objects a config describes, built in one order: ``build_training(cfg, world)``.

Seeds -> model (fp32, identical on every rank) -> its fixed fp32 tables and parameter count (before ZeRO-3
partitions and a bf16/fp16 engine casts it) -> DeepSpeed engine -> EMA (a copy of the synced initial
weights) -> diffusion -> the precision wrapper the diffusion calls. ``train.py``, the benchmarks and the
tests build through this function, so they train what ``train.py`` trains.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from latte import lora
from latte.builders import build_diffusion, build_model
from latte.config import Config
from latte.ema import ShardedEMA
from latte.engine import build_engine
from latte.precision import DTYPES, call_in


@dataclass
class Training:
    engine: Any  # the DeepSpeed engine around the model
    ema: ShardedEMA
    diffusion: Any  # the training diffusion (``timestep_respacing``)
    compute_dtype: torch.dtype  # what the network computes in (train.precision)
    n_params: int  # trainable parameters
    n_total: int = 0  # all parameters (more than n_params when a frozen base is adapted with LoRA)

    def model_fn(self, x_t: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
        """The engine as the diffusion math calls it (``precision.call_in``: in the engine's precision,
        the output back to fp32)."""
        return call_in(self.engine, self.compute_dtype, x_t, t, **kwargs)


def seed_everything(seed: int) -> None:
    """torch's, python's and numpy's RNGs: identical initial weights on every rank; checkpoints save all
    three, so resumes are exact whatever library draws from them."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def build_training(cfg: Config, world, load_universal: bool = False, resuming: bool = False) -> Training:
    """Everything a training step needs, from ``cfg`` (``load_universal``: the checkpoint to resume from
    was saved by another number of ranks, ``CheckpointManager.reshard``; ``resuming``: a checkpoint will
    overwrite the weights, so ``model.init_from`` is not read, unless LoRA's frozen base needs it)."""
    seed_everything(cfg.train.seed)
    model = build_model(cfg, base_weights=not resuming or lora.enabled(cfg.model.lora))
    fixed = {name: p.detach().clone() for name, p in model.named_parameters() if name in model.FIXED_TABLES}
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
    engine = build_engine(cfg, model, world, load_universal=load_universal)
    # starts as a copy of the synced initial weights; under LoRA, of the adapters alone
    ema = ShardedEMA(engine, cfg.train.ema_decay, fixed, include_frozen=not lora.enabled(cfg.model.lora))
    return Training(engine, ema, build_diffusion(cfg), DTYPES[cfg.train.precision], n_params, n_total)
