"""python -m latte.evaluate: the Fréchet distance against a direct computation, the real statistics' cache and
its protocol, the detector and length checks, mp4 fakes marked, 1 rank = 2 ranks, and fakes sampled from a
checkpoint equal to the same fakes read from latte.sample's latents. Tiny random detectors with the real
files' interfaces (tests/evaluation_fixture.py) stand in for I3D and Inception."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from evaluation_fixture import TinyI3D, TinyInception, save_detector
from PIL import Image
from test_sample import one_thread  # noqa: F401 - the tiny models' one-thread fixture (autouse)
from text_encoder_fixture import tiny_t5_dir

from data_pipeline.toy_videos import make_class_videos, make_video, synthetic_frames
from latte.evaluate import fake_takes, main
from latte.evaluation import EvaluationError
from latte.evaluation.clips import choose_reals, real_frames
from latte.evaluation.detectors import load_detector
from latte.evaluation.features import Item, Meter, combine, measure
from latte.evaluation.frechet import Moments, frechet_distance
from latte.evaluation.protocol import protocol_for
from latte.evaluation.stats import load_stats, save_stats
from latte.rendezvous import World, free_port

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
os.environ["HF_HUB_OFFLINE"] = "1"
FAKE_SEEDS = (100, 101, 102, 103)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> SimpleNamespace:
    """6 real mp4s of 50 frames in 2 class folders; 4 fakes of 16 frames as mp4s, PNG frame folders and .npy
    frames (the same pixels); the tiny detectors; the real FVD16 statistics (computed once by the CLI)."""
    root = tmp_path_factory.mktemp("evaluate")
    make_class_videos(root / "reals", num_classes=2, per_class=3, frames=50, size=64)
    for i, seed in enumerate(FAKE_SEEDS):
        frames = synthetic_frames(16, (64, 64), seed=seed)
        make_video(root / "mp4" / f"sample_{i:04d}.mp4", frames=16, size=(64, 64), fps=8, seed=seed)
        (root / "png" / f"sample_{i:04d}").mkdir(parents=True)
        for t, frame in enumerate(frames):
            Image.fromarray(frame).save(root / "png" / f"sample_{i:04d}" / f"{t:06d}.png")
        (root / "npy").mkdir(exist_ok=True)
        np.save(root / "npy" / f"sample_{i:04d}.npy", frames)
    d = SimpleNamespace(
        root=root,
        reals=root / "reals",
        i3d=save_detector(TinyI3D(), root / "i3d_torchscript.pt"),
        inception=save_detector(TinyInception(), root / "inception-2015-12-05.pt"),
        stats=root / "ucf101_stats.npz",
    )
    assert evaluate(d, "--reals", str(d.reals), "--fakes", str(root / "png")) == 0
    return d


def evaluate(d: SimpleNamespace, *extra: str, stats: Path | None = None, dataset: str = "ucf101") -> int:
    args = ["--dataset", dataset, "--real-stats", str(stats or d.stats), "--i3d", str(d.i3d), "--no-progress"]
    return main([*args, *extra])


def result_of(d: SimpleNamespace, out: Path, *extra: str, **kw) -> dict:
    assert evaluate(d, *extra, "--out", str(out), **kw) == 0
    return json.loads(out.read_text())


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


# --------------------------------------------------------------------------------------------------------
# The Fréchet distance and the moments
# --------------------------------------------------------------------------------------------------------


def direct_frechet(mu1, s1, mu2, s2) -> float:
    """|mu1 - mu2|² + tr s1 + tr s2 - 2 tr (s1^½ s2 s1^½)^½, from symmetric eigendecompositions only."""
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root1 @ s2 @ root1)
    return float(
        np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(np.clip(inner, 0, None)))
    )


def test_frechet_distance_matches_a_direct_computation():
    rng = np.random.default_rng(0)
    dim = 24
    a = rng.standard_normal((200, dim)).astype(np.float32)
    b = (rng.standard_normal((300, dim)) @ rng.standard_normal((dim, dim)) + 0.5).astype(np.float32)
    ma, mb = Moments.empty(dim), Moments.empty(dim)
    ma.add(a[:50])
    ma.add(a[50:])  # in parts, as batches arrive
    part = Moments.empty(dim)
    part.add(b[100:])
    mb.add(b[:100])
    mb.merge(part)  # as ranks' moments are combined
    mu_a, s_a = ma.mean_cov()
    mu_b, s_b = mb.mean_cov()
    np.testing.assert_allclose(mu_a, a.astype(np.float64).mean(0), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(
        s_b, np.cov(b.astype(np.float64), rowvar=False, bias=True), rtol=1e-9, atol=1e-12
    )
    ours, ref = frechet_distance(mu_a, s_a, mu_b, s_b), direct_frechet(mu_a, s_a, mu_b, s_b)
    assert ref > 1 and abs(ours - ref) <= 1e-9 * ref, (ours, ref)


def test_fvd_of_a_set_with_itself_is_zero():
    """600 clips through the tiny I3D (more clips than features: a full-rank covariance)."""
    g = torch.Generator().manual_seed(0)
    clips = torch.randint(0, 256, (600, 3, 16, 8, 8), dtype=torch.uint8, generator=g)
    with torch.no_grad():
        features = TinyI3D()(clips, rescale=True, resize=False, return_features=True).numpy()
    moments = Moments.empty(400)
    moments.add(features)
    mu, sigma = moments.mean_cov()
    assert np.trace(sigma) > 1
    assert abs(frechet_distance(mu, sigma, mu, sigma)) <= 1e-6


# --------------------------------------------------------------------------------------------------------
# The protocol: which frames, the statistics cache
# --------------------------------------------------------------------------------------------------------


def test_real_clips_follow_the_reference_sampling():
    fvd = protocol_for("fvd", "ucf101")
    assert (fvd.num_frames, fvd.real_frame_stride, fvd.num_reals, fvd.resolution, fvd.mirror) == (
        16,
        3,
        2048,
        256,
        False,
    )
    assert protocol_for("fvd", "taichi").real_frame_stride == 6  # Vchitect/Latte#115
    assert choose_reals([50, 30, 48, 47, 90], fvd) == [0, 2, 4]  # fewer than 16 x 3 frames: left out
    many = choose_reals([48] * 3000, fvd)
    assert len(many) == 2048 and many == sorted(set(many)) and many == choose_reals([48] * 3000, fvd)
    starts = set()
    for position in range(40):
        frames = real_frames(50, position, fvd)
        assert len(frames) == 16 and np.all(np.diff(frames) == 3) and 0 <= frames[0] and frames[-1] <= 49
        starts.add(frames[0])
    assert starts == set(range(5))  # uniform over [0, 50 - 48 + 2]
    fid = protocol_for("fid", "ucf101")
    assert real_frames(7, 0, fid) == list(range(7)) and choose_reals([3, 0, 5], fid) == [0, 2]
    # fakes: FVD16 the first 16 frames of the first 2048 videos, FID every frame up to 50,000 in all
    takes = fake_takes([20] * 2600, [fvd, fid])
    assert takes[0] == (16, 20) and takes[2047] == (16, 20) and takes[2048] == (0, 20)
    assert sum(t[1] for t in takes) == 50_000 and takes[2500] == (0, 0)


def test_real_statistics_are_cached_with_their_protocol(data, tmp_path, capsys):
    fvd = protocol_for("fvd", "ucf101")
    stats = load_stats(data.stats, fvd)
    assert stats.mu.shape == (400,) and stats.sigma.shape == (400, 400) and stats.count == 6
    assert stats.info["videos_found"] == 6 and stats.info["videos_measured"] == 6
    copy = tmp_path / "copy.npz"
    save_stats(copy, fvd, stats)
    again = load_stats(copy, fvd)
    assert (
        np.array_equal(again.mu, stats.mu)
        and np.array_equal(again.sigma, stats.sigma)
        and again.info == stats.info
    )
    assert load_stats(copy, protocol_for("fid", "ucf101")) is None  # another metric: not in the file

    with pytest.raises(EvaluationError) as raised:
        load_stats(copy, protocol_for("fvd", "taichi"))
    message = str(raised.value)
    assert (
        "\n" not in message
        and "real_frame_stride 3 != 6" in message
        and "dataset 'ucf101' != 'taichi'" in message
    )
    assert evaluate(data, "--fakes", str(data.root / "png"), dataset="taichi") == 2
    assert "holds fvd16 statistics of another protocol" in one_error_line(capsys)

    assert (
        evaluate(
            data, "--fakes", str(data.root / "png"), "--metrics", "fid", "--inception", str(data.inception)
        )
        == 2
    )
    assert "holds no fid statistics: give --reals DIR" in one_error_line(capsys)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    assert evaluate(data, "--fakes", str(data.root / "png"), stats=tmp_path / "junk.npz") == 2
    assert "is not a statistics file of latte.evaluate" in one_error_line(capsys)


def test_fid_on_frames_one_rank_or_two(data):
    """FID's path (every real frame, the fakes' frames) with a narrow Inception stand-in (a 2048-wide
    sqrtm takes ~20 s here); two ranks' shares combined equal one rank's."""
    fid = dataclasses.replace(protocol_for("fid", "custom"), feature_dim=64)
    path = data.root / "narrow_inception.pt"
    detector = load_detector(save_detector(TinyInception(dim=64), path), "inception", 64, CPU)
    from latte.evaluate import PyAvReader
    from latte.evaluation.video_sets import real_videos

    videos = real_videos(data.reals, PyAvReader()).videos
    items = [Item(v, list(range(v.length)), (v.length,)) for v in videos]

    def moments_on(world_size: int) -> Moments:
        meters = []
        for rank in range(world_size):
            meters.append(Meter(fid, detector))
            measure(items, [meters[-1]], 2, World(rank, world_size, rank, CPU), lambda: None)
        total = Moments.empty(64)
        for m in meters:
            total.merge(m.moments)
        return total

    one, two = moments_on(1), moments_on(2)
    assert one.count == two.count == 300  # every frame of 6 videos of 50
    mu1, s1 = one.mean_cov()
    mu2, s2 = two.mean_cov()
    np.testing.assert_allclose(s2, s1, rtol=1e-9, atol=1e-12)
    assert combine([Meter(fid, detector)], World(0, 1, 0, CPU))[0].count == 0  # a world of one: its own
    shifted = frechet_distance(mu1, s1, mu1 + 0.1, s1)  # the same covariance: |0.1|² x 64 only
    assert shifted == pytest.approx(64 * 0.01, abs=1e-3)


# --------------------------------------------------------------------------------------------------------
# Bad input: one line each
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case, message",
    [
        ("inception as i3d", "is not an I3D video detector: called as one it fails"),
        ("narrow i3d", "is not an I3D video detector: it gives features of shape (1, 64) per input"),
        ("i3d as inception", "is not an Inception image detector"),
        ("state dict", "is not a TorchScript module"),
        ("missing", "does not exist: give an I3D video detector (i3d_torchscript.pt from https://"),
    ],
)
def test_a_detector_of_the_wrong_kind_is_refused_in_one_line(data, tmp_path, capsys, case, message):
    fakes = ["--fakes", str(data.root / "png")]
    if case == "inception as i3d":
        args, named = ["--i3d", str(data.inception)], data.inception
    elif case == "narrow i3d":
        named = save_detector(TinyI3D(dim=64), tmp_path / "narrow.pt")
        args = ["--i3d", str(named)]
    elif case == "i3d as inception":
        args, named = ["--metrics", "fid", "--inception", str(data.i3d), "--reals", str(data.reals)], data.i3d
    elif case == "state dict":
        named = tmp_path / "weights.pt"
        torch.save(TinyI3D().state_dict(), named)
        args = ["--i3d", str(named)]
    else:
        named = tmp_path / "nowhere.pt"
        args = ["--i3d", str(named)]
    assert evaluate(data, *fakes, *args, stats=tmp_path / "s.npz" if "inception" in case else None) == 2
    err = one_error_line(capsys)
    assert message in err and str(named) in err, err
    assert not (tmp_path / "s.npz").exists()  # refused before any work


def test_videos_shorter_than_the_protocol_needs_are_refused(data, tmp_path, capsys):
    for i in range(2):
        make_video(tmp_path / "short" / f"sample_{i:04d}.mp4", frames=8, size=(64, 64), seed=i)
    assert evaluate(data, "--fakes", str(tmp_path / "short")) == 2
    assert "fake video sample_0000.mp4 has 8 frames; fvd16 measures the first 16 frames" in one_error_line(
        capsys
    )

    make_class_videos(tmp_path / "short_reals", num_classes=1, per_class=2, frames=30, size=64)
    stats = tmp_path / "short.npz"
    code = evaluate(
        data, "--reals", str(tmp_path / "short_reals"), "--fakes", str(data.root / "png"), stats=stats
    )
    assert code == 2
    err = one_error_line(capsys)
    assert "no real video under" in err and "has the 48 frames fvd16 needs (16 frames, one every 3)" in err
    assert not stats.exists()


# --------------------------------------------------------------------------------------------------------
# Results: mp4 fakes marked, frame folders = .npy frames, 1 rank = 2 ranks
# --------------------------------------------------------------------------------------------------------


def test_mp4_fakes_are_marked_not_comparable_to_the_paper(data, tmp_path):
    mp4 = result_of(data, tmp_path / "mp4.json", "--fakes", str(data.root / "mp4"))
    png = result_of(data, tmp_path / "png.json", "--fakes", str(data.root / "png"))
    npy = result_of(data, tmp_path / "npy.json", "--fakes", str(data.root / "npy"))
    assert mp4["fakes"]["lossy"] and not png["fakes"]["lossy"] and not npy["fakes"]["lossy"]
    assert not mp4["comparable_to_paper"] and any("lossy videos (mp4)" in r for r in mp4["not_comparable"])
    assert not any(
        "lossy" in r for r in png["not_comparable"]
    )  # (6 reals and 4 fakes: still not the paper's)
    assert png["results"]["fvd16"] == npy["results"]["fvd16"] > 0  # the same pixels
    assert abs(mp4["results"]["fvd16"] - png["results"]["fvd16"]) < 0.05 * png["results"]["fvd16"]  # crf 10
    assert png["protocols"]["fvd16"]["real_split"].startswith("UCF-101: all 13,320 videos")
    assert png["reals"]["fvd16"]["videos_found"] == 6 and png["fakes"]["features"] == {"fvd16": 4}
    assert png["paper_fvd16_latte"] == 477.97


def test_one_and_two_ranks_give_the_same_result(data, tmp_path):
    one = result_of(
        data,
        tmp_path / "one.json",
        "--reals",
        str(data.reals),
        "--fakes",
        str(data.root / "mp4"),
        "--batch-size",
        "2",
        stats=tmp_path / "one.npz",
    )
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        "-m",
        "latte.evaluate",
        "--dataset",
        "ucf101",
        "--reals",
        str(data.reals),
        "--real-stats",
        str(tmp_path / "two.npz"),
        "--i3d",
        str(data.i3d),
        "--fakes",
        str(data.root / "mp4"),
        "--batch-size",
        "2",
        "--no-progress",
        "--out",
        str(tmp_path / "two.json"),
    ]
    done = subprocess.run(
        cmd, cwd=REPO, env=dict(env, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1
    a, b = one["results"]["fvd16"], two["results"]["fvd16"]
    assert abs(a - b) <= 1e-6 * abs(a), (a, b)
    fvd = protocol_for("fvd", "ucf101")
    s1, s2 = load_stats(tmp_path / "one.npz", fvd), load_stats(tmp_path / "two.npz", fvd)
    np.testing.assert_allclose(s2.sigma, s1.sigma, rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------------------------------------
# Fakes sampled from a checkpoint = the same fakes read from latte.sample's latents
# --------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_fakes_sampled_from_a_checkpoint_equal_latte_samples_latents(data, tmp_path):
    from test_checkpoint import _one_process

    from data_pipeline.toy_videos import make_tiny_vae
    from latte.sample import main as sample_main

    done = _one_process(
        tmp_path / "run", "train.max_steps=2", "train.ckpt_every=2", "train.log_every=2", resume="none"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ckpt = tmp_path / "run" / "checkpoints"
    vae = make_tiny_vae(tmp_path / "vae", downsample=8)  # 8x8 latents <-> 64 px
    sampling = ["--steps", "ddim2", "--seed", "3", "--set", "sample.total_frames=16", "--vae", str(vae)]
    made = result_of(
        data,
        tmp_path / "made.json",
        "--checkpoint",
        str(ckpt),
        "--num-videos",
        "3",
        "--batch-size",
        "1",
        *sampling,
    )
    assert made["fakes"]["features"] == {"fvd16": 3} and not made["fakes"]["lossy"]
    assert "3 videos sampled from" in made["fakes"]["source"]
    out = tmp_path / "samples"
    assert (
        sample_main(
            [str(ckpt), "--out", str(out), "--num-samples", "3", "--save-latents", "--no-progress", *sampling]
        )
        == 0
    )
    read = result_of(
        data, tmp_path / "read.json", "--fakes", str(out), "--batch-size", "1", "--vae", str(vae)
    )
    assert read["fakes"]["source"].startswith("latents in") and not read["fakes"]["lossy"]
    assert read["results"]["fvd16"] == pytest.approx(made["results"]["fvd16"], rel=1e-9)


def test_help_runs():
    done = subprocess.run(
        [sys.executable, "-m", "latte.evaluate", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and "--real-stats" in done.stdout and "--checkpoint" in done.stdout


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory) -> str:
    return tiny_t5_dir(tmp_path_factory)


@pytest.mark.slow
def test_a_text_to_video_checkpoint_is_evaluated_from_prompts(data, tmp_path, tiny_t5, capsys):
    """``--checkpoint`` of a LatteT2V run with ``--prompt`` (cycled) and ``--text-encoder``: the fakes are
    sampled from the prompts, the result says so; the same flags without a checkpoint are one line."""
    from test_checkpoint import _env

    from data_pipeline.toy_videos import make_tiny_vae

    cmd = [sys.executable, "train.py", "--config", "configs/tiny_t2v.yaml", "--resume", "none", "--set"]
    cmd += [f"train.results_dir={tmp_path / 'run'}", "train.max_steps=2", "train.ckpt_every=2"]
    done = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    vae = make_tiny_vae(tmp_path / "vae", downsample=8)
    made = result_of(
        data,
        tmp_path / "t2v.json",
        "--checkpoint",
        str(tmp_path / "run" / "checkpoints"),
        "--num-videos",
        "2",
        "--batch-size",
        "2",
        "--steps",
        "ddim2",
        "--cfg-scale",
        "4",
        "--set",
        "sample.total_frames=16",
        "--vae",
        str(vae),
        "--text-encoder",
        tiny_t5,
        "--prompt",
        "a red square moving left",
        "--prompt",
        "a blue square moving up",
    )
    assert made["fakes"]["features"] == {"fvd16": 2} and made["results"]["fvd16"] > 0
    assert "2 prompts cycled, the first 'a red square moving left'" in made["fakes"]["source"]
    assert evaluate(data, "--fakes", str(data.root / "png"), "--prompt", "a cat") == 2
    assert "sample from --checkpoint" in capsys.readouterr().err
