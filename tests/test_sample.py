"""Sampling: per-sample seeds (any number of ranks gives the same bits), guidance, DDIM, respacing, long
videos by replacement, and the real CLI from a train.py checkpoint and its exports to decodable mp4s."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_checkpoint import _one_process

from latte.builders import build_diffusion, build_model
from latte.conditioning import ClassLabels
from latte.config import ConfigError, load_config, sampler_of
from latte.diffusion import GaussianDiffusion, KnownFrames, create_diffusion, get_named_beta_schedule
from latte.sample import index_facts, main
from latte.sampling.decoding import choose_vae, scaling_factor
from latte.sampling.generate import Denoiser, rank_samples, sample_batch, sample_generator, sample_latents
from latte.sampling.ranks import batches_of
from latte.vae import VaeError, decode, load_autoencoder

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
CPU = torch.device("cpu")
os.environ["HF_HUB_OFFLINE"] = "1"  # a missing VAE directory must fail at once, not ask the hub


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tiny models run fastest on one thread; two threads on a busy 2-core machine crawl."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    """Latte-T/2 of configs/tiny.yaml with every weight perturbed (its zero-initialised output layer would
    make every prediction 0 and guidance a no-op)."""
    torch.manual_seed(0)  # the initialisation draws from the global RNG
    net = build_model(load_config(TINY))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return net.eval().requires_grad_(False)


def tiny(*overrides: str):
    cfg = load_config(TINY, list(overrides))
    return cfg, build_diffusion(cfg, sampling=True)


def by_rank(model, cfg, diffusion, world_size: int) -> dict[int, torch.Tensor]:
    out = {}
    for rank in range(world_size):
        out.update(rank_samples(model, diffusion, cfg, rank, world_size, CPU))
    return out


def test_samples_depend_on_seed_and_index_only(model):
    assert batches_of(5, 1, 1, 2) == [[1], [3]] and batches_of(5, 2, 0, 2) == [[0, 1], [4]]
    cfg, diffusion = tiny("diffusion.sampling_steps=4", "sample.num_samples=3")
    one, two = by_rank(model, cfg, diffusion, 1), by_rank(model, cfg, diffusion, 2)
    assert sorted(one) == sorted(two) == [0, 1, 2] and one[0].shape == (4, 4, 8, 8)  # (F, C, h, w)
    assert all(torch.equal(one[i], two[i]) for i in one)  # 1 rank or 2: the same bits
    assert not torch.equal(one[0], one[1])
    other, _ = tiny("diffusion.sampling_steps=4", "sample.num_samples=3", "sample.seed=1")
    assert not torch.allclose(by_rank(model, other, diffusion, 1)[0], one[0])
    # in batches of 2 a sample still draws its own noise: only the batch's matmul rounding differs (the
    # latents of an untrained model are large: x_0 predicted from x_999 is scaled by 1 / sqrt(abar) ~ 150)
    batched, _ = tiny("diffusion.sampling_steps=4", "sample.num_samples=3", "sample.batch_size=2")
    b1, b3 = by_rank(model, batched, diffusion, 1), by_rank(model, batched, diffusion, 3)
    assert all(torch.equal(b1[i], b3[i]) for i in b1)
    assert all((b1[i] - one[i]).abs().max() <= 1e-5 * one[i].abs().max() for i in one)


def labelled(y: torch.Tensor):
    """The condition of class ids ``y`` for the tiny model (4 classes, label dropout: a "no class" row)."""
    return ClassLabels(4, 0.1).labels(y)


def test_cfg_scale_1_is_the_conditional_forward_and_guidance_mixes_eps_only(model):
    g = torch.Generator().manual_seed(1)
    x, t, y = torch.randn(2, 4, 4, 8, 8, generator=g), torch.tensor([10, 500]), torch.tensor([1, 3])
    cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, 4))  # class 4 = the "no class" row
    assert torch.equal(Denoiser(model, labelled(y), 1.0)(x, t), cond)
    guided = Denoiser(model, labelled(y), 4.0)(x, t)
    eps = uncond[:, :, :4] + 4.0 * (cond[:, :, :4] - uncond[:, :, :4])
    torch.testing.assert_close(guided[:, :, :4], eps, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(guided[:, :, 4:], cond[:, :, 4:], rtol=1e-4, atol=1e-5)  # variance: cond's
    assert (guided[:, :, :4] - cond[:, :, :4]).abs().max() > 1e-2

    cfg, diffusion = tiny("diffusion.sampling_steps=5", "sample.classes=[3]", "sample.seed=7")
    ours = sample_latents(model, diffusion, cfg, [0], CPU)  # (1, F, C, h, w)
    direct = diffusion.p_sample_loop(
        lambda x_, t_: model(x_, t_, torch.tensor([3])),
        (1, 4, 4, 8, 8),
        clip_denoised=False,
        generator=sample_generator(7, 0, CPU),
    )
    assert torch.equal(ours, direct)


def test_ddim_eta_0_depends_on_x_T_only(model):
    d = create_diffusion("ddim5")
    denoiser = Denoiser(model, labelled(torch.tensor([2])), 3.0)
    z = torch.randn(1, 4, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def run(seed: int, eta: float) -> torch.Tensor:
        g = [torch.Generator().manual_seed(seed)]
        return d.ddim_sample_loop(denoiser, z.shape, z.clone(), clip_denoised=False, eta=eta, generator=g)

    assert torch.equal(run(1, 0.0), run(2, 0.0))
    assert not torch.allclose(run(1, 1.0), run(2, 1.0))
    assert sampler_of(load_config(TINY)) == "ddim"  # tiny.yaml samples with "ddim10"
    assert sampler_of(load_config(TINY, ["diffusion.sampling_steps=250"])) == "ddpm"
    assert sampler_of(load_config(TINY, ["sample.sampler=ddpm"])) == "ddpm"


@pytest.mark.slow
def test_respacing_all_1000_steps_equals_the_unrespaced_process(model):
    kinds = {k: getattr(create_diffusion(""), k) for k in ("model_mean_type", "model_var_type", "loss_type")}
    base = GaussianDiffusion(betas=get_named_beta_schedule("linear", 1000), **kinds)
    spaced = create_diffusion("1000")
    denoiser = Denoiser(model, labelled(torch.tensor([1])), 1.0)
    shape = (1, 1, 4, 8, 8)  # one frame keeps 2 x 1000 forwards cheap

    def run(d) -> torch.Tensor:
        return d.p_sample_loop(denoiser, shape, clip_denoised=False, generator=[sample_generator(0, 0, CPU)])

    assert torch.equal(run(spaced), run(base))


def test_known_frames_are_exact_and_condition_the_rest(model):
    d = create_diffusion("4")
    x0 = torch.randn(2, 4, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    known = KnownFrames(x0, torch.tensor([True, True, False, False]))
    denoiser = Denoiser(model, labelled(torch.tensor([0, 1])), 1.0)

    def run(k: KnownFrames | None) -> torch.Tensor:
        gens = [sample_generator(0, i, CPU) for i in range(2)]
        return d.p_sample_loop(denoiser, x0.shape, clip_denoised=False, generator=gens, known=k)

    with_known, free = run(known), run(None)
    assert torch.equal(with_known[:, :2], x0[:, :2])
    assert not torch.allclose(with_known[:, 2:], free[:, 2:], atol=1e-3)  # the model saw the known frames
    assert torch.equal(run(known), with_known)


@pytest.mark.parametrize("total, clips", [(10, 4), (9, 4), (4, 1)])
def test_long_video_is_stitched_from_overlapping_clips(model, total, clips):
    overrides = [
        "diffusion.sampling_steps=3",
        f"sample.total_frames={total}",
        "sample.overlap=2",
        "sample.cfg_scale=2.0",
    ]
    cfg, diffusion = tiny(*overrides)
    parts = sample_batch(model, diffusion, cfg, [0, 5], CPU)  # each (2, 4, C, h, w)
    assert len(parts) == clips
    for a, b in zip(parts, parts[1:], strict=False):
        assert torch.equal(a[:, -2:], b[:, :2])  # the overlap is exactly the previous clip's last frames
        assert not torch.allclose(a[:, :2], b[:, 2:])
    video = sample_latents(model, diffusion, cfg, [0, 5], CPU)
    assert video.shape == (2, total, 4, 8, 8)
    stitched = torch.cat([parts[0], *(p[:, 2:] for p in parts[1:])], dim=1)[:, :total]
    assert torch.equal(video, stitched)  # and a second run of the same seed gives the same bits


def write_index(path: Path, vae: str, scaling_factor: float) -> None:
    """A dataset index (of no shards) that names the VAE and the factor, as the sharding job writes it."""
    from data_pipeline.index import DatasetFacts, DatasetIndex, save_index

    facts = DatasetFacts(
        vae=vae,
        scaling_factor=scaling_factor,
        latent_shape=[4, 4, 8, 8],
        num_frames=4,
        frame_interval=1,
        image_size=64,
    )
    save_index(DatasetIndex(facts), str(path))


def test_scaling_factor_sources_and_decode_divides_by_it(tmp_path, vae_dir):
    index = tmp_path / "index.json"
    write_index(index, str(vae_dir), 0.5)
    facts = index_facts(str(index))
    assert choose_vae(None, facts) == (str(vae_dir), f"dataset index {index}")
    assert choose_vae("other", facts) == ("other", "--vae")
    with_index = load_config(TINY, [f"data.index={index}"])
    assert scaling_factor(with_index, facts, 0.18215) == (0.5, f"dataset index {index}")
    own = load_config(TINY, [f"data.index={index}", "data.scaling_factor=0.25"])
    assert scaling_factor(own, facts, 0.18215) == (0.25, "config data.scaling_factor")
    missing = index_facts(str(tmp_path / "nope.json"))
    unknown = r"scaling factor is unknown: the dataset index .*nope.json cannot give it \(FileNotFoundError"
    with pytest.raises(VaeError, match=unknown + r".*pass --set data.scaling_factor=F"):
        scaling_factor(with_index, missing, 0.18215)  # no guess from the VAE's config (issue 13.5)
    recorded = {"scaling_factor": 0.3, "vae": "v"}
    assert scaling_factor(with_index, missing, 0.18215, recorded) == (0.3, "the checkpoint's meta.json")
    assert choose_vae(None, missing, recorded) == ("v", "the checkpoint's meta.json")
    synthetic = load_config(TINY)  # trained without a dataset: the VAE's own factor is all there is
    assert scaling_factor(synthetic, None, 0.18215)[0] == 0.18215

    vae, _ = load_autoencoder(str(vae_dir))
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    frames = decode(vae, latents, 0.5)
    assert frames.shape == (3, 64, 64, 3) and frames.dtype == np.uint8
    with torch.no_grad():
        expected = ((vae.decode(latents * 2).sample.clamp(-1, 1) + 1) * 127.5).round()
    assert np.array_equal(frames, expected.permute(0, 2, 3, 1).to(torch.uint8).numpy())
    assert not np.array_equal(frames, decode(vae, latents, 0.18215))


# --------------------------------------------------------------------------------------------------------
# The CLI on a real checkpoint (train.py on one CPU process) and its exports
# --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    from data_pipeline.toy_videos import make_tiny_vae

    return make_tiny_vae(tmp_path_factory.mktemp("vae") / "tiny_vae", downsample=8)  # 64 px <-> 8x8 latents


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("run")
    done = _one_process(root, "train.max_steps=3", "train.ckpt_every=3", "train.log_every=3", resume="none")
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "checkpoints"


def sample_cli(source, out: Path, *extra: str, vae=None) -> int:
    args = [
        str(source),
        "--out",
        str(out),
        "--num-samples",
        "2",
        "--steps",
        "ddim3",
        "--no-progress",
        "--save-latents",
        "--cfg-scale",
        "2",
        *extra,
    ]
    return main([*args, "--vae", str(vae)] if vae else args)


def latents_in(out: Path) -> list[np.ndarray]:
    return [np.load(out / f"sample_{i:04d}.npy") for i in range(2)]


def test_checkpoint_export_sample_round_trip(ckpt, vae_dir, tmp_path):
    from latte.export import main as export_main

    assert sample_cli(ckpt, tmp_path / "ema", vae=vae_dir) == 0
    ema = latents_in(tmp_path / "ema")
    assert ema[0].shape == (4, 4, 8, 8) and not np.array_equal(ema[0], ema[1])
    assert export_main([str(ckpt), str(tmp_path / "w.pt")]) == 0
    assert export_main([str(ckpt), str(tmp_path / "w.safetensors")]) == 0
    assert export_main([str(ckpt), str(tmp_path / "e.safetensors"), "--ema-only"]) == 0
    for name in ("w.pt", "w.safetensors", "e.safetensors"):
        out = tmp_path / name.replace(".", "_")
        assert sample_cli(tmp_path / name, out, "--config", str(TINY), vae=vae_dir) == 0
        assert all(np.array_equal(a, b) for a, b in zip(latents_in(out), ema, strict=True)), name

    assert sample_cli(ckpt / "step_00000003", tmp_path / "raw", "--weights", "model", vae=vae_dir) == 0
    assert (
        sample_cli(
            tmp_path / "w.pt", tmp_path / "raw_pt", "--config", str(TINY), "--weights", "model", vae=vae_dir
        )
        == 0
    )
    raw = latents_in(tmp_path / "raw")
    assert all(np.array_equal(a, b) for a, b in zip(latents_in(tmp_path / "raw_pt"), raw, strict=True))
    assert not np.array_equal(raw[0], ema[0])  # 3 steps of EMA decay 0.99 are not the raw weights


def test_cli_writes_decodable_videos_a_grid_and_a_gif(ckpt, vae_dir, tmp_path):
    import av
    from PIL import Image

    index = tmp_path / "latents" / "index.json"  # the dataset names the VAE and the factor
    write_index(index, str(vae_dir), 0.5)
    out = tmp_path / "videos"
    cmd = [
        sys.executable,
        "-m",
        "latte.sample",
        str(ckpt),
        "--out",
        str(out),
        "--num-samples",
        "3",
        "--steps",
        "ddim2",
        "--total-frames",
        "6",
        "--overlap",
        "2",
        "--set",
        f"data.index={index}",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"scaling factor 0.5 from dataset index {index}" in done.stdout
    assert "denoising" in done.stderr and "3 videos (6 frames, 64x64, 8 fps)" in done.stdout

    def frames_of(path: Path) -> list[np.ndarray]:
        with av.open(str(path)) as container:
            return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]

    for i in range(3):
        frames = frames_of(out / f"sample_{i:04d}.mp4")
        assert len(frames) == 6 and frames[0].shape == (64, 64, 3)
    grid = frames_of(out / "grid.mp4")  # 3 samples: 2 x 2 tiles of 64 px, 2 px apart
    assert len(grid) == 6 and grid[0].shape == (134, 134, 3)
    with Image.open(out / "grid.gif") as gif:
        assert gif.n_frames == 6 and gif.size == (134, 134)
    manifest = json.loads((out / "samples.json").read_text())
    assert [s["class"] for s in manifest["samples"]] == [0, 1, 2] and manifest["scaling_factor"] == 0.5
    assert not list(out.glob(".*")), "a temporary file was left behind"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--classes", "0,9"], "class 9 is out of range: the model has 4 classes, 0..3"),
        (
            ["--set", "model.name=Latte-S/2"],
            "weights in {ckpt}/step_00000003/ema_consolidated.pt do not fit "
            "Latte-S/2 (4 classes, 4 frames of 8²): 'pos_embed' is (1, 16, 64) in the file, "
            "(1, 16, 384) in the model",
        ),
        (["--vae", "{tmp}/no_such_vae"], "cannot load the VAE '{tmp}/no_such_vae'"),
        (
            ["--set", "data.index={tmp}/gone/index.json"],
            "no VAE: pass --vae (a diffusers AutoencoderKL directory "
            "or hub id) (the dataset index {tmp}/gone/index.json names none: FileNotFoundError",
        ),
        (["--classes", "1,x"], "--classes '1,x' must be comma-separated class indices"),
    ],
)
def test_bad_inputs_end_with_one_error_line(ckpt, vae_dir, tmp_path, capsys, extra, message):
    extra = [e.format(tmp=tmp_path) for e in extra]
    vae = None if "--vae" in extra or "index" in extra[-1] else vae_dir
    assert sample_cli(ckpt, tmp_path / "out", *extra, vae=vae) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert message.format(tmp=tmp_path, ckpt=ckpt) in err, err
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_sample_cli_imports_neither_data_pipeline_nor_deepspeed():
    heavy = "{'data_pipeline', 'deepspeed'}"
    code = f"import sys, latte.sample; print(sorted({{m.split('.')[0] for m in sys.modules}} & {heavy}))"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr


def test_weights_of_another_model_are_named_by_file_and_key(ckpt, tmp_path, capsys):
    from latte.export import main as export_main

    assert export_main([str(ckpt), str(tmp_path / "e.pt"), "--ema-only"]) == 0
    capsys.readouterr()
    cases = [
        (
            ["--config", str(TINY), "--set", "model.num_classes=7"],
            f"weights in {tmp_path / 'e.pt'} do not fit Latte-T/2 (7 classes, 4 frames of 8²): "
            "'y_embedder.embedding_table.weight' is (5, 64) in the file, (8, 64) in the model",
        ),
        ([], f"{tmp_path / 'e.pt'} holds weights only; pass --config"),
        (["--config", str(TINY), "--weights", "model"], f"{tmp_path / 'e.pt'} has no 'model' weights"),
    ]
    for extra, message in cases:
        assert sample_cli(tmp_path / "e.pt", tmp_path / "out", *extra, vae=tmp_path) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"error: {message}" or (err.startswith(f"error: {message}") and "\n" not in err), err
    with pytest.raises(ConfigError, match="sample.cfg_scale needs the 'no class' label"):
        load_config(TINY, ["model.class_dropout_prob=0", "sample.cfg_scale=4"])
