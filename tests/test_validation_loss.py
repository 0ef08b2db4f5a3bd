"""The validation loss: the fixed set, the buckets, 1 rank == 2 ranks, and training with it on (which trains
exactly as with it off, and logs what the checkpoint's weights give)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from dist import run_ranks
from make_shards import make_dataset
from test_train_deepspeed import REPO, TINY, _run

from data_pipeline.loader import Expected
from data_pipeline.validation_set import ValidationSet, ValidationSetError
from latte.evaluation.validation_loss import bucket_timesteps, validation_loss

SHAPE = (4, 4, 8, 8)  # (F, C, h, w) of configs/tiny.yaml


def test_buckets_are_centred():
    assert bucket_timesteps(1000, 10) == [50, 150, 250, 350, 450, 550, 650, 750, 850, 950]
    assert bucket_timesteps(1000, 1) == [500]
    assert bucket_timesteps(4, 4) == [0, 1, 2, 3]


def test_the_set_is_the_first_readable_clips_in_index_order(tmp_path):
    make_dataset(str(tmp_path), [3, 4, 5], corrupt={1, 4})  # samples 0..11, two spoilt
    val = ValidationSet.read(str(tmp_path), clips=6)
    assert [i.split("/")[-1] for i in val.ids] == [f"clip{n:06d}" for n in (0, 2, 3, 5, 6, 7)]
    assert val.skipped == 2
    batch = val.batch([0, 5])
    assert batch["latent"].shape == (2, *SHAPE) and batch["y"].tolist() == [0, 3]
    again = ValidationSet.read(str(tmp_path), clips=6).batch([0, 5])["latent"]
    assert torch.equal(again, batch["latent"])  # the posterior draw is fixed
    assert val.batch([0, 5]) is batch  # and made once: later evaluations reuse it
    assert len(ValidationSet.read(str(tmp_path), clips=100)) == 10  # fewer than asked: all of them


def test_bad_validation_sets_are_one_line(tmp_path):
    with pytest.raises(ValidationSetError, match=r"^data.val_index: .*index.json"):
        ValidationSet.read(str(tmp_path / "nowhere"), clips=4)
    make_dataset(str(tmp_path / "d"), [2])
    with pytest.raises(ValidationSetError, match=r"latents of shape .* \(4, 4, 16, 16\)"):
        ValidationSet.read(str(tmp_path / "d"), clips=4, expected=Expected((4, 4, 16, 16)))
    make_dataset(str(tmp_path / "bad"), [2], corrupt={0, 1})
    with pytest.raises(ValidationSetError, match="has no readable samples"):
        ValidationSet.read(str(tmp_path / "bad"), clips=4)


def _tiny():
    from latte.builders import build_diffusion, build_model
    from latte.conditioning import conditioning_of
    from latte.config import load_config

    cfg = load_config(TINY, ["model.class_dropout_prob=0.0"])
    torch.manual_seed(1)
    model = build_model(cfg)
    for p in model.parameters():  # adaLN-Zero starts at zero: give every layer a say
        p.data.add_(0.02 * torch.randn_like(p))
    return model, build_diffusion(cfg), conditioning_of(cfg.model, None)


def _validate(root: str, batch_size: int) -> list[float]:
    import os

    from latte.precision import call_in

    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world_size > 1:
        torch.distributed.init_process_group("gloo")
    model, diffusion, conditioning = _tiny()
    val = ValidationSet.read(root, clips=7)

    def fn(x, t, **kw):
        return call_in(model, torch.float32, x, t, **kw)

    cpu = torch.device("cpu")
    r = validation_loss(
        fn, diffusion, conditioning, val, rank, world_size, cpu, buckets=5, batch_size=batch_size
    )
    return [*r.loss, *r.mse, r.mean_loss]  # 5 buckets' loss, 5 buckets' mse, the mean


def test_one_rank_equals_two_ranks_and_a_direct_computation(tmp_path):
    make_dataset(str(tmp_path / "val"), [4, 3])  # 7 clips: the second rank evaluates a padding clip
    one = _validate(str(tmp_path / "val"), batch_size=2)
    two = run_ranks(_validate, 2, (str(tmp_path / "val"), 2), tmp_path / "ranks")
    assert two[0] == two[1]  # every rank gets the result
    torch.testing.assert_close(torch.tensor(two[0]), torch.tensor(one), rtol=1e-6, atol=0)
    # direct: every (clip, timestep) pair alone, averaged in float64 here
    direct = _validate(str(tmp_path / "val"), batch_size=1)
    torch.testing.assert_close(torch.tensor(direct), torch.tensor(one), rtol=1e-5, atol=0)
    loss, mse = one[:5], one[5:10]
    assert all(a >= b > 0 for a, b in zip(loss, mse, strict=True))  # learn_sigma: loss = mse + vb


def _events(run_root: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (tb,) = run_root.glob("*/tensorboard")
    acc = EventAccumulator(str(tb))
    acc.Reload()
    return {k: [(e.step, e.value) for e in acc.Scalars(k)] for k in acc.Tags()["scalars"]}


@pytest.mark.slow
def test_training_with_validation_trains_identically_and_logs_the_checkpoints_value(tmp_path, capfd):
    """ZeRO-3 on 2 ranks (collective forwards, the consolidated EMA): on vs off give bitwise the same
    weights and losses; the logged EMA value at the last step equals a 1-rank evaluation of the EMA the
    checkpoint holds."""
    make_dataset(str(tmp_path / "data"), [16, 16])
    make_dataset(str(tmp_path / "val"), [5], seed=7)
    common = [f"data.index={tmp_path / 'data'}", "train.zero_stage=3", "train.micro_batch_size=4"]
    off = _run(tmp_path, "off", 2, common)
    val = [
        "data.val_index=" + str(tmp_path / "val"),
        "train.val_every=2",
        "train.val_clips=5",
        "train.val_buckets=4",
    ]
    on = _run(tmp_path, "on", 2, common + val)
    assert on["history"] == off["history"]
    for name, w in off["weights"].items():
        assert torch.equal(on["weights"][name], w), name
    out = capfd.readouterr().out
    assert "validation: 5 clips of" in out and out.count("val step") == 2
    events = _events(tmp_path / "on")
    assert [s for s, _ in events["val_ema/loss"]] == [2, 4]
    assert {"val_raw/loss", "val_raw/mse", "val_ema/loss_t125", "val_ema/loss_t875"} <= set(events)
    # the checkpoint's EMA, evaluated on 1 rank, gives the value the 2-rank run logged
    from latte.builders import build_diffusion, build_model
    from latte.conditioning import conditioning_of
    from latte.config import load_config
    from latte.precision import call_in

    cfg = load_config(TINY, ["model.class_dropout_prob=0.0"])
    model = build_model(cfg)
    (ema_file,) = (tmp_path / "on").glob("checkpoints/step_00000004/ema_consolidated.pt")
    model.load_state_dict(torch.load(ema_file, weights_only=True))
    vset = ValidationSet.read(str(tmp_path / "val"), clips=5)
    result = validation_loss(
        lambda x, t, **kw: call_in(model, torch.float32, x, t, **kw),
        build_diffusion(cfg),
        conditioning_of(cfg.model, None),
        vset,
        0,
        1,
        torch.device("cpu"),
        buckets=4,
        batch_size=4,
    )
    logged = events["val_ema/loss"][-1][1]  # (TensorBoard stores float32)
    assert abs(logged - result.mean_loss) <= 1e-6 * abs(result.mean_loss)


def test_text_to_video_validation_uses_the_captions_and_their_masks(tmp_path):
    """Captioned clips: the loss depends on the caption (no dropout in validation), and padding a caption
    further (another index's max length) does not change it: the mask hides the padding (the MSE term:
    with these exaggerated weights the VB term is huge)."""
    from data_pipeline.sources import expected_of
    from latte.builders import build_diffusion, build_model
    from latte.conditioning import conditioning_of
    from latte.config import load_config
    from latte.precision import call_in

    cfg = load_config(REPO / "configs" / "tiny_t2v.yaml", ["model.caption_dropout_prob=0.0"])
    make_dataset(str(tmp_path / "val"), [3], caption_width=32, classes=0)
    val = ValidationSet.read(str(tmp_path / "val"), clips=3, expected=expected_of(cfg))
    torch.manual_seed(2)
    model = build_model(cfg)
    for p in model.parameters():  # large enough that the caption matters
        p.data.add_(0.3 * torch.randn_like(p))
    conditioning = conditioning_of(cfg.model, None)

    def loss(vset):
        fn = lambda x, t, **kw: call_in(model, torch.float32, x, t, **kw)  # noqa: E731
        cpu = torch.device("cpu")
        return validation_loss(fn, build_diffusion(cfg), conditioning, vset, 0, 1, cpu, buckets=3).mse

    base = loss(val)
    longer = ValidationSet.read(str(tmp_path / "val"), clips=3, expected=expected_of(cfg))
    longer.facts = dataclasses.replace(longer.facts, max_caption_tokens=longer.facts.max_caption_tokens + 5)
    longer.spec = dataclasses.replace(longer.spec, facts=longer.facts)
    torch.testing.assert_close(torch.tensor(loss(longer)), torch.tensor(base), rtol=1e-6, atol=0)
    other = ValidationSet.read(str(tmp_path / "val"), clips=3, expected=expected_of(cfg))
    for s in other.samples:  # another caption per clip (before its batches are drawn): another loss
        s.values["encoder_hidden_states"] = -s.values["encoder_hidden_states"]
    changed = torch.tensor(loss(other))
    assert ((changed - torch.tensor(base)).abs() > 1e-4 * changed.abs()).all()  # (>> the 1e-6 above)


def test_a_validation_set_encoded_otherwise_is_one_line(tmp_path):
    make_dataset(str(tmp_path / "train"), [2])
    make_dataset(str(tmp_path / "val"), [2], scaling_factor=0.5)
    like = ValidationSet.read(str(tmp_path / "train"), clips=1).facts
    with pytest.raises(
        ValidationSetError, match=r"made with another scaling_factor than the training data: 0.5"
    ):
        ValidationSet.read(str(tmp_path / "val"), clips=2, like=like)
