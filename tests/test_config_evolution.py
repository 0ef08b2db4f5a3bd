"""Runs outlive versions: a checkpoint and a config written by older code still resume, export and sample.

``tests/data/ckpt_be513c7`` was written by the code of commit be513c7, before issue 12 added config keys
(``model.compile``, ``train.tf32``, ``train.deterministic``, ``train.stop_check_every``): its meta.json and
config.yaml lack them, and its rank file holds the old RNG layout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_checkpoint import _env

from latte import config as config_module
from latte.checkpoint import config_changes
from latte.config import flatten, load_config

REPO = Path(__file__).resolve().parents[1]
OLD = REPO / "tests" / "data" / "ckpt_be513c7"
ADDED = {"model.compile", "train.tf32", "train.deterministic", "train.stop_check_every"}
os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture
def old_run(tmp_path) -> Path:
    root = tmp_path / "old"
    shutil.copytree(OLD, root)
    return root


def test_the_fixture_predates_the_new_keys():
    meta = json.loads((OLD / "checkpoints" / "step_00000002" / "meta.json").read_text())
    assert not ADDED & set(flatten(meta["config"]))
    assert not ADDED & set(flatten(yaml.safe_load((OLD / "config.yaml").read_text())))


@pytest.mark.slow
def test_old_checkpoint_resumes_with_the_new_keys_at_their_defaults(old_run):
    cmd = [
        sys.executable,
        "train.py",
        "--config",
        str(old_run / "config.yaml"),
        "--set",
        f"train.results_dir={old_run}",
        "train.max_steps=4",
        "train.ckpt_every=2",
    ]
    out = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"resumed from {old_run / 'checkpoints' / 'step_00000002'} at step 2" in out.stdout, out.stdout
    meta = json.loads((old_run / "checkpoints" / "step_00000004" / "meta.json").read_text())
    assert ADDED <= set(flatten(meta["config"]))  # the new checkpoint records them
    assert meta["config"]["train"]["stop_check_every"] == 50 and meta["config"]["model"]["compile"] is False


def test_old_checkpoint_exports_and_samples(old_run, tmp_path):
    from data_pipeline.toy_videos import make_tiny_vae
    from latte.export import main as export_main
    from latte.sample import main as sample_main

    vae = make_tiny_vae(tmp_path / "vae", downsample=8)
    common = ["--num-samples", "1", "--steps", "ddim2", "--no-progress", "--save-latents", "--vae", str(vae)]
    assert sample_main([str(old_run / "checkpoints"), "--out", str(tmp_path / "a"), *common]) == 0
    assert export_main([str(old_run / "checkpoints"), str(tmp_path / "w.pt")]) == 0
    args = [str(tmp_path / "w.pt"), "--config", str(old_run / "config.yaml"), "--out", str(tmp_path / "b")]
    assert sample_main([*args, *common]) == 0
    a, b = ((tmp_path / d / "sample_0000.npy").read_bytes() for d in ("a", "b"))
    assert a == b  # the checkpoint's meta config and the old config.yaml build the same sampler


def test_a_saved_config_missing_a_key_compares_at_its_default():
    now = load_config(REPO / "configs" / "tiny.yaml")
    saved = now.to_dict()
    del saved["train"]["warmup_steps"]  # as if written before the key existed
    assert config_changes(saved, now) == []
    changed = load_config(REPO / "configs" / "tiny.yaml", ["train.warmup_steps=10"])
    assert config_changes(saved, changed) == ["train.warmup_steps 0 != 10"]


def test_retired_keys_are_still_read(monkeypatch, tmp_path):
    monkeypatch.setitem(config_module.RETIRED_KEYS, "train.old_flag", None)  # removed
    monkeypatch.setitem(config_module.RETIRED_KEYS, "data.frames", "data.num_frames")  # renamed
    path = tmp_path / "old.yaml"
    path.write_text("train:\n  old_flag: true\ndata:\n  frames: 3\n")
    cfg = load_config(path)
    assert cfg.data.num_frames == 3
    assert load_config(None, ["data.frames=5"]).data.num_frames == 5
    saved = {"train": {"old_flag": True}, "data": {"frames": 3}}
    assert config_changes(saved, cfg) == []
    # a config that sets both keeps the current key's value
    assert config_module.config_from_dict({"data": {"frames": 3, "num_frames": 2}}).data.num_frames == 2
    with pytest.raises(config_module.ConfigError, match="unknown config key 'train.other_flag'"):
        load_config(None, ["train.other_flag=1"])  # a key never known is still a mistake
