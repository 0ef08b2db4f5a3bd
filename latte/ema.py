"""FSDP-safe EMA: each rank keeps an fp32 EMA of exactly the parameter shard it owns.

Where the shard comes from (all of it stays inside this file):

* ZeRO-3: the rank's fp32 master partition of each parameter (flat, padded): a view into the optimizer's
  ``fp32_partitioned_groups_flat``, or ``safe_get_local_fp32_param`` per update where that layout is
  missing or swapped to NVMe.
* ZeRO-1/2 (and DeepSpeed's bf16 optimizer): the rank's fragment of the flat fp32 partition that each
  parameter maps to (``param._hp_mapping``: a view and its offset in the flattened parameter).
* No sharding (a plain module or a ZeRO-0 fp32 engine): the full parameters.

The EMA starts as a copy of the (synced) initial weights, i.e. one update with decay 0, as DiT does; then
``update()`` after every optimizer step that was applied: one ``_foreach_lerp_`` over the local tensors,
reading the master values in place (views cached once: no per-parameter copy or stream sync), no
collective. The EMA lives where the master weights do: on the GPU, or on the host under optimizer offload.
``consolidate()`` (a collective every rank calls; over NCCL each host-resident tensor visits the GPU for
its gather) assembles the full state dict under the model's own key names, fixed tables (``pos_embed``,
``temp_embed``) and other frozen parameters copied from the model, for saving, sampling and export. Memory
per rank: full fp32 EMA / data-parallel size (+ padding).
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
    ema: Tensor  # fp32, this rank's part, on the device of the master weights it follows
    start: int = 0  # "fragment": offset of this rank's part in the flattened parameter
    master: Tensor | None = None  # a view of the fp32 master values, when DeepSpeed keeps them in place


def _module_of(model) -> nn.Module:
    return getattr(model, "module", model)  # a DeepSpeed engine wraps the nn.Module


def _master_view(shard: _Shard) -> Tensor | None:
    """A view of this rank's fp32 master values of the shard's parameter that stays valid across optimizer
    steps (DeepSpeed updates and loads its flat partitions in place), or None where they move."""
    if shard.kind == "fragment":
        return shard.param._hp_mapping.get_hp_fragment()  # a narrow view of the flat fp32 partition
    if shard.kind == "full":
        return shard.param.detach() if shard.param.dtype == torch.float32 else None
    # ZeRO-3: `safe_get_local_fp32_param` syncs a stream and copies to the accelerator on every call (with
    # optimizer offload: a host -> device copy per parameter per update). Read the partition in place.
    try:
        opt = shard.param._z3_optimizer
        group, offset, numel = opt.grad_position[opt.get_param_id(shard.param)]
        if opt._swappable_optimizer_subgroup(group):  # NVMe swapping: the partition is not resident
            return None
        return opt.fp32_partitioned_groups_flat[group].narrow(0, offset, numel)
    except (AttributeError, KeyError, TypeError):  # another DeepSpeed layout: the public accessor below
        return None


def _local_master(shard: _Shard) -> Tensor:
    """This rank's current fp32 master values of the shard's parameter."""
    if shard.master is not None:
        return shard.master
    if shard.kind != "zero3":
        return shard.param.detach().float()
    from deepspeed.utils import safe_get_local_fp32_param

    return safe_get_local_fp32_param(shard.param).float()


def _kind(param: nn.Parameter) -> str | None:
    if hasattr(param, "ds_id"):
        return "zero3"
    if hasattr(param, "_hp_mapping"):
        return "fragment" if param._hp_mapping is not None else None  # None: another rank owns all of it
    return "full"


class ShardedEMA:
    """EMA of the trainable parameters of ``model`` (an nn.Module or a DeepSpeed engine), sharded like
    the optimizer's fp32 master weights and kept where they live (the GPU, or the host with offload)."""

    def __init__(
        self, model, decay: float, fixed: dict[str, Tensor] | None = None, include_frozen: bool = True
    ) -> None:
        """``decay``: the config's (``train.ema_decay``; a checkpoint's saved value is not restored).
        ``fixed``: fp32 values of the fixed tables (the sin-cos positions), taken before a bf16/fp16 engine
        cast them; the EMA reports these exactly. Every other frozen parameter is read from the model at
        consolidation, never copied here; ``include_frozen=False`` (LoRA: the frozen base is
        ``model.init_from``'s) leaves frozen parameters and buffers out of ``consolidate()`` altogether."""
        self.model = model
        self.decay = decay
        self.include_frozen = include_frozen
        self.fixed = {k: v.detach().float().cpu().clone() for k, v in (fixed or {}).items()}
        self.shards: list[_Shard] = []
        for name, param in _module_of(model).named_parameters():
            kind = _kind(param) if param.requires_grad else None
            if kind is None:
                continue  # frozen (copied at consolidation) or wholly owned by another rank
            shard = _Shard(name, param, kind, torch.empty(0))
            if kind == "fragment":
                shard.start = param._hp_mapping.lp_fragment_address.start
            shard.master = _master_view(shard)
            shard.ema = _local_master(shard).detach().float().clone()  # decay 0: the initial weights
            self.shards.append(shard)

    def refresh_masters(self) -> None:
        """Look the master views up again (after a checkpoint load, in case DeepSpeed re-linked them)."""
        for shard in self.shards:
            shard.master = _master_view(shard)

    @torch.no_grad()
    def update(self, decay: float | None = None) -> None:
        """ema <- ema + (1 - decay) * (master - ema) on this rank's shard only: one fused ``_foreach_lerp_``
        over all local tensors, no copies, no collective (its rounding differs from mul + add)."""
        d = self.decay if decay is None else decay
        if not self.shards:
            return
        torch._foreach_lerp_([s.ema for s in self.shards], [_local_master(s) for s in self.shards], 1 - d)

    def local_bytes(self) -> int:
        return sum(s.ema.numel() * s.ema.element_size() for s in self.shards)

    # ------------------------------------------------------------------------------------------------------
    # Consolidation and re-sharding
    # ------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def consolidate(self) -> dict[str, Tensor]:
        """The full EMA state dict (CPU fp32, the model's key names) on every rank. A collective.
        Without ``include_frozen``: the trainable parameters' EMA alone."""
        module = _module_of(self.model)
        by_name = {s.name: s for s in self.shards}
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        out: dict[str, Tensor] = {}
        for name, param in module.named_parameters():
            shard = by_name.get(name)
            kind = _kind(param) if param.requires_grad else "frozen"
            if kind == "frozen" and not self.include_frozen:
                continue
            if kind == "zero3":
                out[name] = _gather_zero3(param, shard.ema)
            elif kind in ("fragment", None):  # None: this rank owns no fragment of it, others do
                out[name] = _gather_fragments(param, shard, dist)
            elif kind == "full":
                out[name] = shard.ema.detach().cpu().clone()
            elif name in self.fixed:  # frozen, fp32 as given (fixed sin-cos tables)
                out[name] = self.fixed[name].clone()
            else:  # frozen: the model's own value
                out[name] = _full_param(param).float().cpu().clone()
        for name, buf in _persistent_buffers(module) if self.include_frozen else ():  # as the state dict has
            out[name] = buf.detach().float().cpu().clone()  # them (not e.g. cached frequencies)
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
        """This rank's shards (to be saved per rank beside the engine state), and the decay it ran with."""
        return {"decay": self.decay, "shards": {s.name: s.ema for s in self.shards}}

    def load_state_dict(self, state: dict[str, object]) -> None:
        shards = state["shards"]
        missing = [s.name for s in self.shards if s.name not in shards]
        if missing or len(shards) != len(self.shards):
            raise ValueError(f"EMA state does not match this rank's shard layout (e.g. {missing[:3]})")
        for s in self.shards:
            if shards[s.name].shape != s.ema.shape:
                raise ValueError(
                    f"EMA shard '{s.name}' has shape {tuple(shards[s.name].shape)}, "
                    f"expected {tuple(s.ema.shape)}"
                )
            s.ema.copy_(shards[s.name])  # the decay stays the config's (the saved one is informational)


