"""The sharding job end to end: real encoded videos, a tiny random VAE, a local directory, a real S3 server.

Checked: every stored latent is the VAE's posterior mean (and std) x the scaling factor of the recorded
frames; the factor is applied exactly once; counts, bytes and sha256 match the index; bad inputs are listed
under ``failed``; a killed task reruns to byte-identical shards; two tasks + build_index hold what one task
holds; bad outputs and arguments fail with one ``error:`` line before anything is written.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from data_pipeline import storage
from data_pipeline.build_index import main as build_index
from data_pipeline.index import load_index, load_part
from data_pipeline.shard_latents import JobError, build_parser, task_from_env
from data_pipeline.shard_latents import main as shard_latents
from data_pipeline.toy_videos import make_corrupt_video, make_tiny_vae, make_video
from data_pipeline.video import resize_center_crop

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded: the VAE is a local directory
REPO = Path(__file__).resolve().parents[1]
SF = 0.18215  # diffusers' default scaling factor, which the tiny VAE's config carries
OPTIONS = (
    "--num-frames 4 --frame-interval 2 --clips-per-video 2 --image-size 32 "
    "--samples-per-shard 8 --flip --workers 1 --no-progress"
).split()
VIDEOS = {  # path -> (frames, (width, height)); positions in sorted order: v0 0, v1 1, short 2, v2 3, v4 6
    "a/v0.mp4": (24, (96, 64)),
    "a/v1.mp4": (16, (90, 70)),  # an odd size
    "b/v2.avi": (20, (64, 64)),
    "b/short.mp4": (5, (64, 48)),  # shorter than one window (7 frames at interval 2): sampled at interval 1
    "c/v4.mkv": (24, (80, 64)),
}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shard")
    for seed, (rel, (frames, size)) in enumerate(VIDEOS.items()):
        make_video(root / "videos" / rel, frames, size, seed=seed)
    make_corrupt_video(root / "videos" / "c" / "corrupt.mp4")
    (root / "videos" / "c" / "empty.mp4").write_bytes(b"")
    make_tiny_vae(root / "vae")
    return root


def run(data: Path, output: str | Path, *extra: str, source: str | Path | None = None) -> int:
    """The job in this process (the CLI's ``main``); later options override ``OPTIONS``."""
    args = ["--input", str(source or data / "videos"), "--output", str(output), "--vae", str(data / "vae")]
    return shard_latents([*args, *OPTIONS, *extra])


@pytest.fixture(scope="module")
def local(data) -> str:
    """One uninterrupted single-task run into a local directory: the reference the other runs must match."""
    out = data / "out-local"
    assert run(data, out) == 0
    return str(out)


@pytest.fixture(scope="module")
def vae(data):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(data / "vae").eval()


def read_samples(root: str) -> dict[str, dict]:
    """key -> {"latent", "latent_std", "cls", "json"} over every shard of a dataset (checking bytes and
    sha256 against the index)."""
    index = load_index(root)
    samples: dict[str, dict] = {}
    for shard, url in zip(index.shards, index.shard_urls(storage.join(root, "index.json")), strict=True):
        blob = storage.read_bytes(url)
        assert len(blob) == shard.bytes and hashlib.sha256(blob).hexdigest() == shard.sha256, url
        keys = set()
        with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
            for member in tar:
                key, field = member.name.split(".", 1)
                payload = tar.extractfile(member).read()
                value = np.load(io.BytesIO(payload)) if field.endswith(".npy") else payload.decode()
                samples.setdefault(key, {})[field.removesuffix(".npy")] = value
                keys.add(key)
        assert len(keys) == shard.samples, url
    return samples


def posterior(vae, path: str, indices: list[int], flipped: bool, size: int = 32):
    """The tiny VAE's posterior (raw mean, raw std) of the given frames, decoded independently with PyAV."""
    with av.open(path) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    x = resize_center_crop(torch.from_numpy(np.stack([frames[i] for i in indices])), size)  # (F, 3, S, S)
    with torch.no_grad():
        dist = vae.encode(x.flip(-1) if flipped else x).latent_dist
    return dist.mean, dist.std  # each (F, C, h, w)


def test_local_job_index_samples_and_failures(local, data):
    index = load_index(local)
    facts = index.facts
    assert (facts.scaling_factor, facts.latent_shape, facts.classes) == (SF, [4, 4, 16, 16], ["a", "b", "c"])
    assert (facts.num_frames, facts.frame_interval, facts.image_size, facts.vae) == (
        4,
        2,
        32,
        str(data / "vae"),
    )
    samples = read_samples(local)
    assert len(samples) == index.num_samples == 5 * 2 * 2  # 5 good videos x 2 windows x (clip + flip)
    assert all(s.samples <= 8 for s in index.shards) and len(index.shards) >= 3
    assert sorted(f.name for f in Path(local).glob("*.tar")) == [s.url for s in index.shards]
    assert not list(Path(local).glob(".*"))  # no temporary shard is left behind
    failed = [(Path(f["input"]).name, f["error"].split(":")[0]) for f in index.failed]
    assert failed == [("corrupt.mp4", "InvalidDataError"), ("empty.mp4", "empty file (0 bytes)")]
    assert load_part(local, 0).to_json() == index.to_json()
    for key, sample in samples.items():
        meta = json.loads(sample["json"])
        assert key == f"{meta['input_index']:08d}_c{meta['clip']:02d}" + ("_flip" if meta["flipped"] else "")
        assert sample["latent"].shape == sample["latent_std"].shape == (4, 4, 16, 16)
        assert sample["latent"].dtype == np.float16 and (sample["latent_std"] > 0).all()
        assert int(sample["cls"]) == meta["label"] == "abc".index(Path(meta["source"]).parent.name)
    short = json.loads(samples["00000002_c01"]["json"])
    assert short["frame_interval"] == 1 and short["frame_indices"] == [1, 2, 3, 4]
    assert json.loads(samples["00000001_c00"]["json"])["original_size"] == [90, 70]
    assert json.loads(samples["00000000_c01_flip"]["json"])["frame_indices"] == [17, 19, 21, 23]


@pytest.mark.parametrize("key", ["00000001_c00", "00000001_c01_flip", "00000002_c00", "00000006_c01_flip"])
def test_latents_are_the_scaled_posterior_of_the_recorded_frames(local, vae, key):
    sample = read_samples(local)[key]
    meta = json.loads(sample["json"])
    mean, std = posterior(vae, meta["source"], meta["frame_indices"], meta["flipped"])
    np.testing.assert_allclose(sample["latent"].astype(np.float32), (mean * SF).numpy(), rtol=2e-3, atol=2e-4)
    np.testing.assert_allclose(
        sample["latent_std"].astype(np.float32), (std * SF).numpy(), rtol=2e-3, atol=2e-4
    )


def test_scaling_factor_is_applied_exactly_once(local, vae):
    """decode(latent / index factor) equals decoding the raw posterior mean; no or double division don't."""
    sample = read_samples(local)["00000000_c00"]
    meta = json.loads(sample["json"])
    raw_mean, _ = posterior(vae, meta["source"], meta["frame_indices"], meta["flipped"])
    latent = torch.from_numpy(sample["latent"]).float()  # (F, C, h, w), already x scaling factor
    factor = load_index(local).facts.scaling_factor
    with torch.no_grad():
        reference = vae.decode(raw_mean).sample
        error = (vae.decode(latent / factor).sample - reference).abs().max().item()
        unscaled = (vae.decode(latent).sample - reference).abs().max().item()
        twice = (vae.decode(latent / factor**2).sample - reference).abs().max().item()
    assert error < 1e-2 and unscaled > 20 * error and twice > 20 * error


def test_rerun_of_a_finished_task_writes_nothing(local, data, capsys):
    before = {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in Path(local).glob("*.tar")}
    assert run(data, local) == 0
    assert "shards written 0, skipped as done" in capsys.readouterr().out
    assert {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in Path(local).glob("*.tar")} == before


def test_killed_task_reruns_to_identical_shards(local, data, capsys):
    reference = load_index(local)
    out = data / "out-killed"
    kill_after = reference.shards[0].samples + 2  # two samples into the second shard
    cmd = [sys.executable, "-m", "data_pipeline.shard_latents", "--input", str(data / "videos")]
    cmd += ["--output", str(out), "--vae", str(data / "vae"), *OPTIONS, "--workers", "0"]
    env = dict(os.environ, LATTE_SHARD_KILL_AFTER_SAMPLES=str(kill_after))
    killed = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert [s.url for s in load_part(str(out), 0).shards] == [reference.shards[0].url]
    assert list(out.glob(".shard-00000-*.tar.tmp-*")) and not (out / "index.json").exists()  # half a shard

    assert run(data, out) == 0  # the rerun: skips the finished shard, redoes the rest
    assert f"shards written {len(reference.shards) - 1}, skipped as done 1" in capsys.readouterr().out
    assert load_index(str(out)).to_json() == reference.to_json()  # same names, counts, bytes, sha256
    assert not list(out.glob(".*"))

    (out / reference.shards[-1].url).unlink()  # a shard listed in the part but gone: redone, identically
    assert run(data, out) == 0
    assert f"shards written 1, skipped as done {len(reference.shards) - 1}" in capsys.readouterr().out
    assert load_index(str(out)).to_json() == reference.to_json()


def test_devices_run_one_sub_task_per_device(local, data):
    out = data / "out-devices"
    assert run(data, out, "--devices", "cpu,cpu") == 0  # two sub-processes: sub-tasks 0 and 1 of 2
    index = load_index(str(out))
    assert {s.task for s in index.shards} == {0, 1} and index.num_samples == load_index(local).num_samples
    assert json.loads((out / "job.json").read_text())["num_tasks"] == 2


def test_two_tasks_and_build_index_equal_one_task(local, data, capsys):
    out = data / "out-two-tasks"
    assert run(data, out, "--task-index", "1", "--num-tasks", "2") == 0  # task 0 has not run: no index
    assert not (out / "index.json").exists()
    assert run(data, out, "--task-index", "0", "--num-tasks", "2") == 0  # finishes last: merges
    merged_by_task = load_index(str(out))
    (out / "index.json").unlink()
    capsys.readouterr()
    assert build_index([str(out)]) == 0  # by hand: the same index
    assert "20 samples" in capsys.readouterr().out
    index, one = load_index(str(out)), load_index(local)
    assert index.to_json() == merged_by_task.to_json()
    assert {s.task for s in index.shards} == {0, 1} and index.facts == one.facts
    assert sorted(map(str, index.failed)) == sorted(map(str, one.failed))
    two_samples, one_samples = read_samples(str(out)), read_samples(local)
    assert two_samples.keys() == one_samples.keys()
    for key, sample in two_samples.items():
        for field in ("latent", "latent_std"):
            assert np.array_equal(sample[field], one_samples[key][field]), key
        assert (sample["cls"], sample["json"]) == (one_samples[key]["cls"], one_samples[key]["json"])


def test_s3_input_and_output(local, data, s3_bucket):
    bucket = storage.split_s3(s3_bucket)[0]
    for path in sorted((data / "videos").rglob("*.*")):
        storage.s3_client().upload_file(str(path), bucket, f"videos/{path.relative_to(data / 'videos')}")
    out = f"{s3_bucket}/datasets/tiny"
    assert run(data, out, source=f"{s3_bucket}/videos") == 0
    index = load_index(out)
    keys = [k.split(f"{bucket}/datasets/tiny/", 1)[1] for k in storage.list_files(out)]
    assert sorted(keys) == sorted(
        ["index.json", "job.json", "parts/task-00000.json"] + [s.url for s in index.shards]
    )
    assert [f["input"] for f in index.failed] == [
        f"{s3_bucket}/videos/c/corrupt.mp4",
        f"{s3_bucket}/videos/c/empty.mp4",
    ]
    s3_samples, local_samples = read_samples(out), read_samples(local)
    assert s3_samples.keys() == local_samples.keys()
    for key, sample in s3_samples.items():
        assert np.array_equal(sample["latent"], local_samples[key]["latent"]), key


def test_manifests_labels_missing_paths_and_factor_override(local, data):
    manifest = data / "list.csv"
    manifest.write_text("path,label\nvideos/a/v1.mp4,2\nvideos/b/short.mp4,0\nvideos/gone/missing.mp4,1\n")
    out = data / "out-csv"
    assert run(data, out, "--clips-per-video", "1", "--scaling-factor", "0.5", source=manifest) == 0
    index = load_index(str(out))
    assert index.facts.classes == ["0", "1", "2"] and index.facts.scaling_factor == 0.5
    assert index.failed == [{"input": str(data / "videos/gone/missing.mp4"), "error": "no such file"}]
    samples = read_samples(str(out))
    unflipped = [(json.loads(s["json"]), s) for s in samples.values() if not json.loads(s["json"])["flipped"]]
    by_source = {meta["source"]: s for meta, s in unflipped}
    v1 = by_source[str(data / "videos/a/v1.mp4")]
    assert int(v1["cls"]) == 2
    # the first window is frames 0, 2, 4, 6 here and in the reference run: only the factor differs
    expected = read_samples(local)["00000001_c00"]["latent"].astype(np.float32) * (0.5 / SF)
    np.testing.assert_allclose(v1["latent"].astype(np.float32), expected, rtol=4e-3, atol=1e-3)

    jsonl = data / "list.jsonl"
    jsonl.write_text(json.dumps({"path": str(data / "videos/c/v4.mkv")}) + "\n")
    assert run(data, data / "out-jsonl", "--clips-per-video", "1", source=jsonl) == 0
    unconditional = read_samples(str(data / "out-jsonl"))
    assert load_index(str(data / "out-jsonl")).facts.classes == [] and len(unconditional) == 2
    assert all("cls" not in s for s in unconditional.values())


MESSAGES = {  # bad setup -> what its one line says
    "wrong-secret": "denied",
    "missing-bucket": "does not exist",
    "unreachable": "cannot reach",
    "unwritable": "not writable",
    "bad-number": "--num-frames must be at least 1",
    "missing-input": "not a directory",
    "missing-manifest": "cannot read the manifest",
    "unknown-option": "unrecognized arguments",
    "other-job": "holds a different job",
}
CASES = list(MESSAGES)


@pytest.mark.parametrize("case", CASES)
def test_bad_setups_fail_fast_with_one_line(case, data, local, tmp_path, monkeypatch, capsys, request):
    output: str = str(tmp_path / "out")
    extra, source = [], None
    expected = MESSAGES[case]
    if case in ("wrong-secret", "missing-bucket", "unreachable"):
        bucket = request.getfixturevalue("s3_bucket")
        output = f"{bucket}/out" if case != "missing-bucket" else "s3://no-such-bucket-here/out"
        if case == "wrong-secret":
            monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-value")
        if case == "unreachable":
            monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    elif case == "unwritable":
        (tmp_path / "a-file").write_text("")
        output = str(tmp_path / "a-file" / "out")
    else:
        extra = {
            "bad-number": ["--num-frames", "0"],
            "unknown-option": ["--frames", "3"],
            "other-job": ["--clips-per-video", "3"],
        }.get(case, [])
        source = {"missing-input": tmp_path / "nothing", "missing-manifest": tmp_path / "nothing.csv"}.get(
            case
        )
        output = local if case == "other-job" else output
    before = sorted(Path(local).rglob("*"))
    assert run(data, output, *extra, source=source) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert "wrong-secret-value" not in err[0] and "latte-test-secret" not in err[0]
    assert sorted(Path(local).rglob("*")) == before and not (tmp_path / "out").exists()
    if case in ("wrong-secret", "unreachable"):  # with the right settings again: the bucket is empty
        for name, value in request.getfixturevalue("seaweed").env().items():
            monkeypatch.setenv(name, value)
        assert storage.list_files(bucket) == []


def test_cli_error_is_one_line_on_stderr(data, s3_bucket):
    cmd = [sys.executable, "-m", "data_pipeline.shard_latents", "--input", str(data / "videos")]
    cmd += ["--output", "s3://no-such-bucket-here/x", "--vae", str(data / "vae")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        f"error: S3 bucket 'no-such-bucket-here' does not exist (endpoint {os.environ['AWS_ENDPOINT_URL']}) "
        "for 's3://no-such-bucket-here/x'"
    ]


def test_task_split_defaults_from_a_slurm_array(monkeypatch):
    args = build_parser().parse_args(["--input", "x", "--output", "y", "--vae", "z"])
    assert task_from_env(args) == (0, 1)  # no SLURM: one task
    for name, value in {
        "SLURM_ARRAY_TASK_ID": "5",
        "SLURM_ARRAY_TASK_MIN": "4",
        "SLURM_ARRAY_TASK_COUNT": "3",
    }.items():
        monkeypatch.setenv(name, value)
    assert task_from_env(args) == (1, 3)  # --array=4-6: ids count from the array's first
    args.task_index = 3
    with pytest.raises(JobError, match="task index 3 is not in 0..2"):
        task_from_env(args)


# --------------------------------------------------------------------------------------------------------
# A dataset without samples, and a temp folder that is not there
# --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_inputs(data) -> dict[str, Path]:
    """Input folders: ``all-bad`` (c/corrupt.mp4, c/empty.mp4) and ``mixed`` (a/v0.mp4, a good video,
    besides them: in ``--sorted`` order v0, corrupt, empty)."""
    folders = {"all-bad": data / "all-bad", "mixed": data / "mixed"}
    for folder in folders.values():
        (folder / "c").mkdir(parents=True)
        for name in ("corrupt.mp4", "empty.mp4"):
            (folder / "c" / name).write_bytes((data / "videos" / "c" / name).read_bytes())
    (folders["mixed"] / "a").mkdir()
    (folders["mixed"] / "a" / "v0.mp4").write_bytes((data / "videos" / "a" / "v0.mp4").read_bytes())
    return folders


def error_lines(err: str) -> list[str]:
    """The ``error:`` lines of a job's stderr (its log warnings name each failed input besides)."""
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.startswith("error:")]


