"""Captions in the shards: the text encoder API, the sharding job with captions on real videos (tiny VAE,
tiny random T5), the index's caption facts and null caption, bad captions (too long: cut and counted;
missing: a failed input), the loader's padded embeddings and masks, exact resume with captions, the
config's caption width, the synthetic stream's captions, and captioning existing shards (add_captions)."""

from __future__ import annotations

import contextlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from make_shards import CAPTION_TOKENS, make_dataset, toy_caption
from text_encoder_fixture import tiny_t5_dir

from data_pipeline.add_captions import main as add_captions
from data_pipeline.index import load_index, load_null_caption
from data_pipeline.latent_sample import CorruptSample, SampleSpec, decode_sample
from data_pipeline.loader import Expected, IndexMismatchError, LatentLoader
from data_pipeline.shard_latents import main as shard_latents
from data_pipeline.shard_writer import npy_bytes
from data_pipeline.synthetic import CAPTION_TOKENS as SYNTHETIC_TOKENS
from data_pipeline.synthetic import SyntheticStream
from data_pipeline.text_encoder import load_text_encoder, pad_captions
from data_pipeline.toy_videos import make_tiny_vae, make_video
from data_pipeline.video import ClipSpec, list_inputs, plan_windows, window_slots

MAX_TOKENS = 48  # the tiny tokenizer's pieces are short: ~20 tokens a sentence
OPTIONS = (
    "--num-frames 4 --frame-interval 2 --clips-per-video 3 --image-size 32 --samples-per-shard 6 --flip "
    f"--workers 0 --no-progress --sorted --max-caption-tokens {MAX_TOKENS}"
).split()
LONG = " ".join(["a dog runs on the beach at sunset"] * 6)  # far more than MAX_TOKENS tokens
VIDEOS = {  # name -> (frames, manifest entry beyond the path)
    "v0.mp4": (24, {"caption": "a dog runs on the beach"}),
    "v1.mp4": (16, {"captions": ["a cat sleeps", "waves crash on rocks", "a man rides a bicycle"]}),
    "short.mp4": (5, {"captions": ["two children play", "never used", "a square moves"]}),
    "long.mp4": (16, {"caption": LONG}),
    "nocap.mp4": (16, {}),
    "twocaps.mp4": (16, {"captions": ["one", "two"]}),
}


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory) -> str:
    return tiny_t5_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("captions")
    lines = []
    for seed, (name, (frames, entry)) in enumerate(VIDEOS.items()):
        make_video(root / "videos" / name, frames, (64, 48), seed=seed)
        lines.append(json.dumps({"path": f"videos/{name}", **entry}))
    (root / "list.jsonl").write_text("\n".join(lines) + "\n")
    make_tiny_vae(root / "vae")
    return root


def run(data: Path, output: Path, *extra: str, text_encoder: str | None = None) -> int:
    args = ["--input", str(data / "list.jsonl"), "--output", str(output), "--vae", str(data / "vae")]
    return shard_latents(
        [*args, *OPTIONS, *(["--text-encoder", text_encoder] if text_encoder else []), *extra]
    )


@pytest.fixture(scope="module")
def captioned(data, tiny_t5) -> tuple[Path, str]:
    """One sharding run with captions: (output, its summary line)."""
    out = data / "out-captions"
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert run(data, out, text_encoder=tiny_t5) == 0
    return out, buffer.getvalue()


@pytest.fixture(scope="module")
def encoder(tiny_t5):
    return load_text_encoder(tiny_t5, max_length=MAX_TOKENS)


def tar_samples(root: Path) -> dict[str, dict[str, bytes]]:
    """key -> {suffix: bytes} over every shard of a dataset, read with tarfile."""
    out: dict[str, dict[str, bytes]] = {}
    for shard in load_index(str(root)).shards:
        with tarfile.open(root / shard.url) as tar:
            for member in tar:
                key, suffix = member.name.split(".", 1)
                out.setdefault(key, {})[suffix] = tar.extractfile(member).read()
    return out


def expected_caption(source: str, clip: int, total_frames: int) -> str:
    entry = VIDEOS[Path(source).name][1]
    if "caption" in entry:
        return entry["caption"]
    spec = ClipSpec(num_frames=4, frame_interval=2, clips_per_video=3)
    return entry["captions"][window_slots(total_frames, spec)[clip]]


# --------------------------------------------------------------------------------------------------------
# The text encoder API
# --------------------------------------------------------------------------------------------------------


