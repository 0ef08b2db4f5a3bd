"""Text-to-video training holds what class-conditional training does (issue 15): the tiny LatteT2V on 2 CPU
ranks, ZeRO-2 and ZeRO-3, on real captioned shards (padded by the loader, caption dropout on), killed with
SIGKILL and resumed with ``--resume auto`` ends with the same bits as an unbroken run; a 2-rank checkpoint
resumed on 1 rank follows the 2-rank run. The launch, kill and comparison helpers are test_checkpoint's,
pointed at configs/tiny_t2v.yaml and a shorter run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import test_checkpoint as ckpt
import torch
from make_shards import make_dataset
from test_checkpoint import _finish, _kill_9, _start, assert_same_checkpoint, two_ranks_then_one

from latte.checkpoint import tag_for
from latte.config import load_config

REPO = Path(__file__).resolve().parents[1]
T2V = REPO / "configs" / "tiny_t2v.yaml"
STEPS, EVERY = 20, 5  # 320 samples: 2.7 epochs of the 120-sample dataset


@pytest.fixture(autouse=True)
def t2v_runs(monkeypatch):
    """test_checkpoint's helpers launch configs/tiny_t2v.yaml for STEPS steps, a checkpoint every EVERY."""
    monkeypatch.setattr(ckpt, "TINY", T2V)
    monkeypatch.setattr(ckpt, "STEPS", STEPS)
    monkeypatch.setattr(ckpt, "EVERY", EVERY)


@pytest.fixture(scope="module")
def captioned(tmp_path_factory) -> Path:
    """120 captioned samples (width 32, 1..8 tokens each: the loader pads them) in 6 shards: its index."""
    root = tmp_path_factory.mktemp("t2v-data")
    make_dataset(str(root), [20] * 6, caption_width=32)
    return root / "index.json"


@pytest.mark.slow
@pytest.mark.parametrize("zero, kill_during_save", [("2", False), ("3", True)])
def test_t2v_kill_9_and_resume_auto_gives_the_same_bits(tmp_path, captioned, zero, kill_during_save):
    """One kill per run (ZeRO-2 at a random moment, ZeRO-3 inside a save) once step 10 is saved, resumed."""
    assert load_config(T2V).model.caption_dropout_prob == 0.1  # the dropout draws are part of the state
    overrides = [f"train.zero_stage={zero}", f"data.index={captioned}", "data.shuffle_buffer=16"]
    unbroken = _start(tmp_path / "unbroken", overrides)
    broken = tmp_path / "broken"
    ck = broken / "checkpoints"
    newest, _ = _kill_9(_start(broken, overrides), ck, 2 * EVERY, kill_during_save)
    out = _finish(_start(broken, overrides, "--resume", "auto"))
    assert f"resumed from {ck / tag_for(newest)} at step {newest}" in out, out[-3000:]
    assert f"LatteT2V-T/2 0.29M params | 2 x cpu | fp32 | ZeRO {zero}" in out, out[-3000:]
    _finish(unbroken)

    final = ck / tag_for(STEPS)
    assert_same_checkpoint(tmp_path / "unbroken" / "checkpoints" / tag_for(STEPS), final)
    meta = json.loads((final / "meta.json").read_text())
    assert meta["dataset"]["text_encoder"] == "toy-t5" and meta["world_size"] == 2
    data = torch.load(final / "rank_00001.pt", weights_only=False)["data"]
    assert data["dataset"]["index"] == str(captioned) and data["epoch"] == 2  # the shards' loader, resumed


@pytest.mark.slow
def test_t2v_world_size_change_2_to_1_under_zero_2(tmp_path):
    """A 2-rank ZeRO-2 checkpoint resumed on 1 rank (universal conversion, EMA re-sharded) follows the 2-rank
    run to fp32 rounding, caption dropout included (drawn per global sample). Synthetic captioned clips: the
    stream is re-split at the step boundary (a shard loader would spread the epoch's rest another way)."""
    same = ["train.max_steps=20", "train.ckpt_every=10", "train.log_every=10"]
    ck2, _ = two_ranks_then_one(tmp_path, same)
    module = torch.load(ck2 / tag_for(20) / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert any("attn2" in k for k in module)  # the cross-attention to the captions was compared too
