"""FSDP-safe EMA: each rank keeps an fp32 EMA of exactly the parameter shard it owns.

Where the shard comes from (all of it stays inside this file):

* ZeRO-3: the rank's fp32 master partition of each parameter (``safe_get_local_fp32_param``; flat, padded).
* ZeRO-1/2 (and DeepSpeed's bf16 optimizer): the rank's fragment of the flat fp32 partition that each
  parameter maps to (``param._hp_mapping``: a view and its offset in the flattened parameter).
* No sharding (a plain module or a ZeRO-0 fp32 engine): the full parameters.

The EMA starts as a copy of the (synced) initial weights, i.e. one update with decay 0, as DiT does; then
``update()`` after every optimizer step that was applied: one fused multiply-add per local tensor, no
collective. ``consolidate()`` (a collective every rank calls) assembles the full state dict under the
model's own key names, fixed tables (``pos_embed``, ``temp_embed``) and other frozen parameters copied from
the model, for saving, sampling and export. Memory per rank: full fp32 EMA / data-parallel size (+ padding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class _Shard:
    name: str
    param: nn.Parameter
    kind: str  # "zero3" | "fragment" | "full"
    ema: Tensor  # fp32, this rank's part
    start: int = 0  # "fragment": offset of this rank's part in the flattened parameter


def _module_of(model) -> nn.Module:
    return getattr(model, "module", model)  # a DeepSpeed engine wraps the nn.Module


def _local_master(shard: _Shard) -> Tensor:
    """This rank's current fp32 master values of the shard's parameter (a view where DeepSpeed allows)."""
    if shard.kind == "zero3":
        from deepspeed.utils import safe_get_local_fp32_param

        return safe_get_local_fp32_param(shard.param)
    if shard.kind == "fragment":
        return shard.param._hp_mapping.get_hp_fragment()
    return shard.param.detach()


def _kind(param: nn.Parameter) -> str | None:
    if hasattr(param, "ds_id"):
        return "zero3"
    if hasattr(param, "_hp_mapping"):
        return "fragment" if param._hp_mapping is not None else None  # None: another rank owns all of it
    return "full"


class ShardedEMA:
    """EMA of the trainable parameters of ``model`` (an nn.Module or a DeepSpeed engine), sharded like
    the optimizer's fp32 master weights."""

    def __init__(self, model, decay: float, frozen: dict[str, Tensor] | None = None) -> None:
        """``frozen``: fp32 values of the frozen parameters, taken before a bf16/fp16 engine cast them (the
        EMA reports these, e.g. the exact sin-cos tables); by default they are read from the model."""
        self.model = model
        self.decay = decay
        self.frozen = {k: v.detach().float().cpu().clone() for k, v in (frozen or {}).items()}
        self.shards: list[_Shard] = []
        for name, param in _module_of(model).named_parameters():
            kind = _kind(param) if param.requires_grad else None
            if kind is None:
                continue  # frozen (copied at consolidation) or wholly owned by another rank
            shard = _Shard(name, param, kind, torch.empty(0))
            if kind == "fragment":
                shard.start = param._hp_mapping.lp_fragment_address.start
            shard.ema = (
                _local_master(shard).detach().float().clone()
            )  # decay 0: a copy of the initial weights
            self.shards.append(shard)

    @torch.no_grad()
    def update(self, decay: float | None = None) -> None:
        """ema = decay * ema + (1 - decay) * master, on this rank's shard only."""
        d = self.decay if decay is None else decay
        if not self.shards:
            return
        emas = [s.ema for s in self.shards]
        masters = [_local_master(s).float() for s in self.shards]
        torch._foreach_mul_(emas, d)
        torch._foreach_add_(emas, masters, alpha=1 - d)

    def local_bytes(self) -> int:
        return sum(s.ema.numel() * s.ema.element_size() for s in self.shards)

    # ------------------------------------------------------------------------------------------------------
    # Consolidation and re-sharding
    # ------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def consolidate(self) -> dict[str, Tensor]:
        """The full EMA state dict (CPU fp32, the model's key names) on every rank. A collective."""
        module = _module_of(self.model)
        by_name = {s.name: s for s in self.shards}
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        out: dict[str, Tensor] = {}
        for name, param in module.named_parameters():
            shard = by_name.get(name)
            kind = _kind(param) if param.requires_grad else "frozen"
            if kind == "zero3":
                out[name] = _gather_zero3(param, shard.ema)
            elif kind in ("fragment", None):  # None: this rank owns no fragment of it, others do
                out[name] = _gather_fragments(param, shard, dist)
            elif kind == "full":
                out[name] = shard.ema.detach().cpu().clone()
            elif name in self.frozen:  # frozen, fp32 as given (fixed sin-cos tables)
                out[name] = self.frozen[name].clone()
            else:  # frozen: the model's own value
                out[name] = _full_param(param).float().cpu().clone()
        for name, buf in module.named_buffers():
            out[name] = buf.detach().float().cpu().clone()
        return out

    @torch.no_grad()
    def load_consolidated(self, full: dict[str, Tensor]) -> None:
        """Re-shard a consolidated EMA onto this rank's layout (any world size saved it)."""
        for shard in self.shards:
            value = full[shard.name].float().flatten()
            n = shard.ema.numel()
            if shard.kind == "zero3":
                rank = torch.distributed.get_rank()
                part = value.new_zeros(n)
                piece = value[rank * n : (rank + 1) * n]
                part[: piece.numel()] = piece
            elif shard.kind == "fragment":
                part = value[shard.start : shard.start + n]
            else:
                part = value.view_as(shard.ema)
            shard.ema.copy_(part.view_as(shard.ema).to(shard.ema.device))

    def state_dict(self) -> dict[str, object]:
        """This rank's shards (to be saved per rank beside the engine state)."""
        return {"decay": self.decay, "shards": {s.name: s.ema for s in self.shards}}

    def load_state_dict(self, state: dict[str, object]) -> None:
        shards = state["shards"]
        missing = [s.name for s in self.shards if s.name not in shards]
        if missing or len(shards) != len(self.shards):
            raise ValueError(f"EMA state does not match this rank's shard layout (e.g. {missing[:3]})")
        for s in self.shards:
            if shards[s.name].shape != s.ema.shape:
                raise ValueError(f"EMA shard '{s.name}' has shape {tuple(shards[s.name].shape)}, "
                                 f"expected {tuple(s.ema.shape)}")  # fmt: skip
            s.ema.copy_(shards[s.name])
        self.decay = float(state["decay"])


def _full_param(param: nn.Parameter) -> Tensor:
    """A parameter's full value (gathered under ZeRO-3; read-only)."""
    if hasattr(param, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            return param.detach().clone()
    return param.detach()


def _gather_zero3(param: nn.Parameter, local: Tensor) -> Tensor:
    world = torch.distributed.get_world_size()
    parts = [torch.empty_like(local) for _ in range(world)]
    torch.distributed.all_gather(parts, local.contiguous())
    flat = torch.cat(parts)[: param.ds_numel]  # partitions in rank order, padding dropped
    return flat.view(param.ds_shape).cpu()


def _gather_fragments(param: nn.Parameter, shard: _Shard | None, dist: bool) -> Tensor:
    """Every rank adds its fragment into a zero tensor; a sum all-reduce assembles the parameter."""
    full = torch.zeros(param.numel(), dtype=torch.float32, device=param.device)
    if shard is not None:
        full[shard.start : shard.start + shard.ema.numel()] = shard.ema.to(full.device)
    if dist:
        torch.distributed.all_reduce(full)
    return full.view(param.shape).cpu()
