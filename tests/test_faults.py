"""Faults a real user meets (issue 13), training and sampling side: no run silently loses another's work,
every stop leaves a checkpoint and says so, every mistake is one line.

Each test reproduces what a user did (two runs into one directory, ``kill`` of the launcher, Ctrl-C, a
full disk, a flipped byte in a checkpoint, a moved dataset index, ...) and checks what the user now sees.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from test_checkpoint import TINY, _env, _finish, _one_process, _start, _wait_for

from latte import run_lock
from latte.checkpoint import tag_for
from latte.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
SMALL = ["model.depth=2", "model.hidden_size=32", "model.num_heads=2"]  # checkpoints of ~1.3 MB


def _train(results: Path, *overrides: str, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "train.py",
        "--config",
        str(TINY),
        "--set",
        f"train.results_dir={results}",
        *overrides,
    ]
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)


def _error_line(out: subprocess.CompletedProcess) -> str:
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, out.stderr[-3000:]
    return errors[0]


def _ranks_of(results: Path) -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["cmdline"]) if str(results) in " ".join(p.info["cmdline"] or [])]


# --------------------------------------------------------------------------------------------------------
# 1. One run per checkpoint directory
# --------------------------------------------------------------------------------------------------------


def test_a_second_run_into_the_same_results_dir_stops_naming_the_holder(tmp_path):
    """Before: both runs exited 0 and every checkpoint held the second run's weights."""
    first = subprocess.Popen(
        [
            sys.executable,
            "train.py",
            "--config",
            str(TINY),
            "--set",
            f"train.results_dir={tmp_path}",
            "train.max_steps=100000",
            "train.ckpt_every=1000000",
        ],
        cwd=REPO,
        env=_env(),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        lock = tmp_path / "checkpoints" / run_lock.LOCK_NAME
        _wait_for(lock.exists, first)
        holder = json.loads(lock.read_text())
        second = _train(tmp_path, "train.max_steps=4")
        assert second.returncode == 2, second.stderr[-3000:]
        line = _error_line(second)
        assert line.startswith(
            f"error: checkpoint directory {tmp_path / 'checkpoints'} is in use by another "
            f"run (host {holder['host']} pid {first.pid}, last seen"
        )
        assert "run dir" not in second.stdout  # stopped before building anything
    finally:
        first.send_signal(signal.SIGTERM)
        out, _ = first.communicate(timeout=120)
    assert first.returncode == 3, out[-3000:]
    assert not lock.exists()  # released by the stop: the next run may go
    assert _train(tmp_path, "train.max_steps=4", "train.resume=none").returncode == 0


def _holder(**changes) -> run_lock.Holder:
    holder = run_lock.me()
    for key, value in changes.items():
        setattr(holder, key, value)
    return holder


def test_who_may_take_a_lock_over():
    mine, now = run_lock.me(), time.time()
    assert run_lock.takeover_reason(_holder(token="x"), mine, now) is None  # this very process: alive
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert "is gone" in run_lock.takeover_reason(_holder(pid=dead.pid, started=None), mine, now)
    reused = _holder(started=(mine.started or 0) + 1)  # the pid now names a process started later
    assert "is gone" in run_lock.takeover_reason(reused, mine, now)
    job = _holder(host="other", slurm_job="77")
    assert run_lock.takeover_reason(job, _holder(slurm_job="77"), now).startswith("the same SLURM job 77")
    fresh = _holder(host="other", heartbeat=now - 60)
    assert run_lock.takeover_reason(fresh, mine, now) is None
    stale = _holder(host="other", heartbeat=now - run_lock.STALE_S - 1)
    assert "no heartbeat from other" in run_lock.takeover_reason(stale, mine, now)


def test_lock_heartbeat_and_release(tmp_path):
    lock = run_lock.RunLock(tmp_path, heartbeat_s=0.05)
    lock.acquire()
    first = json.loads(lock.path.read_text())["heartbeat"]
    time.sleep(0.3)
    assert json.loads(lock.path.read_text())["heartbeat"] > first
    other = run_lock.RunLock(tmp_path)
    with pytest.raises(run_lock.LockError, match="is in use by another run"):
        other.acquire()
    lock.release()
    assert not lock.path.exists()
    other.acquire()  # free again
    other.release()


# --------------------------------------------------------------------------------------------------------
# 2. Stopping a deepspeed job the usual ways leaves a checkpoint, and says so last
# --------------------------------------------------------------------------------------------------------


def _stopped_cleanly(results: Path, out: str) -> int:
    ck = results / "checkpoints"
    latest = (ck / "latest").read_text()
    step = int(latest[5:])
    assert (ck / latest / "COMPLETE").is_file() and step % 5 == 0  # agreed at a stop_check_every step
    assert f"; checkpoint written at step {step}" in out, out[-3000:]
    assert 'File "' + str(REPO / "train.py") not in out, out[-3000:]  # no traceback through the ranks
    deadline = time.monotonic() + 60
    while _ranks_of(results) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _ranks_of(results) == [], "ranks left training as orphans"
    return step


def _training(results: Path) -> subprocess.Popen:
    """``deepspeed --num_gpus 2 train.py`` that would run for hours, once its ranks are training."""
    proc = _start(results, ["train.max_steps=100000", "train.ckpt_every=100000", "train.log_every=10"])
    _wait_for(lambda: any(results.glob("*/config.yaml")), proc)
    time.sleep(1.0)
    return proc


@pytest.mark.slow
def test_sigterm_to_the_deepspeed_launcher_stops_its_orphaned_ranks_with_a_checkpoint(tmp_path):
    """Before: the runner exited 143 at once and its ranks trained on as orphans, with no checkpoint."""
    results = tmp_path / "run"
    proc = _training(results)
    proc.send_signal(signal.SIGTERM)  # the runner's pid only, as `timeout` and most schedulers do
    out, _ = proc.communicate(timeout=240)  # EOF once the ranks (which share its stdout) are gone
    assert "the launcher of this rank (pid" in out and "exited" in out, out[-3000:]
    _stopped_cleanly(results, out)


@pytest.mark.slow
def test_ctrl_c_stops_like_sigterm_with_a_checkpoint(tmp_path):
    """Before: three KeyboardInterrupt tracebacks and no checkpoint."""
    results = tmp_path / "run"
    proc = _training(results)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: every process of the job
    out, _ = proc.communicate(timeout=240)
    assert "received SIGINT" in out, out[-3000:]
    _stopped_cleanly(results, out)


# --------------------------------------------------------------------------------------------------------
# 3-6. Checkpoint directory problems: unwritable, corrupted in place, full
# --------------------------------------------------------------------------------------------------------


def test_an_unwritable_checkpoint_dir_fails_before_anything_is_built(tmp_path):
    """Before: found at the first save, hours in (exit 1, which SLURM requeues)."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    out = _train(tmp_path / "run", f"train.ckpt_dir={blocker / 'ckpt'}")
    assert out.returncode == 2
    assert _error_line(out) == f"error: train.ckpt_dir {blocker / 'ckpt'} is not writable: Not a directory"
    assert "run dir" not in out.stdout


@pytest.mark.slow
def test_a_checkpoint_corrupted_in_place_is_skipped_by_every_rank(tmp_path):
    """A byte flipped in place (same size): before, resume=auto died with a traceback on every requeue."""
    results = tmp_path / "run"
    _finish(_start(results, ["train.max_steps=10", "train.ckpt_every=5"]))
    ck = results / "checkpoints"
    shard = ck / tag_for(10) / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    out = _finish(_start(results, ["train.max_steps=12", "train.ckpt_every=5"]))
    assert f"warning: skipping checkpoint step_00000010: corrupt file {shard}: its CRC-32 differs" in out
    assert f"resumed from {ck / tag_for(5)} at step 5" in out, out[-3000:]
    assert (ck / "latest").read_text() == tag_for(12)


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    return done.returncode == 0


def test_a_full_disk_is_one_line_and_the_last_checkpoint_survives(tmp_path):
    """Before: 'basic_ios::clear: iostream error' and a traceback. A 2 MiB file system holds one ~1.3 MB
    checkpoint of this model, not two."""
    ck = tmp_path / "small_disk"
    if os.geteuid() != 0 or not _mount_tmpfs(ck, "2m"):
        pytest.skip("mounting a small tmpfs needs root")
    try:
        out = _train(
            tmp_path / "run",
            f"train.ckpt_dir={ck}",
            "train.max_steps=4",
            "train.ckpt_every=2",
            "train.keep_last=2",
            *SMALL,
        )
        assert out.returncode == 2, out.stderr[-3000:]
        line = _error_line(out)
        assert line.startswith(f"error: no space left on {ck} while writing checkpoint step_00000004 (")
        assert "nothing was lost (latest is still step_00000002)" in line and "train.keep_last (2" in line
        assert "Traceback" not in out.stderr
        assert (ck / "latest").read_text() == tag_for(2) and (ck / tag_for(2) / "COMPLETE").is_file()
        assert not (ck / tag_for(4)).exists()  # the half-written step is gone (its space freed)
    finally:
        subprocess.run(["umount", str(ck)], check=False)


# --------------------------------------------------------------------------------------------------------
# 10-12 and NaN: one line where a traceback (or silence) was
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lr=nan", "train.lr must be a finite number, got nan"),
        ("train.lr=inf", "train.lr must be a finite number, got inf"),
        ("train.seed=-1", "train.seed must be in [0, 2**32) (numpy's seed range), got -1"),
        ("train.seed=4294967296", "train.seed must be in [0, 2**32)"),
        ("train.weight_decay=-1", "train.weight_decay must be >= 0, got -1.0"),
        ("train.warmup_steps=-5", "train.warmup_steps must be >= 0, got -5"),
        ("train.clip_max_norm=-1", "train.clip_max_norm must be >= 0, got -1.0"),
    ],
)
def test_impossible_values_are_one_line(override, message):
    with pytest.raises(ConfigError) as caught:
        load_config(TINY, [override])
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


def test_a_bad_deepspeed_json_is_one_line(tmp_path):
    listed, unknown = tmp_path / "list.json", tmp_path / "unknown.json"
    listed.write_text("[1, 2]")
    unknown.write_text(json.dumps({"zero_optimization": {"stage": 2, "bucket_sizee": 1}}))
    out = _train(tmp_path / "a", f"train.zero_stage={listed}")
    assert _error_line(out) == f"error: DeepSpeed config '{listed}' must be a JSON object, got a list"
    out = _train(tmp_path / "b", f"train.zero_stage={unknown}")
    assert out.returncode == 2
    assert (
        _error_line(out)
        == f"error: DeepSpeed config '{unknown}': bucket_sizee: Extra inputs are not permitted"
    )


def test_resuming_another_model_size_is_refused_before_deepspeed_asserts(tmp_path):
    assert _one_process(tmp_path, "train.max_steps=2", "train.ckpt_every=2").returncode == 0
    out = _one_process(
        tmp_path, "train.max_steps=4", "model.name=Latte-S/2", "train.resume_allow_changes=[model.name]"
    )
    assert out.returncode == 2
    line = _error_line(out)
    assert line.startswith("error: checkpoint step_00000002 holds another architecture (")
    assert "start fresh (train.resume=none, or another train.ckpt_dir)" in line


def test_resuming_past_max_steps_says_so(tmp_path):
    """Before: "resumed at step 4" and exit 0 having done nothing, silently."""
    assert _one_process(tmp_path, "train.max_steps=4", "train.ckpt_every=2", *SMALL).returncode == 0
    out = _one_process(tmp_path, "train.max_steps=2", *SMALL)
    assert out.returncode == 0
    assert out.stdout.strip().splitlines()[-1] == (
        "nothing to train: the run is already at step 4, train.max_steps is 2 (raise train.max_steps to "
        "continue it)"
    )


def test_a_diverged_loss_stops_without_a_checkpoint(tmp_path):
    """NaN/inf: noticed where the loss is reduced (log_every, or a due checkpoint), no checkpoint written."""
    common = ["train.ckpt_every=5", "train.log_every=10", "train.clip_max_norm=0", *SMALL]
    assert _one_process(tmp_path, "train.max_steps=5", *common).returncode == 0
    diverging = ["train.max_steps=20", "train.lr=1e8", "train.resume_allow_changes=[train.lr]"]
    out = _one_process(tmp_path, *diverging, *common)
    assert out.returncode == 2, out.stderr[-3000:]
    line = _error_line(out)
    assert (
        line.startswith("error: the loss is ")
        and " in steps 6-10: stopped without writing a checkpoint" in line
    )
    assert "(latest stays step_00000005)" in line
    ck = tmp_path / "checkpoints"
    assert (ck / "latest").read_text() == tag_for(5) and not (ck / tag_for(10)).exists()


# --------------------------------------------------------------------------------------------------------
# 5. Sampling divides by the factor the model was trained with, never a guess
# --------------------------------------------------------------------------------------------------------


def test_sampling_uses_the_recorded_scaling_factor_and_never_guesses(tmp_path, capsys):
    """Before: with the dataset index moved, sampling warned and used the VAE config's factor (exit 0)."""
    from make_shards import make_dataset

    from data_pipeline.toy_videos import make_tiny_vae
    from latte.export import main as export_main
    from latte.sample import main as sample_main

    make_dataset(str(tmp_path / "data"), [20, 20], scaling_factor=0.5)
    index = tmp_path / "data" / "index.json"
    run = _one_process(tmp_path / "run", f"data.index={index}", "train.max_steps=2", "train.ckpt_every=2")
    assert run.returncode == 0, run.stderr[-3000:]
    ck = tmp_path / "run" / "checkpoints"
    meta = json.loads((ck / tag_for(2) / "meta.json").read_text())
    assert meta["dataset"] == {"index": str(index), "vae": "toy-vae", "scaling_factor": 0.5}
    index.rename(tmp_path / "moved.json")  # the dataset moved (or its S3 secret is wrong)
    vae = make_tiny_vae(tmp_path / "vae", downsample=8)
    common = ["--num-samples", "1", "--steps", "ddim2", "--no-progress", "--vae", str(vae)]
    capsys.readouterr()
    assert sample_main([str(ck), "--out", str(tmp_path / "a"), *common]) == 0
    assert "scaling factor 0.5 from the checkpoint's meta.json" in capsys.readouterr().out
    assert export_main([str(ck), str(tmp_path / "w.pt")]) == 0  # weights alone: no record of the factor
    (config,) = (tmp_path / "run").glob("*/config.yaml")
    capsys.readouterr()
    args = [str(tmp_path / "w.pt"), "--config", str(config), "--out", str(tmp_path / "b"), *common]
    assert sample_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("error: the latents' scaling factor is unknown: the dataset index ")
        and "\n" not in err
    )
    assert "pass --set data.scaling_factor=F" in err and not (tmp_path / "b").exists()
    assert sample_main([*args, "--set", "data.scaling_factor=0.5"]) == 0  # the user says which


def test_a_dataset_whose_every_sample_is_corrupt_is_one_line(tmp_path):
    """Before: a traceback ("no shard has readable samples"). An unreachable store stays exit 1 (requeued)."""
    from make_shards import make_dataset

    make_dataset(str(tmp_path / "data"), [10, 10], corrupt=range(20))
    out = _train(tmp_path / "run", f"data.index={tmp_path / 'data' / 'index.json'}", "train.max_steps=2")
    assert out.returncode == 2, out.stderr[-3000:]
    line = _error_line(out)
    assert line.startswith(f"error: dataset '{tmp_path / 'data' / 'index.json'}' has no readable samples")
    assert "Traceback" not in out.stderr
