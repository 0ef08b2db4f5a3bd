"""Exactly resumable checkpoints: kill -9 mid-run + `--resume auto` ends with the same bits as an unbroken
run (ZeRO-2 and ZeRO-3, 2 CPU ranks); the choice of checkpoint, pruning and config refusal on their own."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from dist import free_port

from latte.checkpoint import CheckpointError, choose, config_changes, prune, tag_for
from latte.config import load_config

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
STEPS, EVERY = 60, 5


# --------------------------------------------------------------------------------------------------------
# The directory rules, on hand-made checkpoint directories
# --------------------------------------------------------------------------------------------------------


def fake_checkpoint(ckpt_dir: Path, step: int, complete: bool = True) -> Path:
    """A step directory shaped like the manager's: a payload, meta.json and (when complete) COMPLETE."""
    step_dir = ckpt_dir / tag_for(step)
    step_dir.mkdir(parents=True)
    (step_dir / "rank_00000.pt").write_bytes(b"x" * 100)
    (step_dir / "meta.json").write_text(json.dumps({"step": step, "config": {}, "world_size": 1}))
    if complete:
        files = {p.name: p.stat().st_size for p in step_dir.iterdir()}
        (step_dir / "COMPLETE").write_text(json.dumps({"files": files}))
    return step_dir


def test_auto_never_takes_a_half_written_dir_and_falls_back_past_a_corrupt_one(tmp_path):
    ck = tmp_path / "ck"
    assert choose("auto", ck) is None  # nothing yet: start fresh
    for step in (10, 20, 30):
        fake_checkpoint(ck, step)
    fake_checkpoint(ck, 40, complete=False)  # the kill landed while step 40 was being written
    assert choose("auto", ck) == ck / tag_for(30)
    assert choose("none", ck) is None
    (ck / tag_for(30) / "rank_00000.pt").write_bytes(b"x" * 10)  # truncated
    (ck / tag_for(20) / "meta.json").unlink()
    warnings: list[str] = []
    assert choose("auto", ck, warn=warnings.append) == ck / tag_for(10)
    assert len(warnings) == 2 and "corrupt file" in warnings[0] and "missing file" in warnings[1], warnings
    with pytest.raises(CheckpointError, match=r"corrupt file .*step_00000030/rank_00000.pt: 10 bytes, 100"):
        choose(str(ck / tag_for(30)), ck)
    with pytest.raises(CheckpointError, match="incomplete"):
        choose(str(ck / tag_for(40)), ck)
    with pytest.raises(CheckpointError, match="missing file .*step_00000020/meta.json"):
        choose(str(ck / tag_for(20)), ck)
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        choose(str(tmp_path / "nope"), ck)
    (ck / tag_for(30) / "rank_00000.pt").write_bytes(b"x" * 100)
    assert choose(str(ck), tmp_path / "elsewhere") == ck / tag_for(30)  # a checkpoint dir: newest complete


def test_prune_keeps_the_newest_the_multiples_and_latest(tmp_path):
    ck = tmp_path / "ck"
    for step in range(1, 9):
        fake_checkpoint(ck, step)
    fake_checkpoint(ck, 0, complete=False)  # older than the newest complete one: removed
    fake_checkpoint(ck, 9, complete=False)  # newer: may still be being written, kept
    (ck / "latest").write_text(tag_for(2))
    prune(ck, keep_last=3, keep_every=4)
    assert sorted(p.name for p in ck.iterdir() if p.is_dir()) == [tag_for(s) for s in (2, 4, 6, 7, 8, 9)]
    prune(ck, keep_last=1, keep_every=None)
    assert sorted(p.name for p in ck.iterdir() if p.is_dir()) == [tag_for(s) for s in (2, 8, 9)]


def test_config_changes_name_the_keys_and_respect_the_allow_list():
    saved = load_config(TINY).to_dict()
    now = load_config(TINY, ["model.name=Latte-S/2", "train.max_steps=500", "train.log_every=7"])
    assert config_changes(saved, now) == ["model.name 'Latte-T/2' != 'Latte-S/2'"]
    now = load_config(TINY, ["train.lr=0.5", "train.resume_allow_changes=[train.lr]"])
    assert config_changes(saved, now) == []


