"""The sharded EMA on 2 CPU ranks under ZeRO-2, ZeRO-3 and ZeRO-3 with optimizer offload, fp32 and bf16:
each rank holds only its shard, read in place from DeepSpeed's fp32 partitions, and the consolidated EMA
equals a full-model EMA of the same run (computed from gathered fp32 masters)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dist import run_ranks

REPO = Path(__file__).resolve().parents[1]
DECAY = 0.9


def ema_run(zero: str, precision: str, steps: int) -> dict:
    from deepspeed.utils import safe_get_full_fp32_param

    from latte.builders import build_model
    from latte.config import load_config
    from latte.engine import setup_distributed
    from latte.training import build_training, seed_everything

    cfg = load_config(
        REPO / "configs/tiny.yaml",
        [
            f"train.zero_stage={zero}",
            f"train.precision={precision}",
            "train.micro_batch_size=2",
            "train.seed=0",
            f"train.ema_decay={DECAY}",
        ],
    )
    world = setup_distributed()
    seed_everything(cfg.train.seed)  # the weights build_training starts from
    initial = {n: p.detach().clone() for n, p in build_model(cfg).named_parameters()}
    training = build_training(cfg, world)
    engine, ema, diffusion = training.engine, training.ema, training.diffusion
    at_start = ema.consolidate()
    # the EMA reads DeepSpeed's fp32 partitions in place: views into them, no per-step copies
    opt = engine.optimizer
    flats = getattr(opt, "fp32_partitioned_groups_flat", None) or opt.single_partition_of_fp32_groups
    storages = {t.untyped_storage().data_ptr() for t in flats}
    in_place = all(
        s.master is not None and s.master.untyped_storage().data_ptr() in storages for s in ema.shards
    )

    def full_masters() -> dict[str, torch.Tensor]:  # a collective per call: only this test does it
        params = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
        return {n: safe_get_full_fp32_param(p).float().cpu().clone() for n, p in params}

    reference = full_masters()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    g = torch.Generator().manual_seed(100 + world.rank)
    for _ in range(steps):
        x = torch.randn(2, 4, 4, 8, 8, generator=g)
        y, t = torch.randint(0, 4, (2,), generator=g), torch.randint(0, 1000, (2,), generator=g)
        loss = diffusion.training_losses(
            lambda a, b, **k: engine(a.to(dtype), b, **k).float(), x, t, {"y": y}
        )
        engine.backward(loss["loss"].mean())
        engine.step()
        assert engine.was_step_applied()
        ema.update()
        for name, value in full_masters().items():  # DiT's update on full tensors (as a lerp)
            reference[name].lerp_(value, 1 - DECAY)  # the same formula as ShardedEMA.update
    final = ema.consolidate()
    full_bytes = 4 * sum(initial[n].numel() for n, p in engine.module.named_parameters() if p.requires_grad)
    result = {"local_bytes": ema.local_bytes(), "full_bytes": full_bytes, "in_place": in_place}
    if world.rank == 0:
        result.update(
            initial=initial,
            at_start=at_start,
            final=final,
            reference=reference,
            keys=list(engine.module.state_dict()),
        )
    torch.distributed.destroy_process_group()
    return result


@pytest.mark.slow
@pytest.mark.parametrize(
    "zero, precision", [("2", "fp32"), ("3", "fp32"), ("2", "bf16"), ("3", "bf16"), ("3_offload", "bf16")]
)
def test_sharded_ema_equals_full_ema(tmp_path, zero, precision):
    results = run_ranks(ema_run, 2, (zero, precision, 3), tmp_path)
    r0 = results[0]
    assert list(r0["final"]) == r0["keys"]  # the model's own key names, fixed tables included
    for name, value in r0["initial"].items():  # decay 0 at the start: a copy of the initial weights
        if precision == "bf16" and name not in ("pos_embed", "temp_embed"):
            value = value.to(torch.bfloat16)  # DeepSpeed's fp32 masters start from the bf16-cast weights
        assert torch.equal(r0["at_start"][name], value.float()), name
    for name, value in r0["reference"].items():
        assert torch.equal(r0["final"][name], value), name
    assert torch.equal(r0["final"]["pos_embed"], r0["initial"]["pos_embed"])  # frozen sin-cos: copied
    moved = r0["final"]["final_layer.linear.weight"].abs().sum()
    assert moved > 0, "the EMA should have followed the trained (zero-initialised) output layer"
    assert all(r["in_place"] for r in results)
    for r in results:  # each rank holds about half: its shard (+ padding), never the full model
        assert 0.45 * r["full_bytes"] <= r["local_bytes"] <= 0.55 * r["full_bytes"], r["local_bytes"]


def test_unsharded_module_ema():
    from latte.ema import ShardedEMA

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    ema = ShardedEMA(model, 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update()
    for name, value in ema.consolidate().items():
        torch.testing.assert_close(value, before[name] + 0.5)
    state = ema.state_dict()
    other = ShardedEMA(model, 0.25)
    other.load_state_dict(state)
    for (name, a), b in zip(other.consolidate().items(), ema.consolidate().values(), strict=True):
        assert torch.equal(a, b), name
    assert other.decay == 0.25  # the decay is the config's, not the checkpoint's (0.5)


def test_only_fixed_tables_are_copied_other_frozen_parameters_are_read_from_the_model():
    from latte.ema import ShardedEMA

    base, head = torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)  # a frozen base model and a trained head
    base.requires_grad_(False)
    table = torch.nn.Parameter(torch.arange(4.0), requires_grad=False)  # a fixed table, e.g. sin-cos
    model = torch.nn.Sequential(base, head)
    model.register_parameter("table", table)
    ema = ShardedEMA(model, 0.5, fixed={"table": table})
    assert list(ema.fixed) == ["table"]  # the frozen base is not copied (LoRA: a full model on the host)
    assert [s.name for s in ema.shards] == ["1.weight", "1.bias"]
    with torch.no_grad():
        base.weight.add_(1.0)  # what the model holds at consolidation is what the EMA reports
    full = ema.consolidate()
    assert torch.equal(full["0.weight"], base.weight) and torch.equal(full["table"], torch.arange(4.0))