def test_encode_is_unpadded_float16_and_counts_truncation(encoder):
    assert (
        encoder.width == 32
        and encoder.max_length == MAX_TOKENS
        and Path(encoder.name).name.startswith("tiny_t5")
    )
    texts = ["", "a dog runs", LONG]
    embeds, truncated = encoder.encode(texts)
    lengths = [min(n, MAX_TOKENS) for n in encoder.token_counts(texts)]
    assert [e.shape for e in embeds] == [(n, 32) for n in lengths] and embeds[0].shape == (1, 32)
    assert all(e.dtype == np.float16 for e in embeds) and truncated == 1
    alone, none_cut = encoder.encode(["a dog runs"])  # independent of the batch (padding is masked out)
    np.testing.assert_allclose(alone[0].astype(np.float32), embeds[1].astype(np.float32), atol=2e-3)
    assert none_cut == 0
    hidden, mask = pad_captions(embeds, MAX_TOKENS)
    assert hidden.shape == (3, MAX_TOKENS, 32) and hidden.dtype == torch.float32 and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == lengths
    for i, e in enumerate(embeds):
        assert torch.equal(hidden[i, : len(e)], torch.from_numpy(e).float())
        assert not hidden[i, len(e) :].any()
    with pytest.raises(ValueError, match="expected"):
        pad_captions(embeds, 2)


def test_manifest_formats(tmp_path):
    (tmp_path / "list.csv").write_text('path,label,caption\nb.mp4,1,"a dog, running"\na.mp4,0,\n')
    inputs, classes = list_inputs(str(tmp_path / "list.csv"))
    assert classes == ["0", "1"] and [v.captions for v in inputs] == [None, ("a dog, running",)]
    (tmp_path / "old.csv").write_text("a.mp4,3\n")  # no header: the second column is the label, as before
    assert list_inputs(str(tmp_path / "old.csv"))[0][0].label == 3
    (tmp_path / "list.jsonl").write_text('{"path": "a.mp4", "captions": ["x", "y"]}\n{"path": "b.mp4"}\n')
    assert [v.captions for v in list_inputs(str(tmp_path / "list.jsonl"))[0]] == [("x", "y"), None]
    spec = ClipSpec(num_frames=4, frame_interval=2, clips_per_video=3)
    assert window_slots(24, spec) == [0, 1, 2] and len(plan_windows(24, spec)[1]) == 3
    assert window_slots(5, spec) == [0, 2] and len(plan_windows(5, spec)[1]) == 2  # 2 distinct windows


# --------------------------------------------------------------------------------------------------------
# The sharding job with captions
# --------------------------------------------------------------------------------------------------------


def test_sharding_with_captions_index_and_samples(captioned, encoder, tiny_t5):
    out, summary = captioned
    index = load_index(str(out))
    facts = index.facts
    assert (facts.text_encoder, facts.caption_channels, facts.max_caption_tokens) == (tiny_t5, 32, MAX_TOKENS)
    assert facts.null_caption == "null_caption.npy" and (out / "null_caption.npy").is_file()
    null = load_null_caption(str(out))
    assert null.shape == (1, 32) and null.dtype == np.float16
    np.testing.assert_array_equal(null, encoder.encode([""])[0][0])
    raw = json.loads((out / "index.json").read_text())
    assert raw["captions_truncated"] == index.captions_truncated == 1  # long.mp4's one caption
    assert "captions truncated 1" in summary and "videos ok 4, failed 2" in summary
    failed = {Path(f["input"]).name: f["error"] for f in index.failed}
    assert failed == {
        "nocap.mp4": "no caption in the manifest",
        "twocaps.mp4": "the manifest gives 2 captions; one, or one per clip window (3), is needed",
    }
    samples = tar_samples(out)
    assert len(samples) == index.num_samples == (3 + 3 + 2 + 3) * 2  # windows x (clip + flip)
    for key, sample in samples.items():
        meta = json.loads(sample["json"])
        text = sample["caption.txt"].decode()
        assert text == expected_caption(meta["source"], meta["clip"], meta["num_video_frames"]), key
        embedding = np.load(io.BytesIO(sample["caption.npy"]))
        assert embedding.dtype == np.float16 and embedding.shape[1] == 32
        assert embedding.shape[0] == meta["caption_tokens"] <= MAX_TOKENS
        assert meta["caption_truncated"] == (text == LONG)
        (want,), _ = encoder.encode([text])
        np.testing.assert_allclose(embedding.astype(np.float32), want.astype(np.float32), atol=2e-3)
    short = [json.loads(s["json"]) for s in samples.values() if "short" in json.loads(s["json"])["source"]]
    assert sorted({(m["clip"], samples_text(samples, m)) for m in short}) == [
        (0, "two children play"),
        (1, "a square moves"),  # the second of 2 windows took slot 2 of 3
    ]


def samples_text(samples: dict, meta: dict) -> str:
    key = f"{meta['input_index']:08d}_c{meta['clip']:02d}" + ("_flip" if meta["flipped"] else "")
    return samples[key]["caption.txt"].decode()