# --------------------------------------------------------------------------------------------------------
# The real CLI on 2 ranks: an unbroken run vs one killed with SIGKILL and resumed
# --------------------------------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "SLURM_"))
    }
    return dict(env, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")


def _start(results: Path, overrides: list[str], *extra: str) -> subprocess.Popen:
    """``deepspeed --num_gpus 2 train.py`` in its own process group (launcher and ranks share it)."""
    cmd = [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        "2",
        "--master_port",
        str(free_port()),
        "train.py",
        "--config",
        str(TINY),
        *extra,
        "--set",
        f"train.results_dir={results}",
        f"train.max_steps={STEPS}",
        f"train.ckpt_every={EVERY}",
        f"train.log_every={EVERY}",
        *overrides,
    ]
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        env=_env(),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _one_process(results: Path, *overrides: str, resume: str = "auto") -> subprocess.CompletedProcess:
    """``python train.py --resume R`` (a world of one) on ``results``."""
    cmd = [
        sys.executable,
        "train.py",
        "--config",
        str(TINY),
        "--resume",
        resume,
        "--set",
        f"train.results_dir={results}",
        *overrides,
    ]
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)


def _finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-3000:]
    return out


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, "the run ended before the kill"
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.002)


def assert_same_bits(a, b, where: str = "") -> int:
    """Every tensor (bitwise) and every other leaf of two loaded checkpoint files equal; returns #tensors."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
        return 1
    if isinstance(a, np.ndarray):
        assert np.array_equal(a, b), where
        return 0
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        return sum(assert_same_bits(a[k], b[k], f"{where}/{k}") for k in a)
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        return sum(assert_same_bits(x, y, f"{where}[{i}]") for i, (x, y) in enumerate(zip(a, b, strict=True)))
    if hasattr(a, "__dict__") and not isinstance(a, type):  # e.g. DeepSpeed's loss scaler: its fields
        return assert_same_bits(vars(a), vars(b), where)
    assert a == b, f"{where}: {a!r} != {b!r}"
    return 0


def assert_same_checkpoint(a: Path, b: Path) -> int:
    """Two 2-rank step directories hold the same ``*.pt`` files (both optimizer shards, both rank files, the
    consolidated EMA) with the same bits; returns the number of tensors compared."""
    files = sorted(p.name for p in a.glob("*.pt"))
    assert files == sorted(p.name for p in b.glob("*.pt")) and "ema_consolidated.pt" in files
    assert len([f for f in files if "optim_states" in f]) == 2 and "rank_00001.pt" in files
    load = lambda path: torch.load(path, weights_only=False)  # noqa: E731
    tensors = sum(assert_same_bits(load(a / name), load(b / name), name) for name in files)
    assert tensors > 50
    return tensors


def _kill_9(proc: subprocess.Popen, ck: Path, after: int, during_save: bool) -> tuple[int, str]:
    """SIGKILL the whole job once checkpoint ``after`` is complete: at a random moment or inside a later save;
    returns the newest complete step left and the job's output."""
    _wait_for(lambda: (ck / tag_for(after) / "COMPLETE").exists(), proc)
    if during_save:  # the moment a later step dir exists but is not complete yet
        _wait_for(
            lambda: any(
                (ck / tag_for(s)).exists() and not (ck / tag_for(s) / "COMPLETE").exists()
                for s in range(after + EVERY, STEPS, EVERY)
            ),
            proc,
        )
    else:  # a random moment up to 1.5 s later, but before the next save starts, however fast this machine is
        deadline = time.monotonic() + random.uniform(0.0, 1.5)
        _wait_for(lambda: time.monotonic() >= deadline or (ck / tag_for(after + EVERY)).exists(), proc)
    os.killpg(proc.pid, signal.SIGKILL)
    out, _ = proc.communicate()
    complete = sorted(p.name for p in ck.glob("step_*") if (p / "COMPLETE").exists())
    if during_save:  # polled every 2 ms, a save takes far longer: the kill lands inside it
        assert any(not (p / "COMPLETE").exists() for p in ck.glob("step_*")), "the kill missed the save"
    assert tag_for(STEPS) not in complete, "the kill came too late to test anything"
    return int(complete[-1][5:]), out