def _persistent_buffers(module: nn.Module):
    for prefix, sub in module.named_modules():
        for name, buf in sub.named_buffers(recurse=False):
            if name not in sub._non_persistent_buffers_set:
                yield (f"{prefix}.{name}" if prefix else name), buf


def _full_param(param: nn.Parameter) -> Tensor:
    """A parameter's full value (gathered under ZeRO-3; read-only)."""
    if hasattr(param, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            return param.detach().clone()
    return param.detach()


def _comm_device(local: Tensor) -> torch.device:
    """Where a collective over the world group can take a tensor: NCCL needs CUDA tensors (an EMA that lives
    on the host with optimizer offload goes to the GPU one parameter at a time); gloo takes them as given."""
    if torch.distributed.is_initialized() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return local.device


def _gather_zero3(param: nn.Parameter, local: Tensor) -> Tensor:
    world = torch.distributed.get_world_size()
    local = local.to(_comm_device(local)).contiguous()
    parts = [torch.empty_like(local) for _ in range(world)]
    torch.distributed.all_gather(parts, local)
    flat = torch.cat(parts)[: param.ds_numel]  # partitions in rank order, padding dropped
    return flat.view(param.ds_shape).cpu()


def _gather_fragments(param: nn.Parameter, shard: _Shard | None, dist: bool) -> Tensor:
    """Every rank adds its fragment into a zero tensor; a sum all-reduce assembles the parameter."""
    device = _comm_device(param.detach())
    full = torch.zeros(param.numel(), dtype=torch.float32, device=device)
    if shard is not None:
        full[shard.start : shard.start + shard.ema.numel()] = shard.ema.to(device)
    if dist:
        torch.distributed.all_reduce(full)
    return full.view(param.shape).cpu()