def test_text_encoder_needs_captions_and_a_loadable_encoder(data, tiny_t5, tmp_path, capsys):
    args = ["--output", str(tmp_path / "o"), "--vae", str(data / "vae")]
    assert shard_latents(["--input", str(data / "videos"), *args, "--text-encoder", tiny_t5]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "gives no captions" in err[0]
    assert shard_latents(["--input", str(data / "list.jsonl"), *args, "--text-encoder", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: cannot load the text encoder '{tmp_path}'")


# --------------------------------------------------------------------------------------------------------
# The loader: padded embeddings and masks, resume, the config's expectations
# --------------------------------------------------------------------------------------------------------


def take(loader: LatentLoader, n: int | None = None) -> list[dict]:
    it = iter(loader)
    out = [next(it) for _ in range(n)] if n is not None else list(it)
    it.close()
    return out


def test_loader_pads_the_stored_captions(captioned):
    out, _ = captioned
    samples = tar_samples(out)
    loader = LatentLoader(
        str(out), batch_size=4, seed=1, shuffle_buffer=8, expected=Expected(caption_channels=32)
    )
    assert loader.batch_keys == ("latent", "encoder_hidden_states", "encoder_attention_mask", "key")
    seen = 0
    for batch in take(loader):
        hidden, mask = batch["encoder_hidden_states"], batch["encoder_attention_mask"]
        assert hidden.shape == (4, MAX_TOKENS, 32) and hidden.dtype == torch.float32
        assert mask.shape == (4, MAX_TOKENS) and mask.dtype == torch.bool
        for i, sample_id in enumerate(batch["key"]):
            stored = np.load(io.BytesIO(samples[sample_id.rsplit("/", 1)[1]]["caption.npy"]))
            n = stored.shape[0]
            assert torch.equal(hidden[i, :n], torch.from_numpy(stored).float()) and not hidden[i, n:].any()
            assert mask[i].tolist() == [True] * n + [False] * (MAX_TOKENS - n)
            seen += 1
    assert seen == len(loader) * 4 > 0


@pytest.fixture(scope="module")
def toy_captioned(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("toy-captions")
    make_dataset(str(root), [5, 7, 3, 8, 6], caption_width=16)
    return str(root / "index.json")


def assert_same(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g["key"] == w["key"] and list(g) == list(w)
        assert all(torch.equal(g[k], w[k]) for k in g if k != "key")


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_with_captions_is_exact(toy_captioned, workers):
    kw = {"batch_size": 3, "shuffle_buffer": 8, "seed": 7, "rank": 1, "world_size": 2, "infinite": True}
    kw["num_workers"] = workers
    reference_loader = LatentLoader(toy_captioned, **kw)
    per_epoch = len(reference_loader)
    reference = take(reference_loader, per_epoch + 2)
    for k in [1, per_epoch - 1, per_epoch + 1] if workers else range(per_epoch + 1):
        first = LatentLoader(toy_captioned, **kw)
        assert_same(take(first, k), reference[:k])
        state = json.loads(json.dumps(first.state_dict()))
        resumed = LatentLoader(toy_captioned, **kw)
        resumed.load_state_dict(state)
        assert_same(take(resumed, per_epoch + 2 - k), reference[k:])
    for batch in reference:  # every batch's captions are the stored ones, padded
        for i, sample_id in enumerate(batch["key"]):
            n = int(sample_id.rsplit("clip", 1)[1])
            stored = torch.from_numpy(toy_caption(0, n, 16)).float()
            assert torch.equal(batch["encoder_hidden_states"][i, : len(stored)], stored)
            assert batch["encoder_attention_mask"][i].sum() == len(stored)
            assert batch["encoder_hidden_states"].shape[1] == CAPTION_TOKENS


def test_epoch_with_captions_yields_every_sample_once(toy_captioned):
    loaders = [LatentLoader(toy_captioned, 3, rank=r, world_size=2, shuffle_buffer=8) for r in range(2)]
    seen = [k for loader in loaders for b in take(loader) for k in b["key"]]
    assert len(seen) == len(set(seen)) and len(seen) >= 29 - 2 * 3


def test_caption_expectations(toy_captioned, tmp_path):
    with pytest.raises(
        IndexMismatchError, match="holds captions of width 16 .*the config expects 64"
    ) as info:
        LatentLoader(toy_captioned, 3, expected=Expected(caption_channels=64))
    assert "\n" not in str(info.value) and "toy-t5" in str(info.value)
    make_dataset(str(tmp_path), [4, 4])
    with pytest.raises(IndexMismatchError, match="has no captions, the config asks for captions of width 16"):
        LatentLoader(str(tmp_path), 3, expected=Expected(caption_channels=16))
    (declined,) = take(LatentLoader(toy_captioned, 3, expected=Expected(caption_channels=0)), 1)
    assert set(declined) == {"latent", "y", "key"}
    assert load_null_caption(str(tmp_path)) is None  # a dataset without captions
    plain = json.loads((tmp_path / "index.json").read_text())
    assert "text_encoder" not in plain["facts"] and "captions_truncated" not in plain  # as before


def test_corrupt_caption_is_a_corrupt_sample(toy_captioned):
    facts = load_index(toy_captioned).facts
    spec = SampleSpec.of(facts, without=("y",))
    mean = np.zeros(facts.latent_shape, np.float16)
    members = {"latent.npy": bytearray(npy_bytes(mean)), "latent_std.npy": bytearray(npy_bytes(mean))}
    for bad in (np.zeros((3, 8), np.float16), np.zeros((CAPTION_TOKENS + 1, 16), np.float16)):
        with pytest.raises(
            CorruptSample, match=r"s/a.caption.npy holds float16.*promises float16\[1..8, 16\]"
        ):
            decode_sample("s/a", {**members, "caption.npy": bytearray(npy_bytes(bad))}, spec)
    with pytest.raises(CorruptSample, match="lacks caption.npy"):
        decode_sample("s/a", members, spec)


def test_open_batches_passes_the_config_caption_width(toy_captioned):
    from data_pipeline.sources import open_batches
    from latte.config import ConfigError, load_config

    root = str(Path(toy_captioned).parent)
    cfg = load_config("configs/tiny.yaml", [f"data.index={root}", "data.num_workers=0"])
    assert "encoder_hidden_states" not in open_batches(cfg, 0, 1, "cpu").batch_keys  # caption_channels 0
    t2v = load_config("configs/tiny_t2v.yaml", [f"data.index={root}", "data.num_workers=0"])  # width 32
    with pytest.raises(ConfigError, match="width 16 .*the config expects 32"):
        open_batches(t2v, 0, 1, "cpu")


# --------------------------------------------------------------------------------------------------------
# The synthetic stream
# --------------------------------------------------------------------------------------------------------


def test_synthetic_stream_with_captions():
    plain = next(iter(SyntheticStream(3, 4, 2, 4, 4, 8)))
    stream = SyntheticStream(3, 4, 2, 4, 4, 8, caption_channels=16)
    assert stream.batch_keys == ("latent", "y", "encoder_hidden_states", "encoder_attention_mask")
    it = iter(stream)
    first, second = next(it), next(it)
    assert torch.equal(first["latent"], plain["latent"])  # captions do not change the latents
    hidden, mask = first["encoder_hidden_states"], first["encoder_attention_mask"]
    assert hidden.shape == (4, SYNTHETIC_TOKENS, 16) and mask.shape == (4, SYNTHETIC_TOKENS)
    assert mask[:, 0].all() and not (hidden * ~mask[..., None]).any()
    lengths = mask.sum(1)
    assert torch.equal(mask, torch.arange(SYNTHETIC_TOKENS)[None] < lengths[:, None])  # the first k real
    resumed = SyntheticStream(3, 4, 2, 4, 4, 8, caption_channels=16)
    resumed.load_state_dict({**stream.state_dict(), "step": 1, "micro": 0})
    again = next(iter(resumed))
    assert all(torch.equal(again[k], second[k]) for k in second)


# --------------------------------------------------------------------------------------------------------
# Captioning existing shards
# --------------------------------------------------------------------------------------------------------


def test_add_captions_to_existing_shards_equals_sharding_with_captions(data, captioned, tiny_t5, capsys):
    plain = data / "out-plain"
    assert run(data, plain) == 0  # the same job without captions: nocap/twocaps are sharded too
    assert not load_index(str(plain)).facts.has_captions
    out = data / "out-added"
    argv = ["--index", str(plain), "--manifest", str(data / "list.jsonl"), "--text-encoder", tiny_t5]
    argv += ["--output", str(out), "--max-caption-tokens", str(MAX_TOKENS)]
    capsys.readouterr()
    assert add_captions(argv) == 0
    assert "captions truncated 1" in capsys.readouterr().out
    added, direct = load_index(str(out)), load_index(str(captioned[0]))
    assert added.facts == direct.facts and added.captions_truncated == 1
    assert {Path(f["input"]).name: f["error"] for f in added.failed} == {
        Path(f["input"]).name: f["error"] for f in direct.failed
    }
    np.testing.assert_array_equal(load_null_caption(str(out)), load_null_caption(str(captioned[0])))
    a, d = tar_samples(out), tar_samples(captioned[0])
    assert a.keys() == d.keys()
    for key in d:
        assert a[key] == d[key], key  # every member byte for byte, captions included
    assert add_captions([*argv[:-4], "--output", str(plain)]) == 2  # never in place
    assert "must differ" in capsys.readouterr().err