@pytest.mark.slow
@pytest.mark.parametrize(
    "zero, precision, kill_during_save",
    [("2", "bf16", False), ("3", "bf16", True)],
)
def test_kill_9_and_resume_auto_gives_the_same_bits(tmp_path, zero, precision, kill_during_save):
    """Two kills per run (one at a random moment, one inside a save, in either order), each resumed. (fp32
    under ZeRO-2 and ZeRO-3: the text-to-video model's kill -9 tests, which share this machinery.)"""
    overrides = [f"train.zero_stage={zero}", f"train.precision={precision}"]
    unbroken = _start(tmp_path / "unbroken", overrides)
    broken = tmp_path / "broken"
    ck = broken / "checkpoints"
    first, _ = _kill_9(_start(broken, overrides), ck, 2 * EVERY, kill_during_save)
    newest, out = _kill_9(
        _start(broken, overrides, "--resume", "auto"), ck, first + EVERY, not kill_during_save
    )
    assert f"resumed from {ck / tag_for(first)} at step {first}" in out, out[-3000:]
    half = ck / tag_for(newest + EVERY)  # a half-written newer dir: never chosen, overwritten when reached
    half.mkdir(exist_ok=True)
    (half / "rank_00000.pt").write_bytes(b"garbage")
    out = _finish(_start(broken, overrides, "--resume", "auto"))
    assert f"resumed from {ck / tag_for(newest)} at step {newest}" in out, out[-3000:]
    _finish(unbroken)

    assert_same_checkpoint(tmp_path / "unbroken" / "checkpoints" / tag_for(STEPS), ck / tag_for(STEPS))
    assert (ck / "latest").read_text() == tag_for(STEPS)
    kept = sorted(p.name for p in ck.glob("step_*"))
    assert kept == [tag_for(s) for s in (STEPS - 2 * EVERY, STEPS - EVERY, STEPS)], kept  # keep_last 3

    # the same directory with another model: refused in one line naming the key, before any training
    refused = _one_process(broken, "model.name=Latte-S/2", *overrides)
    assert refused.returncode == 2
    assert refused.stderr.strip() == (
        f"error: checkpoint {tag_for(STEPS)} was made with a different config: model.name 'Latte-T/2' != "
        "'Latte-S/2' (allow with --set train.resume_allow_changes=[key,...])"
    ), refused.stderr


@pytest.mark.slow
def test_resume_none_starts_fresh_and_overwrites(tmp_path):
    short = ("train.max_steps=4", "train.ckpt_every=2", "train.log_every=2")
    first = _one_process(tmp_path, *short)
    assert first.returncode == 0 and "resumed" not in first.stdout, first.stderr[-2000:]
    ck = tmp_path / "checkpoints"
    fresh = _one_process(tmp_path, *short, resume="none")
    assert fresh.returncode == 0 and "resumed" not in fresh.stdout, fresh.stderr[-2000:]
    assert fresh.stdout.count("| loss") == 2  # steps 2 and 4 trained again
    assert (ck / "latest").read_text() == tag_for(4) and (ck / tag_for(4) / "COMPLETE").is_file()
    resumed = _one_process(tmp_path, "train.max_steps=6", *short[1:])
    assert f"resumed from {ck / tag_for(4)} at step 4" in resumed.stdout, resumed.stderr[-2000:]
    assert resumed.stdout.count("| loss") == 1


