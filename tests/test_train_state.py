"""What a checkpoint restores is one ``TrainState``: engine, EMA, data position, and named extra states.
A state added later is saved by every checkpoint and left as built when resuming one written before it
existed. The engine here is a minimal stand-in with DeepSpeed's save/load calls (one process, no ZeRO):
the manager's own logic (files, manifest, pointer, states) is what runs; the DeepSpeed engine itself is
covered by the 2-rank tests in test_checkpoint.py."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch

from data_pipeline.synthetic import SyntheticStream
from latte.checkpoint import CheckpointManager, TrainState, is_complete
from latte.config import load_config
from latte.ema import ShardedEMA

TINY = Path(__file__).resolve().parents[1] / "configs/tiny.yaml"


class TinyEngine:
    """``save_checkpoint``/``load_checkpoint`` as DeepSpeed calls them, for one module."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module, self.lr_scheduler = module, None
        self.optimizer = SimpleNamespace(param_groups=[])

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict, save_latest: bool) -> None:
        torch.save(self.module.state_dict(), Path(save_dir) / tag / "mp_rank_00_model_states.pt")

    def load_checkpoint(self, load_dir: str, tag: str, **_) -> tuple[str, dict]:
        path = Path(load_dir) / tag / "mp_rank_00_model_states.pt"
        self.module.load_state_dict(torch.load(path, weights_only=True))
        return str(path), {}


class Counter:
    def __init__(self) -> None:
        self.value = 0

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


def _state(extra: dict) -> TrainState:
    module = torch.nn.Linear(3, 2)
    data = SyntheticStream(0, 2, 4, 2, 4, 8)
    return TrainState(TinyEngine(module), ShardedEMA(module, 0.9), data, extra)


def test_extra_states_round_trip_and_old_checkpoints_leave_them_as_built(tmp_path):
    cfg = load_config(TINY, [f"train.results_dir={tmp_path}", "train.ckpt_every=1", "train.max_steps=4"])
    world = SimpleNamespace(rank=0, world_size=1, is_main=True)
    manager = CheckpointManager(cfg, world)
    assert manager.find() is None and manager.resumed_run_dir is None
    assert [manager.due(s) for s in (1, 2, 4)] == [True, True, True]
    old = manager.save(1, _state({}), run_dir=tmp_path / "000-run")  # written before "counter" existed
    counter = Counter()
    counter.value = 7
    new = manager.save(2, _state({"counter": counter}))
    assert is_complete(old) and is_complete(new)
    manager.close()

    for step_dir, expected in ((new, 7), (old, 0)):
        restored = Counter()
        again = CheckpointManager(
            load_config(TINY, [f"train.results_dir={tmp_path}", f"train.resume={step_dir}"]), world
        )
        assert again.find() == step_dir
        assert again.load(step_dir, _state({"counter": restored})) == int(step_dir.name[-1])
        assert restored.value == expected
        assert again.resumed_run_dir == ("000-run" if step_dir == old else None)
        again.close()


def test_checkpoint_due_every_ckpt_every_and_at_the_end():
    cfg = load_config(TINY, ["train.ckpt_every=5", "train.max_steps=12"])
    manager = CheckpointManager(cfg, SimpleNamespace(rank=1, world_size=2, is_main=False))
    assert [s for s in range(1, 13) if manager.due(s)] == [5, 10, 12]
