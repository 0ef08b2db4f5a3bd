"""launch/slurm/*.sh against a real one-node SLURM cluster (tests/slurm_cluster.py, CPU tasks only).

Checked: `sbatch train.sh CONFIG --set ...` runs 2 ranks to the end and logs the job facts; USR1 to the batch
shell (what SLURM sends before a time limit) makes the ranks checkpoint and exit 3, the script requeues, the
rerun resumes and ends with the same bits as an unbroken run, leaving no process behind (these two jobs
train the text-to-video model on captioned shards; the class-conditional model's stop on SIGUSR1 is
tests/test_checkpoint.py's); a config error
fails at once without a requeue, a crash is requeued only LATTE_MAX_RESTARTS times, a scancel checkpoints
and stays cancelled; the sharding array (2 tasks, killed once and resubmitted) and its index job give the
samples one local task gives.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
from make_shards import make_dataset
from slurm_cluster import FINAL_STATES
from test_checkpoint import _env, assert_same_checkpoint
from test_shard_latents import OPTIONS, VIDEOS, read_samples

from data_pipeline.index import load_index
from latte.checkpoint import tag_for

pytestmark = pytest.mark.slow  # a real slurmctld + slurmd, whole jobs

REPO = Path(__file__).resolve().parents[1]
TRAIN_SH, SHARD_SH = REPO / "launch/slurm/train.sh", REPO / "launch/slurm/shard.sh"
TINY = REPO / "configs" / "tiny.yaml"
TINY_T2V = REPO / "configs" / "tiny_t2v.yaml"
CPU = ["--gpus-per-node=0", "--cpus-per-task=1"]  # the scripts' GPU-node defaults, overridden on the line
TWO_RANKS = [*CPU, "--nodes=1", "--ntasks-per-node=2"]
STEPS, LOG_EVERY, CKPT_EVERY, SIGNAL_AT = 160, 10, 50, 20
TRAIN_USAGE = "usage: sbatch [sbatch options] launch/slurm/train.sh CONFIG.yaml [--set key=value ...]"


def job_env(**extra: str) -> dict[str, str]:
    """What the tests submit with (sbatch exports it to the job): CPU ranks, this interpreter."""
    return {**_env(), "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1", **extra}


def train_args(results: Path, *overrides: str, config: Path = TINY) -> list[str]:
    return [
        str(TRAIN_SH),
        str(config),
        "--set",
        f"train.results_dir={results}",
        f"train.max_steps={STEPS}",
        f"train.log_every={LOG_EVERY}",
        f"train.ckpt_every={CKPT_EVERY}",
        *overrides,
    ]


def wait_for_log(slurm, job: int, text: str, timeout: float = 150.0) -> str:
    """The job's log once it holds ``text`` (fails with the log's tail if the job ends first)."""
    ended = lambda: (slurm.job(job) or {}).get("JobState") in FINAL_STATES  # noqa: E731
    slurm.wait_for(lambda: text in slurm.log(job) or ended(), f"'{text}' in job {job}'s log", timeout)
    log = slurm.log(job)
    assert text in log, log[-3000:]
    return log


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that contain ``text`` (e.g. a test's temporary directory)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{proc.name}: {cmdline}")
    return found


# --------------------------------------------------------------------------------------------------------
# train.sh: two identical 2-rank jobs side by side, one of them preempted
# --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def train_jobs(slurm, tmp_path_factory) -> dict:
    """Submits "unbroken" and "preempted" (the same text-to-video config, on captioned shards) from a
    directory with logs/, and sends the batch shell of "preempted" USR1 (``scancel -b -s USR1``, as SLURM's
    ``--signal=B:USR1@180`` does) once its log shows step SIGNAL_AT of STEPS."""
    root = tmp_path_factory.mktemp("slurm-train")
    (root / "logs").mkdir()
    make_dataset(str(root / "data"), [20] * 6, caption_width=32, classes=0)  # 1..8 tokens: padded
    data = [f"data.index={root / 'data'}", "data.shuffle_buffer=16"]
    jobs = {
        name: slurm.sbatch(
            [*TWO_RANKS, *train_args(root / name, *data, config=TINY_T2V)], cwd=root, env=job_env()
        )
        for name in ("unbroken", "preempted")
    }
    wait_for_log(slurm, jobs["preempted"], f"step {SIGNAL_AT:7d} |")
    slurm.run(["scancel", "-b", "-s", "USR1", str(jobs["preempted"])])
    return {"root": root, **jobs}


def test_two_cpu_ranks_run_to_completion(slurm, train_jobs):
    job, root = train_jobs["unbroken"], train_jobs["root"]
    info = slurm.wait(job)
    log = slurm.log(job)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "0"), log[-3000:]
    assert info["StdOut"] == str(root / "logs" / f"latte-{job}.out")  # the script's default log path
    assert f"[latte] job {job} (latte) restart 0, started " in log
    facts = "[latte] nodes 1 (localhost), tasks 2, CPUs per task 1, GPUs per node 0; rendezvous localhost:"
    assert facts in log
    assert f"[latte] config {TINY_T2V}; train.py args: --set train.results_dir={root / 'unbroken'} " in log
    assert f"[latte] python {sys.executable}; repository {REPO}; working directory {root}" in log
    assert (
        "LatteT2V-T/2 0.29M params | 2 x cpu |" in log and f"step {STEPS:7d} |" in log
    )  # 2 ranks, to the end
    assert log.rstrip().endswith("[latte] training finished")
    ck = root / "unbroken" / "checkpoints"
    assert (ck / "latest").read_text() == tag_for(STEPS) and (ck / tag_for(STEPS) / "COMPLETE").is_file()


def test_preemption_checkpoints_requeues_and_resumes_to_the_same_bits(slurm, train_jobs):
    job, root = train_jobs["preempted"], train_jobs["root"]
    info = slurm.wait(job)
    log = slurm.log(job)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), log[-3000:]
    assert "[latte] got SIGUSR1: asking the ranks to checkpoint and exit" in log
    stopped = re.search(r"; checkpoint written at step (\d+)", log)
    assert stopped, log[-3000:]
    step = int(stopped.group(1))
    assert SIGNAL_AT <= step < STEPS
    ck = root / "preempted" / "checkpoints"
    assert "[latte] preempted: the ranks saved a checkpoint; requeueing job" in log
    assert f"[latte] job {job} (latte) restart 1, started " in log
    assert f"resumed from {ck / tag_for(step)} at step {step}" in log  # the preemption's own checkpoint
    assert log.count("[latte] training finished") == 1 and log.count("restart 1,") == 1

    assert slurm.wait(train_jobs["unbroken"])["JobState"] == "COMPLETED"
    assert_same_checkpoint(root / "unbroken" / "checkpoints" / tag_for(STEPS), ck / tag_for(STEPS))
    assert processes_mentioning(str(root)) == []  # no rank, srun or batch shell left behind


# --------------------------------------------------------------------------------------------------------
# train.sh: what must not be requeued (forever)
# --------------------------------------------------------------------------------------------------------


def test_config_error_crash_and_scancel_end_without_a_requeue_loop(slurm, tmp_path):
    (tmp_path / "logs").mkdir()
    crashing = tmp_path / "crashing-python"  # stands in for an interpreter whose every rank crashes
    crashing.write_text("#!/bin/sh\necho 'rank crashed' >&2\nexit 1\n")
    crashing.chmod(0o755)
    one_task = [*CPU, "--ntasks-per-node=1"]
    long_run = train_args(tmp_path / "cancelled", "train.max_steps=100000", "train.ckpt_every=100000")
    cancelled = slurm.sbatch([*TWO_RANKS, *long_run], tmp_path, job_env())
    bad = slurm.sbatch([*TWO_RANKS, *train_args(tmp_path / "bad", "train.lrr=1")], tmp_path, job_env())
    usage = slurm.sbatch([*one_task, str(TRAIN_SH)], cwd=tmp_path, env=job_env())
    crash = slurm.sbatch(
        [*one_task, str(TRAIN_SH), str(TINY)],
        cwd=tmp_path,
        env=job_env(PYTHON=str(crashing), LATTE_MAX_RESTARTS="1"),
    )

    info, log = slurm.wait(bad), slurm.log(bad)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("FAILED", "2:0", "0"), log[-3000:]
    assert "error: unknown config key 'train.lrr' (did you mean 'train.lr'?)" in log
    assert "[latte] error: configuration error (the error: line above); not requeued" in log
    minutes, seconds = map(int, info["RunTime"].split(":")[-2:])
    assert minutes * 60 + seconds < 30, info["RunTime"]  # before any rendezvous or model build

    info, log = slurm.wait(usage), slurm.log(usage)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("FAILED", "2:0", "0"), log
    assert log.strip() == TRAIN_USAGE  # no config argument: one line, before anything runs

    info, log = slurm.wait(crash), slurm.log(crash)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("FAILED", "1:0", "1"), log[-3000:]
    assert "[latte] crashed (exit code 1), restart 1 of at most 1; requeueing job" in log
    assert "[latte] error: crashed (exit code 1) after 1 restarts (LATTE_MAX_RESTARTS=1); not requeued" in log
    assert log.count("rank crashed") == 2

    # a user's scancel (SIGTERM to every process of the job): the ranks checkpoint, the job stays cancelled
    wait_for_log(slurm, cancelled, f"step {LOG_EVERY:7d} |")
    slurm.run(["scancel", str(cancelled)])
    info, log = slurm.wait(cancelled), slurm.log(cancelled)
    assert (info["JobState"], info["Restarts"]) == ("CANCELLED", "0"), log[-3000:]
    stopped = re.search(r"; checkpoint written at step (\d+)", log)
    assert stopped and "[latte] SLURM is ending this job (SIGTERM: scancel" in log, log[-3000:]
    ck = tmp_path / "cancelled" / "checkpoints"
    assert (ck / "latest").read_text() == tag_for(int(stopped.group(1)))
    assert "restart 1" not in log and processes_mentioning(str(tmp_path)) == []


# --------------------------------------------------------------------------------------------------------
# shard.sh: the array job and its index job
# --------------------------------------------------------------------------------------------------------


def test_shard_array_killed_then_resubmitted_equals_one_local_task(slurm, tmp_path):
    from data_pipeline.shard_latents import main as shard_latents
    from data_pipeline.toy_videos import make_corrupt_video, make_tiny_vae, make_video

    videos, vae, out, local = tmp_path / "videos", tmp_path / "vae", tmp_path / "out", tmp_path / "local"
    for seed, (rel, (frames, size)) in enumerate(VIDEOS.items()):
        make_video(videos / rel, frames, size, seed=seed)
    make_corrupt_video(videos / "c" / "corrupt.mp4")
    make_tiny_vae(vae)
    (tmp_path / "logs").mkdir()
    args = [*CPU, "--array=0-1", str(SHARD_SH), str(videos), str(out), "--vae", str(vae), *OPTIONS]

    def run_array(**extra_env: str) -> tuple[list[dict], str, int]:
        """Submit the array, wait for its tasks; (their records, task 0's log, the index job's id)."""
        array = slurm.sbatch(args, cwd=tmp_path, env=job_env(**extra_env))
        slurm.wait(array)
        tasks = slurm.jobs(array)
        first_log = (tmp_path / "logs" / f"latte-shard-{array}_0.out").read_text()
        index_job = re.search(r"\[latte\] index job (\d+) runs once every task of array", first_log)
        assert len(tasks) == 2 and index_job, first_log
        return tasks, first_log, int(index_job.group(1))

    # the first submission's task 1 is killed 9 samples in (inside its second shard): the index job is
    # cancelled with it, no index is written, and the resubmitted array redoes only what is missing
    tasks, _, index_job = run_array(LATTE_SHARD_KILL_AFTER_SAMPLES="9")
    assert sorted(t["JobState"] for t in tasks) == ["COMPLETED", "FAILED"]
    assert slurm.wait(index_job, timeout=60)["JobState"] == "CANCELLED"
    assert not (out / "index.json").exists()

    assert shard_latents(["--input", str(videos), "--output", str(local), "--vae", str(vae), *OPTIONS]) == 0
    tasks, first_log, index_job = run_array()
    assert [t["JobState"] for t in tasks] == ["COMPLETED", "COMPLETED"]
    assert "shards written 0, skipped as done 2" in first_log  # task 0 had finished before
    info, index_log = slurm.wait(index_job, timeout=60), slurm.log(index_job)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), index_log
    assert f"index: {out}/index.json: 20 samples in 4 shards" in index_log

    index, one = load_index(str(out)), load_index(str(local))
    assert {s.task for s in index.shards} == {0, 1} and index.facts == one.facts
    assert sorted(map(str, index.failed)) == sorted(map(str, one.failed))
    array_samples, one_samples = read_samples(str(out)), read_samples(str(local))
    assert array_samples.keys() == one_samples.keys() and len(array_samples) == 20
    for key, sample in array_samples.items():
        for field in ("latent", "latent_std"):
            assert sample[field].tobytes() == one_samples[key][field].tobytes(), key
        assert (sample["cls"], sample["json"]) == (one_samples[key]["cls"], one_samples[key]["json"])