def two_ranks_then_one(tmp_path: Path, same: list[str]) -> tuple[Path, Path]:
    """A 2-rank run (micro-batch 4) of 20 steps, and its step-10 checkpoint resumed on 1 rank with the same
    global batch (universal conversion, EMA re-sharded). Checks that the 1-rank run follows the 2-rank one to
    fp32 rounding (module and EMA) and that Adam's count goes on; returns both checkpoint directories."""
    two = _finish(_start(tmp_path / "two", [*same, "train.micro_batch_size=4"]))
    assert "step      20" in two, two[-3000:]
    ck2, ck1 = tmp_path / "two" / "checkpoints", tmp_path / "one" / "checkpoints"
    ck1.mkdir(parents=True)
    shutil.copytree(ck2 / tag_for(10), ck1 / tag_for(10))
    one = _one_process(
        tmp_path / "one",
        *same,
        "train.micro_batch_size=8",  # the same global batch
        "train.resume_allow_changes=[train.micro_batch_size]",
    )
    assert one.returncode == 0, one.stderr[-3000:]
    assert f"resumed from {ck1 / tag_for(10)} at step 10 (saved by 2 ranks, resharded)" in one.stdout
    assert "step      20" in one.stdout and "step      10 |" not in one.stdout  # continued, not restarted
    load = lambda d, name: torch.load(d / tag_for(20) / name, weights_only=False)  # noqa: E731
    for name, key in [("mp_rank_00_model_states.pt", "module"), ("ema_consolidated.pt", None)]:
        a, b = load(ck2, name), load(ck1, name)
        a, b = (a[key], b[key]) if key else (a, b)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=f"{name} {k}")
    moments = load(ck1, "zero_pp_rank_0_mp_rank_00_optim_states.pt")["optimizer_state_dict"]
    assert moments["base_optimizer_state"]["state"][0]["step"] == 20  # Adam's count went on from 10
    return ck2, ck1


@pytest.mark.slow
def test_world_size_change_2_to_1_and_export(tmp_path):
    """A 2-rank checkpoint resumed on 1 rank (universal conversion, EMA re-sharded) follows the 2-rank run to
    fp32 rounding; then `python -m latte.export` writes weights that load strictly into the model."""
    same = ["model.class_dropout_prob=0.0", "train.max_steps=20", "train.ckpt_every=10", "train.log_every=10"]
    ck2, ck1 = two_ranks_then_one(tmp_path, same)
    load = lambda d, name: torch.load(d / tag_for(20) / name, weights_only=False)  # noqa: E731

    from latte.builders import build_model
    from latte.export import main as export_main

    model = build_model(load_config(TINY, same))  # no dropout: no extra "null class" embedding row
    assert export_main([str(ck2), str(tmp_path / "w.pt")]) == 0
    exported = torch.load(tmp_path / "w.pt", weights_only=True)
    model.load_state_dict(exported["model"], strict=True)
    model.load_state_dict(exported["ema"], strict=True)
    for k, v in load(ck2, "mp_rank_00_model_states.pt")["module"].items():
        assert torch.equal(exported["model"][k], v), k  # ZeRO-2 fp32: the module holds the full weights
    assert export_main([str(ck2 / tag_for(10)), str(tmp_path / "e.safetensors"), "--ema-only"]) == 0
    from safetensors.torch import load_file

    ema = load_file(tmp_path / "e.safetensors")
    model.load_state_dict(ema, strict=True)
    saved = torch.load(ck2 / tag_for(10) / "ema_consolidated.pt")
    assert ema.keys() == saved.keys() and all(torch.equal(ema[k], v) for k, v in saved.items())
    assert export_main([str(ck2), "--step", "30", str(tmp_path / "x.pt")]) == 2


