"""Text-to-video through the project's seams: the config builds ``LatteT2V`` (and starts it from a diffusers
folder), the conditioning turns captions into its kwargs (caption dropout -> the empty prompt), training
runs on captioned batches, and sampling goes from prompts (tiny random T5) or precomputed embeddings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_checkpoint import _env

from latte.builders import build_model
from latte.conditioning import TextCaptions, conditioning_of
from latte.config import ConfigError, load_config
from latte.models import LatteT2V, to_diffusers

REPO = Path(__file__).resolve().parents[1]
T2V = REPO / "configs" / "tiny_t2v.yaml"
CPU = torch.device("cpu")


def test_the_config_builds_latte_t2v_and_its_conditioning():
    cfg = load_config(T2V)
    model = build_model(cfg)
    assert isinstance(model, LatteT2V)
    conditioning = conditioning_of(cfg.model, torch.zeros(1, 32))
    assert isinstance(conditioning, TextCaptions) and conditioning.caption_channels == 32
    x, t = torch.randn(2, 4, 4, 8, 8), torch.tensor([3, 900])
    batch = {
        "encoder_hidden_states": torch.randn(2, 5, 32),
        "encoder_attention_mask": torch.ones(2, 5, dtype=bool),
    }
    out = model(x, t, **conditioning.training_kwargs(batch, CPU, None))
    assert out.shape == (2, 4, 8, 8, 8)  # learn_sigma: 2 x 4 channels
    with pytest.raises(ConfigError, match="text-to-video: it is conditioned on captions, not classes"):
        load_config(T2V, ["model.num_classes=4"])
    with pytest.raises(ConfigError, match="sample.classes given, but the model is text-to-video"):
        load_config(T2V, ["sample.classes=[1]"])
    tiny = REPO / "configs" / "tiny.yaml"
    with pytest.raises(ConfigError, match="sample.images .* needs a text-to-video model"):
        load_config(tiny, ["sample.images=true"])
    with pytest.raises(ConfigError, match="sample.prompts given, but the model is not text-to-video"):
        load_config(tiny, ["sample.prompts=[a cat]"])


def test_caption_dropout_gives_the_empty_prompt_and_sampling_pads_with_it():
    null = torch.full((2, 32), 7.0)  # the empty prompt: 2 tokens
    captions = TextCaptions(32, 0.1, null)
    batch = {
        "encoder_hidden_states": torch.randn(3, 4, 32),
        "encoder_attention_mask": torch.ones(3, 4, dtype=bool),
    }
    kwargs = captions.training_kwargs(batch, CPU, torch.tensor([0, 1, 0]))
    states, mask = kwargs["encoder_hidden_states"], kwargs["encoder_attention_mask"]
    assert torch.equal(states[0], batch["encoder_hidden_states"][0]) and mask[0].all()
    assert torch.equal(states[1, :2], null) and not states[1, 2:].any() and mask[1].tolist() == [1, 1, 0, 0]

    prompts = TextCaptions(32, 0.1, null, ("a", "b"), (torch.ones(3, 32), torch.ones(1, 32)))
    sample = load_config(T2V).sample
    condition = prompts.for_samples(sample, [0, 1, 2], CPU)
    assert condition.kwargs["encoder_hidden_states"].shape == (3, 3, 32)
    assert condition.kwargs["encoder_attention_mask"].sum(1).tolist() == [3, 1, 3]  # prompts cycled
    assert condition.null["encoder_attention_mask"].sum(1).tolist() == [2, 2, 2]
    assert prompts.describe(sample, 3) == {"prompt": "b"}


def test_init_from_a_diffusers_folder_loads_its_weights_strictly(tmp_path):
    cfg = load_config(T2V)
    source = build_model(cfg)
    with torch.no_grad():
        for p in source.parameters():
            p.normal_()
    to_diffusers(source, tmp_path / "transformer")
    started = build_model(load_config(T2V, [f"model.init_from={tmp_path / 'transformer'}"]))
    assert all(
        torch.equal(a, b)
        for a, b in zip(source.state_dict().values(), started.state_dict().values(), strict=True)
    )
    with pytest.raises(ConfigError, match="^model.init_from: "):
        build_model(load_config(T2V, [f"model.init_from={tmp_path / 'nowhere'}"]))
    wider = load_config(T2V, [f"model.init_from={tmp_path / 'transformer'}", "model.hidden_size=128"])
    with pytest.raises(ConfigError, match="model.init_from: .*shape"):
        build_model(wider)


def _run(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def t2v_run(tmp_path_factory) -> dict[str, Path]:
    """A tiny T2V checkpoint trained on synthetic captioned clips, a tiny VAE and a tiny T5 (width 32)."""
    from data_pipeline.toy_text import make_tiny_t5
    from data_pipeline.toy_videos import make_tiny_vae

    root = tmp_path_factory.mktemp("t2v")
    done = _run(
        "train.py",
        "--config",
        str(T2V),
        "--set",
        f"train.results_dir={root}",
        "train.max_steps=4",
        "train.ckpt_every=4",
        "train.log_every=2",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "loss" in done.stdout
    return {
        "ckpt": root / "checkpoints",
        "vae": make_tiny_vae(root / "vae", downsample=8),
        "t5": make_tiny_t5(root / "t5", width=32),
        "root": root,
    }


def _sample(run: dict[str, Path], out: Path, *extra: str) -> subprocess.CompletedProcess:
    return _run(
        "-m",
        "latte.sample",
        str(run["ckpt"]),
        "--vae",
        str(run["vae"]),
        "--out",
        str(out),
        "--no-progress",
        "--set",
        "data.scaling_factor=0.18215",
        *extra,
    )


@pytest.mark.slow
def test_sampling_from_prompts_and_from_prompt_embeddings(t2v_run, tmp_path):
    prompts = ["a red square moving left", "a blue square moving up"]
    args = ["--num-samples", "2", "--cfg-scale", "4", "--text-encoder", str(t2v_run["t5"])]
    done = _sample(t2v_run, tmp_path / "a", *args, "--prompt", prompts[0], "--prompt", prompts[1])
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((tmp_path / "a" / "samples.json").read_text())
    assert [s["prompt"] for s in manifest["samples"]] == prompts
    assert (tmp_path / "a" / "sample_0001.mp4").stat().st_size > 0

    # the same prompts as precomputed embeddings (LattePipeline.encode_prompt's layout): the same latents
    from data_pipeline.text_encoder import load_text_encoder, pad_captions

    encoded, _ = load_text_encoder(str(t2v_run["t5"])).encode([*prompts, ""])
    states, mask = pad_captions(encoded[:2], 120)
    embeds = {
        "prompt_embeds": states,
        "prompt_attention_mask": mask,
        "prompts": prompts,
        "negative_prompt_embeds": torch.from_numpy(encoded[2]).float(),
    }
    torch.save(embeds, tmp_path / "embeds.pt")
    common = ["--num-samples", "2", "--cfg-scale", "4", "--save-latents"]
    a = _sample(t2v_run, tmp_path / "b", *common, "--prompt-embeds", str(tmp_path / "embeds.pt"))
    b = _sample(
        t2v_run,
        tmp_path / "c",
        *common,
        "--text-encoder",
        str(t2v_run["t5"]),
        "--prompts",
        str(_lines(tmp_path / "prompts.txt", prompts)),
    )
    assert a.returncode == 0 and b.returncode == 0, (a.stderr[-2000:], b.stderr[-2000:])

    for i in range(2):
        la, lb = (np.load(tmp_path / d / f"sample_{i:04d}.npy") for d in ("b", "c"))
        assert np.allclose(la, lb, atol=1e-4), np.abs(la - lb).max()

    torch.save({"prompt_embeds": torch.zeros(1, 3, 16)}, tmp_path / "narrow.pt")
    bad = _sample(t2v_run, tmp_path / "d", "--prompt-embeds", str(tmp_path / "narrow.pt"))
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("error: --prompt-embeds")
    assert "(N, L, 32)" in bad.stderr
    missing = _sample(t2v_run, tmp_path / "e")
    assert missing.returncode == 2 and "samples from prompts" in missing.stderr

    # a long video by extension (4-frame clips, 10 frames, each clip conditioned on the previous one's end)
    longer = _sample(
        t2v_run, tmp_path / "g", *args, "--prompt", prompts[0], "--total-frames", "10", "--save-latents"
    )
    assert longer.returncode == 0, longer.stderr[-3000:]
    assert np.load(tmp_path / "g" / "sample_0000.npy").shape[0] == 10  # (F, C, h, w)

    images = _sample(t2v_run, tmp_path / "f", *args, "--prompt", prompts[0], "--images")  # text-to-image
    assert images.returncode == 0, images.stderr[-3000:]
    from PIL import Image

    assert Image.open(tmp_path / "f" / "sample_0001.png").size == (64, 64)
    assert (tmp_path / "f" / "grid.png").is_file() and not (tmp_path / "f" / "grid.mp4").exists()


def _lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.slow
def test_export_diffusers_writes_what_lattetransformer3dmodel_loads(t2v_run, tmp_path):
    from diffusers import LatteTransformer3DModel

    from latte.models import from_diffusers

    done = _run("-m", "latte.export", str(t2v_run["ckpt"]), str(tmp_path / "transformer"), "--diffusers")
    assert done.returncode == 0, done.stderr[-3000:]
    theirs = LatteTransformer3DModel.from_pretrained(tmp_path / "transformer").eval()
    ours = from_diffusers(tmp_path / "transformer", attention="math").eval()
    step = sorted(t2v_run["ckpt"].glob("step_*"))[-1]
    ema = torch.load(step / "ema_consolidated.pt", weights_only=True)
    assert all(torch.equal(ema[k], v) for k, v in ours.state_dict().items())  # the EMA, by default
    x, t, text = torch.randn(1, 4, 4, 8, 8), torch.tensor([500]), torch.randn(1, 3, 32)
    with torch.no_grad():
        expected = theirs(x.transpose(1, 2), encoder_hidden_states=text, timestep=t).sample.transpose(1, 2)
        got = ours(x, t, text)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max() + 1e-6