def no_samples_line(output: Path) -> str:
    listed = f"listed under 'failed' in '{output / 'index.json'}'"
    return f"error: dataset '{output}' has no samples: all 2 inputs failed ({listed})"


def test_job_whose_every_input_failed_exits_2(data, bad_inputs, capsys):
    out = data / "out-all-bad"
    assert run(data, out, source=bad_inputs["all-bad"]) == 2  # a SLURM afterok job must not start
    captured = capsys.readouterr()
    assert "videos ok 0, failed 2" in captured.out
    assert error_lines(captured.err) == [no_samples_line(out)]
    index = load_index(str(out))  # written whole: it is where the failures are listed
    assert index.num_samples == 0
    assert [Path(f["input"]).name for f in index.failed] == ["corrupt.mp4", "empty.mp4"]


def test_array_without_samples_fails_in_the_merging_task_and_build_index(data, bad_inputs, capsys):
    out = data / "out-all-bad-array"
    args = ["--sorted", "--num-tasks", "2"]
    assert run(data, out, *args, "--task-index", "0", source=bad_inputs["all-bad"]) == 0
    captured = capsys.readouterr()  # its own share failed, but the other task may still succeed: no error
    assert "videos ok 0, failed 1" in captured.out and error_lines(captured.err) == []
    assert run(data, out, *args, "--task-index", "1", source=bad_inputs["all-bad"]) == 2
    assert error_lines(capsys.readouterr().err) == [no_samples_line(out)]  # the last task merges: 0 samples
    assert build_index([str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and error_lines(captured.err) == [no_samples_line(out)]


def test_array_tasks_whose_share_failed_or_is_empty_exit_0_when_others_succeed(data, bad_inputs, capsys):
    out = data / "out-mixed-array"
    args = ["--sorted", "--clips-per-video", "1", "--num-tasks", "4"]  # 3 inputs: task 3 has none
    for task in (0, 3, 2):  # v0 (ok), nothing, empty.mp4
        assert run(data, out, *args, "--task-index", str(task), source=bad_inputs["mixed"]) == 0
    assert run(data, out, *args, "--task-index", "1", source=bad_inputs["mixed"]) == 0  # corrupt; merges
    captured = capsys.readouterr()
    assert "task 1/4: videos ok 0, failed 1" in captured.out and error_lines(captured.err) == []
    index = load_index(str(out))
    assert index.num_samples == 2 and len(index.failed) == 2  # one clip + its flip; two failed inputs
    assert build_index([str(out)]) == 0


def test_missing_tmp_dir_is_created_or_refused_before_any_output(data, s3_bucket, tmp_path, capsys):
    manifest = tmp_path / "one.csv"
    manifest.write_text(f"path\n{data / 'videos/a/v1.mp4'}\n")
    out, tmp = f"{s3_bucket}/with-tmp", tmp_path / "scratch" / "shards"
    assert run(data, out, "--clips-per-video", "1", "--tmp-dir", str(tmp), source=manifest) == 0
    assert tmp.is_dir() and not list(tmp.iterdir())  # created with its parents; nothing left in it
    assert load_index(out).num_samples == 2
    capsys.readouterr()
    (tmp_path / "a-file").write_text("")
    blocked, out = tmp_path / "a-file" / "shards", f"{s3_bucket}/blocked-tmp"
    assert run(data, out, "--clips-per-video", "1", "--tmp-dir", str(blocked), source=manifest) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --tmp-dir '{blocked}' is not writable: Not a directory"]
    assert storage.list_files(out) == []  # refused before job.json
