"""train.py end to end on CPU: the README's demo trains a tiny Latte and its loss falls (and with ``--t2v``, a
tiny text-to-video Latte sampled from prompts)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _losses(stdout: str) -> list[float]:
    return [float(m) for m in re.findall(r"\| loss ([0-9.]+) \|", stdout)]


@pytest.mark.slow
def test_train_tiny_loss_falls(tmp_path):
    cmd = [
        sys.executable,
        "train.py",
        "--config",
        "configs/tiny.yaml",
        "--set",
        f"train.results_dir={tmp_path}",
    ]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    losses = _losses(out.stdout)
    assert len(losses) == 6  # 60 steps, logged every 10
    assert losses[-1] < 0.6 * losses[0], losses
    (run_dir,) = [p for p in tmp_path.iterdir() if p.name != "checkpoints"]
    assert (run_dir / "config.yaml").is_file()
    assert "loss " in out.stdout.splitlines()[-1] and "(last interval)" in out.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "train.lrr=1"], "error: unknown config key 'train.lrr' (did you mean 'train.lr'?)"),
        (["--config", "configs/nope.yaml"], "error: config file not found: configs/nope.yaml"),
        (["--set", "train.precision=fp16"], "error: train.precision fp16 is not supported on this device"),
        (["--set", "data.val_index=/nonexistent/val"], "error: data.val_index: "),
    ],
)
def test_train_rejects_bad_input_with_one_line(args, message, tmp_path):
    if "fp16" in message and torch.cuda.is_available():
        pytest.skip("fp16 is valid on this machine: it has a GPU")
    cmd = [sys.executable, "train.py", *args]
    if "--config" not in args:
        cmd += ["--config", "configs/tiny.yaml"]
    cmd += ["--set", f"train.results_dir={tmp_path}"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip() == message or out.stderr.strip().startswith(message), out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_readme_demo_command(tmp_path):
    """Runs `bash scripts/demo.sh` for real when the suite runs in the project's own environment (CI)."""
    if Path(sys.prefix).resolve() != (REPO / ".venv").resolve():
        pytest.skip(f"demo.sh uses {REPO / '.venv'}; this interpreter is {sys.prefix}")
    env = dict(os.environ, LATTE_DEMO_DIR=str(tmp_path))
    out = subprocess.run(
        ["bash", "scripts/demo.sh"], cwd=REPO, capture_output=True, text=True, env=env, timeout=600
    )
    assert out.returncode == 0, out.stderr[-2000:]
    losses = _losses(out.stdout)  # 300 steps logged every 25, over two launches
    assert len(losses) == 12 and losses[-1] < 0.5 * losses[0], losses
    assert f"resumed from {tmp_path / 'runs' / 'checkpoints' / 'step_00000150'} at step 150" in out.stdout
    samples = tmp_path / "samples"
    videos = sorted(p.name for p in samples.glob("*.mp4"))
    assert videos == ["grid.mp4", *(f"sample_{i:04d}.mp4" for i in range(4))], videos
    assert (samples / "grid.gif").stat().st_size > 0
    import av

    with av.open(str(samples / "long" / "sample_0000.mp4")) as video:  # 16 frames from the 4-frame model
        frames = [f.to_ndarray(format="rgb24") for f in video.decode(video=0)]
    assert len(frames) == 16 and frames[0].shape == (64, 64, 3)


@pytest.mark.slow
def test_readme_demo_t2v_command(tmp_path):
    """`bash scripts/demo.sh --t2v`: captioned clips -> latents + T5 captions -> LatteT2V-T/2 -> 2 prompts."""
    if Path(sys.prefix).resolve() != (REPO / ".venv").resolve():
        pytest.skip(f"demo.sh uses {REPO / '.venv'}; this interpreter is {sys.prefix}")
    env = dict(os.environ, LATTE_DEMO_DIR=str(tmp_path))
    out = subprocess.run(
        ["bash", "scripts/demo.sh", "--t2v"], cwd=REPO, capture_output=True, text=True, env=env, timeout=600
    )
    assert out.returncode == 0, out.stderr[-2000:]
    work = tmp_path / "t2v"
    losses = _losses(out.stdout)  # 100 steps logged every 25, over two launches
    assert len(losses) == 4 and losses[-1] < 0.5 * losses[0], losses
    assert f"resumed from {work / 'runs' / 'checkpoints' / 'step_00000050'} at step 50" in out.stdout

    directions = ["right", "down", "left", "up"]  # class k moves along 2*pi*k/4 (y points down)
    rows = [json.loads(line) for line in (tmp_path / "videos" / "captions.jsonl").read_text().splitlines()]
    assert len(rows) == 24
    for row in rows:  # each clip captioned by what it shows: "a red square moving left"
        k = int(row["path"].split("/")[0].removeprefix("class_"))
        assert re.fullmatch(rf"an? \w+ square moving {directions[k]}", row["caption"]), row
    facts = json.loads((work / "latents" / "index.json").read_text())["facts"]
    assert facts["text_encoder"] == str(work / "tiny_t5") and facts["caption_channels"] == 32
    with tarfile.open(work / "latents" / "shard-00000-000000.tar") as tar:
        texts = {tar.extractfile(m).read().decode() for m in tar if m.name.endswith(".caption.txt")}
    assert texts and texts <= {row["caption"] for row in rows}

    samples = work / "samples"
    manifest = json.loads((samples / "samples.json").read_text())
    prompts = [s["prompt"] for s in manifest["samples"]]
    assert prompts == ["a green square moving left", "a grey square moving up"], prompts
    assert manifest["config"]["model"]["name"] == "LatteT2V-T/2"
    import av

    for sample in manifest["samples"]:
        with av.open(str(samples / sample["video"])) as video:
            frames = [f.to_ndarray(format="rgb24") for f in video.decode(video=0)]
        assert len(frames) == 4 and frames[0].shape == (64, 64, 3)
    assert (samples / "grid.mp4").stat().st_size > 0
    assert str(samples / "samples.json") in out.stdout and f"{samples}/sample_0000.mp4" in out.stdout