@pytest.mark.slow
def test_sigusr1_to_one_rank_stops_all_at_one_step_with_a_checkpoint_and_resume_is_exact(tmp_path):
    """SLURM's warning signal reaches one rank: every rank stops at the same step boundary, a checkpoint is
    written there (not on the ckpt_every grid), the job exits 3; the resumed run ends bit-equal. Trained on
    real shards streamed by 2 loader workers per rank, so the loader's position is resumed exactly too."""
    import psutil
    from make_shards import make_dataset

    make_dataset(str(tmp_path / "data"), [20] * 6)  # 120 samples: the 60 steps x 16 run 8 epochs
    data = f"data.index={tmp_path / 'data' / 'index.json'}"
    overrides = [
        "train.zero_stage=3",
        "train.ckpt_every=1000",
        data,
        "data.num_workers=2",
        "data.shuffle_buffer=16",
    ]
    unbroken = _start(tmp_path / "unbroken", overrides)
    broken = tmp_path / "broken"
    stopped = _start(broken, overrides)
    _wait_for(lambda: any(broken.glob("*/config.yaml")), stopped)  # the run dir: the engine is built
    time.sleep(random.uniform(0.5, 2.0))
    (launch,) = psutil.Process(stopped.pid).children()  # runner -> launch -> ranks -> loader workers
    ranks = {int(p.cmdline()[3].split("=")[1]): p for p in launch.children()}  # --local_rank=R
    workers = ranks[1].children()
    assert sorted(ranks) == [0, 1] and len(workers) == 2, [p.cmdline() for p in ranks.values()]
    for process in (ranks[1], workers[0]):  # as `scancel -s USR1` does: every process of the step
        process.send_signal(signal.SIGUSR1)
    out, _ = stopped.communicate(timeout=240)
    assert stopped.returncode == 3, out[-3000:]
    ck = broken / "checkpoints"
    (tag,) = [p.name for p in ck.glob("step_*")]
    step = int(tag[5:])
    assert 0 < step < STEPS and (ck / "latest").read_text() == tag and (ck / tag / "COMPLETE").is_file()
    assert step % 5 == 0  # the ranks agree on stop signals every train.stop_check_every (tiny.yaml: 5) steps
    assert "received SIGUSR1: stopping at the next step boundary with a checkpoint" in out, out[-3000:]
    assert (
        f"(received SIGUSR1; exit 3: requeue, the next run resumes with train.resume=auto); checkpoint "
        f"written at step {step}" in out
    ), out[-3000:]
    out = _finish(_start(broken, overrides))
    assert f"resumed from {ck / tag} at step {step}" in out, out[-3000:]
    (run_dir,) = [p for p in broken.iterdir() if p.name not in ("checkpoints", "data")]
    assert f"run dir {run_dir} |" in out  # the resumed run logs on in the same directory (TensorBoard)
    _finish(unbroken)
    assert_same_checkpoint(tmp_path / "unbroken" / "checkpoints" / tag_for(STEPS), ck / tag_for(STEPS))


@pytest.mark.slow
def test_world_size_change_1_to_2_under_zero_3(tmp_path):
    """A 1-rank ZeRO-3 checkpoint resumed on 2 ranks (universal conversion, EMA re-sharded, the synthetic
    stream re-split at the step boundary): training continues from the step, on the same data, and follows
    the 1-rank run to fp32 rounding."""
    same = ["model.class_dropout_prob=0.0", "train.zero_stage=3", "train.ckpt_every=10", "train.log_every=10"]
    one = _one_process(tmp_path / "one", *same, "train.max_steps=20", "train.micro_batch_size=8")
    assert one.returncode == 0, one.stderr[-3000:]
    ck1, ck2 = tmp_path / "one" / "checkpoints", tmp_path / "two" / "checkpoints"
    ck2.mkdir(parents=True)
    shutil.copytree(ck1 / tag_for(10), ck2 / tag_for(10))
    allow = "train.resume_allow_changes=[train.micro_batch_size]"
    two = _finish(
        _start(tmp_path / "two", [*same, "train.max_steps=20", "train.micro_batch_size=4", allow])
    )  # same global batch
    assert f"resumed from {ck2 / tag_for(10)} at step 10 (saved by 1 ranks, resharded)" in two, two[-3000:]
    assert "step      20" in two and "step      10 |" not in two  # continued, not restarted
    assert sorted(p.name for p in (ck2 / tag_for(20)).glob("rank_*.pt")) == ["rank_00000.pt", "rank_00001.pt"]
    assert not (ck2 / "latest_universal").exists()  # DeepSpeed's converter's pointer is removed
    a = torch.load(ck1 / tag_for(20) / "ema_consolidated.pt", weights_only=True)
    b = torch.load(ck2 / tag_for(20) / "ema_consolidated.pt", weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=k)
    data = torch.load(ck2 / tag_for(20) / "rank_00001.pt", weights_only=False)["data"]
    assert data["step"] == 20 and data["micro"] == 0
