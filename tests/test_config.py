"""The typed config: presets load, overrides are type-checked, mistakes are one line naming the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from latte.builders import build_diffusion, build_model
from latte.config import Config, ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
PRESETS = sorted((REPO / "configs").glob("*.yaml"))


def test_presets_present_and_valid():
    names = {p.stem for p in PRESETS}
    assert {"ucf101", "ffs", "sky", "taichi", "tiny"} <= names
    for path in PRESETS:
        load_config(path)


@pytest.mark.parametrize(
    "preset, classes, clip_start",
    [("ucf101", 101, 100_000), ("ffs", 0, 20_000), ("sky", 0, 20_000), ("taichi", 0, 500_000)],
)
def test_presets_follow_the_reference(preset, classes, clip_start):
    cfg = load_config(REPO / "configs" / f"{preset}.yaml")
    assert cfg.model.name == "Latte-XL/2" and cfg.model.num_classes == classes and cfg.model.learn_sigma
    assert (cfg.data.num_frames, cfg.data.image_size, cfg.data.frame_interval) == (16, 256, 3)
    assert cfg.data.latent_size == 32
    assert cfg.train.lr == pytest.approx(1e-4) and cfg.train.weight_decay == 0.0
    assert cfg.train.ema_decay == pytest.approx(0.9999)
    assert (cfg.train.clip_max_norm, cfg.train.clip_start_step) == (pytest.approx(0.1), clip_start)
    assert cfg.diffusion.sampling_steps == "250" and cfg.diffusion.noise_schedule == "linear"
    assert cfg.train.precision == "bf16" and cfg.train.tf32  # GPU presets: flash-attn's precision


def test_overrides_are_typed():
    overrides = ["train.lr=2e-4", "model.attention=math", "data.num_frames=2"]
    cfg = load_config(REPO / "configs/tiny.yaml", overrides)
    assert isinstance(cfg.train.lr, float) and cfg.train.lr == pytest.approx(2e-4)  # "2e-4" is a str to YAML
    assert cfg.model.attention == "math" and cfg.data.num_frames == 2
    cfg = load_config(None, ["diffusion.sampling_steps=50", "train.adam_betas=[0.9, 0.95]"])
    assert cfg.diffusion.sampling_steps == "50" and cfg.train.adam_betas == [0.9, 0.95]


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lrr=1", "unknown config key 'train.lrr' (did you mean 'train.lr'?)"),
        ("modle.name=Latte-S/2", "unknown config key 'modle.name' (did you mean 'model.name'?)"),
        ("model.nme=Latte-S/2", "did you mean 'model.name'?"),
        ("train.max_steps=ten", "config key 'train.max_steps' expects int, got 'ten'"),
        ("model.learn_sigma=1", "config key 'model.learn_sigma' expects bool"),
        ("model.name=Latte-XL/3", "model.name 'Latte-XL/3' is not a Latte flavor (did you mean"),
        (
            "model.attention=flashy",
            "model.attention 'flashy' is not one of auto, flash3, flash, xformers, sdpa",
        ),
        ("train.precision=fp8", "train.precision 'fp8' is not one of fp32, bf16, fp16"),
        ("data.image_size=200", "patch size 2 of Latte-XL/2 does not divide the latent size 25"),
        ("model.num_heads=5", "hidden size 1152 is not divisible by num_heads 5"),
        ("model.depth=3", "model depth 3 must be even"),
        ("train.micro_batch_size=0", "train.micro_batch_size must be >= 1"),
        ("diffusion.sampling_steps=ddimx", "diffusion.sampling_steps 'ddimx' must be"),
        ("diffusion.sampling_steps=2000", "asks for zero or more than diffusion_steps (1000) steps"),
        ("model=3", "config key 'model' is a section"),
        ("novalue", "override 'novalue' must look like key.sub=value"),
    ],
)
def test_bad_values_fail_with_one_clear_line(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    text = str(info.value)
    assert message in text and "\n" not in text


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("model:\n  num_clases: 5\n")
    with pytest.raises(ConfigError, match="did you mean 'model.num_classes'"):
        load_config(typo)


def test_save_roundtrip_and_hash(tmp_path):
    cfg = load_config(REPO / "configs/ucf101.yaml", ["train.lr=3e-4"])
    cfg.save(tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg and again.hash() == cfg.hash()
    assert load_config(REPO / "configs/ucf101.yaml").hash() != cfg.hash()
    assert not list(tmp_path.glob(".*tmp"))  # written through a temp name, nothing left behind


def test_builders_follow_the_config():
    cfg = load_config(REPO / "configs/tiny.yaml", ["model.attention=math", "diffusion.sampling_steps=ddim5"])
    model = build_model(cfg)
    assert model.input_size == 8 and model.num_frames == 4 and model.num_classes == 4
    assert model.out_channels == 8 and len(model.blocks) == 4
    assert model.blocks[0].attn.backend == "math"
    assert build_diffusion(cfg).num_timesteps == 1000
    assert build_diffusion(cfg, sampling=True).num_timesteps == 5
    assert Config().model.name == "Latte-XL/2"


def test_config_imports_nothing_heavy():
    heavy = "('deepspeed', 'boto3', 'webdataset')"
    code = f"import sys, latte.config; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]"
