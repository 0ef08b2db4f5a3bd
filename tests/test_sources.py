"""Where training's batches come from: ``open_batches`` picks the synthetic stream or the dataset's loader by
``cfg.data.index``, both are ``BatchSource``s, and a bad dataset is a one-line ``ConfigError``. Also the
sample declaration (``latent_sample.FIELDS``) the batch keys follow from."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from make_shards import make_dataset, shard_name

from data_pipeline import latent_sample
from data_pipeline.index import load_index
from data_pipeline.latent_sample import (
    FIELDS,
    CorruptSample,
    SampleSpec,
    carried_fields,
    decode_sample,
    draw_batch,
)
from data_pipeline.loader import LatentLoader
from data_pipeline.shard_writer import npy_bytes
from data_pipeline.sources import BatchSource, open_batches
from data_pipeline.synthetic import SyntheticStream
from latte.config import ConfigError, load_config

TINY = "configs/tiny.yaml"  # 4 classes, 4 frames, 4 channels, 64 px / 8 = 8, micro-batch 8


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("toy")
    make_dataset(str(root), [8, 8], latent_shape=(4, 4, 8, 8), classes=4)
    return str(root)


def test_no_index_gives_the_synthetic_stream(tmp_path):
    cfg = load_config(TINY, ["train.gradient_accumulation_steps=2"])
    data = open_batches(cfg, 1, 2, "cpu")
    assert isinstance(data, SyntheticStream) and isinstance(data, BatchSource)
    assert data.facts is None and data.batch_keys == ("latent", "y")
    want = SyntheticStream(cfg.train.seed, 8, 4, 4, 4, 8, rank=1, world_size=2, accumulation=2)
    got, expected = next(iter(data)), next(iter(want))
    assert list(got) == ["latent", "y"] and got["latent"].shape == (8, 4, 4, 8, 8)
    assert all(torch.equal(got[k], expected[k]) for k in got)
    state = data.state_dict()
    again = open_batches(cfg, 1, 2, "cpu")
    again.load_state_dict(state)
    assert torch.equal(next(iter(again))["latent"], next(iter(data))["latent"])
    unconditional = open_batches(load_config(TINY, ["model.num_classes=0"]), 0, 1, "cpu")
    assert unconditional.batch_keys == ("latent",) and list(next(iter(unconditional))) == ["latent"]


def test_an_index_gives_its_loader_with_facts_and_state(toy):
    cfg = load_config(TINY, [f"data.index={toy}", "data.num_workers=0", "train.micro_batch_size=2"])
    data = open_batches(cfg, 0, 2, "cpu")
    assert isinstance(data, LatentLoader) and isinstance(data, BatchSource)
    assert data.facts == load_index(toy).facts and not data.pin_memory
    assert (data.layout.world_size, data.layout.batch_size, data.seed) == (2, 2, cfg.train.seed)
    assert data.infinite and data.batch_keys == ("latent", "y", "key")
    it = iter(data)
    first = next(it)
    assert list(first) == ["latent", "y", "key"] and first["latent"].shape == (2, 4, 4, 8, 8)
    state = data.state_dict()
    second = next(it)
    it.close()
    resumed = open_batches(cfg, 0, 2, "cpu")
    resumed.load_state_dict(state)
    assert next(iter(resumed))["key"] == second["key"]
    assert open_batches(cfg, 0, 1, "cuda").pin_memory  # batches pinned for non-blocking copies
    unconditional = open_batches(load_config(TINY, [f"data.index={toy}", "model.num_classes=0"]), 0, 1, "cpu")
    assert unconditional.batch_keys == ("latent", "key")


def test_a_bad_dataset_is_a_one_line_config_error(toy, tmp_path):
    nowhere = tmp_path / "nowhere"
    with pytest.raises(ConfigError) as info:
        open_batches(load_config(TINY, [f"data.index={nowhere}"]), 0, 1, "cpu")
    assert str(info.value).startswith(f"cannot read dataset index '{nowhere / 'index.json'}'")
    assert "\n" not in str(info.value)
    shutil.copytree(toy, tmp_path / "gap")
    (tmp_path / "gap" / shard_name("shard", 1)).unlink()
    with pytest.raises(ConfigError, match="does not exist") as info:
        open_batches(load_config(TINY, [f"data.index={tmp_path / 'gap'}"]), 0, 1, "cpu")
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match=r"has 4 classes, the config asks for 3"):
        open_batches(load_config(TINY, [f"data.index={toy}", "model.num_classes=3"]), 0, 1, "cpu")


# --------------------------------------------------------------------------------------------------------
# The sample declaration
# --------------------------------------------------------------------------------------------------------


def test_fields_carried_follow_the_index_facts(toy):
    facts = load_index(toy).facts
    assert [f.key for f in FIELDS] == ["latent", "y", "encoder_hidden_states"]
    assert SampleSpec.of(facts).batch_keys == ("latent", "y", "key")
    assert SampleSpec.of(facts).members == {"latent.npy", "latent_std.npy", "cls"}
    assert SampleSpec.of(facts, without=("y",)).members == {"latent.npy", "latent_std.npy"}
    assert [f.key for f in carried_fields({"classes": 0})] == ["latent"]
    with pytest.raises(ValueError, match="cannot be declined"):
        carried_fields(facts, without=("latent",))


def test_decode_and_draw_follow_the_spec(toy):
    facts = load_index(toy).facts
    rng = np.random.default_rng(0)
    mean = rng.standard_normal((4, 4, 8, 8)).astype(np.float16)
    std = rng.uniform(0.1, 0.5, (4, 4, 8, 8)).astype(np.float16)
    members = {"latent.npy": bytearray(npy_bytes(mean)), "latent_std.npy": bytearray(npy_bytes(std))}
    spec = SampleSpec.of(facts)
    with pytest.raises(CorruptSample, match="^sample 's/a' lacks cls$"):
        decode_sample("s/a", members, spec)
    with pytest.raises(CorruptSample, match=r"s/a.cls = 7 is outside \[0, 4\)"):
        decode_sample("s/a", {**members, "cls": bytearray(b"7")}, spec)
    samples = [decode_sample(f"s/{n}", {**members, "cls": bytearray(b"%d" % n)}, spec) for n in range(3)]
    batch = draw_batch(samples, spec, seed=5, epoch=1)
    assert list(batch) == ["latent", "y", "key"] and batch["key"] == ["s/0", "s/1", "s/2"]
    assert batch["y"].tolist() == [0, 1, 2] and batch["y"].dtype == torch.int64
    seed = latent_sample.noise_seed(5, 1, "s/2")
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(seed))
    want = eps * torch.from_numpy(std).float() + torch.from_numpy(mean).float()
    assert torch.equal(batch["latent"][2], want)
    plain = SampleSpec.of(facts, without=("y",))
    sample = decode_sample("s/0", members, plain)
    assert list(draw_batch([sample], plain, 5, 1, torch.bfloat16)) == ["latent", "key"]
