"""The streaming latent loader: exact once-per-epoch coverage, exact resume (same and other world sizes),
faults (S3 restarts, corrupt samples, truncated shards, missing files) and checks against the config.

Ranks are simulated in one process (``rank`` / ``world_size`` arguments); every rank yields the same
number of batches, so "all ranks took k batches" is a well-defined point to interrupt at.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import tarfile
import threading
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import webdataset
from make_shards import make_dataset, read_samples, shard_name

from data_pipeline import s3_opener, storage
from data_pipeline.index import DatasetIndexError
from data_pipeline.latent_sample import noise_seed
from data_pipeline.loader import (
    DatasetUnreadableError,
    Expected,
    IndexMismatchError,
    LatentLoader,
    LoaderError,
)
from data_pipeline.shard_reader import TarCursor

COUNTS = [5, 7, 3, 8, 6, 4, 7, 5, 9]  # 54 samples in 9 shards of varied size
BATCH, BUFFER, SEED = 3, 8, 7


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("toy")
    make_dataset(str(root), COUNTS)
    return str(root / "index.json")


@pytest.fixture(scope="module")
def toy_samples(toy):
    return read_samples(toy)


def make(url: str, rank: int = 0, world: int = 1, workers: int = 0, **kw) -> LatentLoader:
    kw = {"batch_size": BATCH, "shuffle_buffer": BUFFER, "seed": SEED, **kw}
    return LatentLoader(url, rank=rank, world_size=world, num_workers=workers, **kw)


def take(loader: LatentLoader, n: int) -> list[dict]:
    """n batches, then the iterator is closed (its workers stop) as a training job's would on exit."""
    it = iter(loader)
    out = [next(it) for _ in range(n)]
    it.close()
    return out


def keys(batches: list[dict]) -> list[str]:
    return [k for b in batches for k in b["key"]]


def assert_same(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g["key"] == w["key"]
        assert torch.equal(g["latent"], w["latent"]) and torch.equal(g["y"], w["y"])


def expected_latent(sample, seed: int, epoch: int, sample_id: str) -> torch.Tensor:
    """mean + std * eps, recomputed from the tar contents read by ``tarfile`` (not by the loader)."""
    mean, std, _ = sample
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(noise_seed(seed, epoch, sample_id)))
    return eps * torch.from_numpy(std).float() + torch.from_numpy(mean).float()


def assert_equalisation(plan, dropped: int) -> None:
    """What an epoch did not yield is what the plan says it drops, and within the documented bound: per
    rank, fewer than one shard plus (B - 1) per stream."""
    assert dropped == plan.dropped
    for streams in plan.ranks:
        held = sum(s.slots for s in streams)
        assert held - plan.batches * BATCH <= max(COUNTS) + len(streams) * (BATCH - 1)


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


# --------------------------------------------------------------------------------------------------------
# One epoch: every sample exactly once (minus the documented equalisation), equal batch counts
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_epoch_yields_every_sample_once(toy, toy_samples, world, workers):
    loaders = [make(toy, r, world, workers) for r in range(world)]
    plan, planned = loaders[0]._plan(), len(loaders[0])
    per_rank = [list(loader) for loader in loaders]
    assert {len(b) for b in per_rank} == {plan.batches} and plan.batches == planned > 0
    seen = [k for batches in per_rank for k in keys(batches)]
    assert len(seen) == len(set(seen)), "a sample was yielded twice"
    assert set(seen) <= set(toy_samples)
    assert_equalisation(plan, dropped=len(toy_samples) - len(seen))
    for batches in per_rank:
        for batch in batches:
            assert batch["latent"].shape == (BATCH, 4, 4, 8, 8) and batch["latent"].dtype == torch.float32
            for i, sample_id in enumerate(batch["key"]):
                sample = toy_samples[sample_id]
                assert torch.equal(batch["latent"][i], expected_latent(sample, SEED, 0, sample_id))
                assert batch["y"][i].item() == sample[2]


def test_epochs_differ_and_roll_over_in_infinite_mode(toy):
    loader = make(toy, infinite=True)
    n = len(loader)
    batches = take(loader, 2 * n + 1)
    first, second = keys(batches[:n]), keys(batches[n : 2 * n])
    assert first != second and len(set(first)) == len(first) == len(set(second))
    assert loader.epoch == 2 and loader.state_dict()["segments"][0]["batches"] == 1
    finite = make(toy)
    assert len(list(finite)) == n and len(list(finite)) == n and finite.epoch == 2  # one epoch per pass


# --------------------------------------------------------------------------------------------------------
# Exact resume on the same layout
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers, steps", [(0, None), (2, [0, 1, 4, "T-1", "T", "T+2"])])
def test_resume_is_exact(toy, workers, steps):
    reference_loader = make(toy, rank=1, world=2, workers=workers, infinite=True)
    per_epoch = len(reference_loader)
    reference = take(reference_loader, 2 * per_epoch + 1)  # crosses two epoch boundaries
    names = {"T-1": per_epoch - 1, "T": per_epoch, "T+2": per_epoch + 2}
    points = range(2 * per_epoch) if steps is None else [names.get(s, s) for s in steps]
    for k in points:
        first = make(toy, rank=1, world=2, workers=workers, infinite=True)
        assert_same(take(first, k), reference[:k])
        state = json.loads(json.dumps(first.state_dict()))
        resumed = make(toy, rank=1, world=2, workers=workers, infinite=True)
        resumed.load_state_dict(state)
        rest = len(reference) - k if steps is None else min(len(reference) - k, per_epoch + 1)
        assert_same(take(resumed, rest), reference[k : k + rest])


def test_state_dict_is_small_json_and_the_same_on_every_rank(toy):
    loaders = [make(toy, r, 3, 2) for r in range(3)]
    states = []
    for loader in loaders:
        take(loader, 2)
        states.append(loader.state_dict())
    text = json.dumps(states[0])
    assert len(text) < 1500, text
    assert states[0]["epoch"] == 0 and states[0]["seed"] == SEED
    assert states[0]["segments"] == [
        {"world_size": 3, "num_workers": 2, "batch_size": BATCH, "shuffle_buffer": BUFFER, "batches": 2}
    ]
    assert [c["batches"] for c in states[0]["cursor"]] == [1, 1] and "shard" in states[0]["cursor"][0]
    strip = [{k: v for k, v in s.items() if k not in ("rank", "cursor")} for s in states]
    assert strip[0] == strip[1] == strip[2]


# --------------------------------------------------------------------------------------------------------
# Resume on another world size (or worker count)
# --------------------------------------------------------------------------------------------------------


def run_ranks(url: str, world: int, workers: int, state: dict | None, steps: int | None):
    """Every rank of a layout from ``state``: ``steps`` batches each (None = to the end of the epoch).
    Returns (keys taken, rank 0's loader, the plan of the segment it ran)."""
    loaders = [make(url, r, world, workers) for r in range(world)]
    taken: list[str] = []
    for loader in loaders:
        if state is not None:
            loader.load_state_dict(json.loads(json.dumps(state)))
    plan = loaders[0]._plan()
    for loader in loaders:
        taken += keys(take(loader, steps) if steps is not None else list(loader))
    return taken, loaders[0], plan


@pytest.mark.parametrize(
    "chain",
    [
        [(2, 0, 4), (1, 0, None)],  # 2 ranks -> 1
        [(1, 2, 5), (3, 0, None)],  # 1 rank (2 workers) -> 3 ranks
        [(2, 2, 2), (1, 0, 3), (3, 2, None)],  # 2 -> 1 -> 3 within one epoch
        [(3, 0, 1), (3, 2, None)],  # same world size, other worker count
    ],
)
def test_resume_on_another_layout_loses_and_repeats_nothing(toy, toy_samples, chain):
    state, seen = None, []
    for world, workers, steps in chain:
        taken, last, plan = run_ranks(toy, world, workers, state, steps)
        seen += taken
        state = last.state_dict()
    assert len(seen) == len(set(seen)), "a sample was yielded twice within the interrupted epoch"
    assert set(seen) <= set(toy_samples) and last.epoch == 1
    assert_equalisation(plan, dropped=len(toy_samples) - len(seen))  # only the last layout drops
    # then the new layout's own order: epoch 1 as a fresh run of that layout yields it
    after, _, _ = run_ranks(toy, world, workers, state, None)
    fresh = [make(toy, r, world, workers) for r in range(world)]
    for loader in fresh:
        loader.set_epoch(1)
    assert after == [k for loader in fresh for k in keys(list(loader))]


# --------------------------------------------------------------------------------------------------------
# Output forms
# --------------------------------------------------------------------------------------------------------


def test_unconditional_dataset_and_bf16(tmp_path):
    make_dataset(str(tmp_path), [4, 5], classes=0)
    (fp32,) = take(make(str(tmp_path)), 1)
    (bf16,) = take(make(str(tmp_path), dtype=torch.bfloat16), 1)
    assert "y" not in fp32 and bf16["latent"].dtype == torch.bfloat16
    assert torch.equal(bf16["latent"], fp32["latent"].to(torch.bfloat16))
    (no_labels,) = take(make(str(tmp_path / "index.json"), expected=Expected(num_classes=0)), 1)
    assert "y" not in no_labels


def test_unconditional_model_on_a_labelled_dataset_gets_no_labels(toy):
    (batch,) = take(make(toy, expected=Expected(num_classes=0)), 1)
    assert set(batch) == {"latent", "key"}


# --------------------------------------------------------------------------------------------------------
# Faults and bad input
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers, buffer", [(0, BUFFER), (2, BUFFER), (0, 2)])
def test_corrupt_sample_and_truncated_shard_are_replaced_and_counted(tmp_path, caplog, workers, buffer):
    counts = [6, 6, 6, 6]
    make_dataset(str(tmp_path), counts, corrupt=[2], truncate={2: 0.3})
    good = read_samples(str(tmp_path / "index.json"))
    clean = make(str(tmp_path), shuffle_buffer=buffer, workers=workers)
    with caplog.at_level(logging.WARNING, logger="data_pipeline.loader"):
        batches = list(clean)
    assert len(batches) == len(clean) == sum(counts) // BATCH  # the epoch goes on, no batch is lost
    seen = Counter(keys(batches))
    metrics = clean.metrics()
    bad = sum(counts) - len(good)
    assert bad >= 2 and metrics["corrupt"] == bad and metrics["bad_shards"] == 2
    assert set(seen) == set(good)  # every readable sample, and only those
    assert sum(seen.values()) - len(seen) == metrics["substituted"] == bad  # stand-ins are repeats
    if workers == 0:  # warnings are logged in the process that reads (workers log on their own stderr)
        warned = [r.getMessage() for r in caplog.records if "are replaced" in r.getMessage()]
        assert len(warned) == 2
        for shard in (0, 2):
            assert any(shard_name("shard", shard) in w for w in warned)


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_tar_cursor_reads_long_names_and_skips_other_members(tmp_path, fmt):
    long_key = "k" * 150  # longer than a ustar name: a pax header or a GNU long-name member carries it
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w", format=fmt) as tar:
        tar.addfile(_dir_info())
        for name, data in [(f"{long_key}.cls", b"3"), ("short.cls", b"12345")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with open(path, "rb") as stream:
        cursor = TarCursor(stream, 0, Counter())
        found = []
        while (member := cursor.next()) is not None:
            found.append((member[1], bytes(cursor.read(member[2]))))
    assert found == [(f"{long_key}.cls", b"3"), ("short.cls", b"12345")]
    assert cursor.stats["bytes"] == cursor.pos <= path.stat().st_size


def _dir_info() -> tarfile.TarInfo:
    info = tarfile.TarInfo("a-directory")
    info.type = tarfile.DIRTYPE
    return info


class FlakyStream(io.RawIOBase):
    """A shard stream that dies with a connection reset after ``limit`` bytes."""

    def __init__(self, data: bytes, limit: int) -> None:
        self.data, self.limit, self.pos = data, limit, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.pos >= self.limit:
            raise ConnectionResetError("connection reset by peer (injected)")
        n = min(len(buffer), self.limit - self.pos, len(self.data) - self.pos)
        buffer[:n] = self.data[self.pos : self.pos + n]
        self.pos += n
        return n


@pytest.mark.parametrize("workers", [0, 2])
def test_transient_errors_reopen_at_the_sample_and_lose_nothing(toy, monkeypatch, workers):
    reference = list(make(toy, workers=workers))
    real_open = s3_opener.open_shard
    opens: list[tuple[str, int]] = []

    def flaky_open(url: str, offset: int = 0):
        opens.append((url, offset))
        stream = real_open(url, offset)
        if sum(u == url for u, _ in opens) > 2:  # the first two opens of every shard fail part-way
            return stream
        data = stream.read()
        stream.close()
        return io.BufferedReader(FlakyStream(data, limit=len(data) // 2 + 700), 1024)

    import data_pipeline.shard_reader as shard_reader

    monkeypatch.setattr(shard_reader, "open_shard", flaky_open)
    loader = make(toy, workers=workers, retry_backoff=0.001)
    assert_same(list(loader), reference)
    if workers == 0:
        assert loader.metrics()["retries"] >= len(COUNTS)
        assert any(offset > 0 for _, offset in opens)  # reopened where the sample starts, not at byte 0


def test_gives_up_with_one_line_after_the_retries(toy, monkeypatch):
    import data_pipeline.shard_reader as shard_reader

    def dead(url: str, offset: int = 0):
        raise ConnectionRefusedError("nothing listens (injected)")

    monkeypatch.setattr(shard_reader, "open_shard", dead)
    loader = make(toy, retries=2, retry_backoff=0.001)
    with pytest.raises(LoaderError) as info:
        next(iter(loader))
    assert "still fails after 2 retries" in one_line(info) and "shard-" in one_line(info)
    assert not isinstance(info.value, DatasetUnreadableError)  # a store away stays transient: requeue


@pytest.mark.parametrize("workers", [0, 2])
def test_dataset_whose_every_sample_is_corrupt_is_one_line_naming_it(tmp_path, workers):
    """A permanent fault of the data (training exits 2), unlike storage that stays away (exit 1)."""
    make_dataset(str(tmp_path), [4, 5], corrupt=range(9))
    loader = make(str(tmp_path), workers=workers)
    with pytest.raises(DatasetUnreadableError) as info:
        next(iter(loader))
    assert isinstance(info.value, LoaderError)
    index = str(tmp_path / "index.json")
    assert one_line(info).startswith(f"dataset '{index}' has no readable samples: ")


@pytest.mark.parametrize("content", ["[]", "null", '"index.json"', "42"])
def test_index_that_is_not_a_json_object_is_one_line_naming_it(tmp_path, content):
    (tmp_path / "index.json").write_text(content)
    with pytest.raises(DatasetIndexError) as info:
        make(str(tmp_path))
    assert one_line(info) == (
        f"index '{tmp_path / 'index.json'}' is malformed: expected a JSON object, found {content}"
    )


def test_missing_shard_or_unreadable_index_fail_at_start(tmp_path):
    make_dataset(str(tmp_path / "ds"), [4, 4, 4])
    shutil.copytree(tmp_path / "ds", tmp_path / "gap")
    missing = tmp_path / "gap" / shard_name("shard", 1)
    missing.unlink()
    with pytest.raises(LoaderError) as info:
        make(str(tmp_path / "gap"))
    assert str(missing) in one_line(info) and "does not exist" in one_line(info)
    with pytest.raises(DatasetIndexError) as info:
        make(str(tmp_path / "nowhere" / "index.json"))
    assert str(tmp_path / "nowhere" / "index.json") in one_line(info)
    (tmp_path / "ds" / "index.json").write_text("{not json")
    with pytest.raises(DatasetIndexError) as info:
        make(str(tmp_path / "ds"))
    assert "index.json" in one_line(info) and "not valid JSON" in one_line(info)


@pytest.mark.parametrize(
    "expected, message",
    [
        (Expected(latent_shape=(4, 4, 16, 16)), r"= \(4, 4, 8, 8\), the config expects \(4, 4, 16, 16\)"),
        (Expected(scaling_factor=0.13025), "scaling factor 0.18215, the config expects 0.13025"),
        (Expected(num_classes=5), "has 4 classes, the config asks for 5"),
    ],
)
def test_index_that_disagrees_with_the_config_is_refused(toy, expected, message):
    with pytest.raises(IndexMismatchError, match=message) as info:
        make(toy, expected=expected)
    assert toy in one_line(info)
    make(toy, expected=Expected((4, 4, 8, 8), 0.18215, 4))  # what agrees passes


def test_state_of_another_dataset_is_refused(toy, tmp_path):
    make_dataset(str(tmp_path), [4, 4])
    with pytest.raises(LoaderError, match="has other shards"):
        make(str(tmp_path)).load_state_dict(make(toy).state_dict())


def test_open_batches_streams_the_index(toy, tmp_path):
    from data_pipeline.sources import open_batches
    from latte.config import ConfigError, load_config

    def batches_for(cfg, world):  # what train.py calls
        return open_batches(cfg, world.rank, world.world_size, world.device.type)

    world = SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu"))
    cfg = load_config("configs/tiny.yaml", [f"data.index={toy}", "data.num_workers=0"])
    batch = next(iter(batches_for(cfg, world)))
    assert batch["latent"].shape == (cfg.train.micro_batch_size, 4, 4, 8, 8) and batch["y"].shape == (8,)
    mismatches = [
        ("data.image_size=128", "shape"),
        ("model.num_classes=3", "asks for 3"),
        ("data.scaling_factor=0.5", "expects 0.5"),
    ]
    for override, message in mismatches:
        cfg = load_config("configs/tiny.yaml", [f"data.index={toy}", override])
        with pytest.raises(ConfigError, match=message):
            batches_for(cfg, world)
    unconditional = tmp_path / "uncond"
    make_dataset(str(unconditional), [8], classes=0)
    cfg = load_config("configs/tiny.yaml", [f"data.index={unconditional}"])
    with pytest.raises(ConfigError, match="unconditional"):
        batches_for(cfg, world)


# --------------------------------------------------------------------------------------------------------
# S3: the webdataset scheme, a missing shard, and a server restarted mid-epoch
# --------------------------------------------------------------------------------------------------------


def test_s3_missing_shard_fails_at_start_naming_it(s3_bucket):
    root = s3_bucket + "/ds"
    make_dataset(root, [3, 3])
    bucket, key = storage.split_s3(storage.join(root, shard_name("shard", 1)))
    storage.s3_client().delete_object(Bucket=bucket, Key=key)
    with pytest.raises(LoaderError) as info:
        make(root + "/index.json")
    assert f"s3://{bucket}/{key}" in one_line(info)


@pytest.mark.slow
def test_s3_server_restart_mid_epoch_keeps_the_epoch_exact(s3_bucket, seaweed, tmp_path):
    # 256 KiB per sample: 25 MiB shards, more than the socket buffers hold, so the server dies mid-body
    counts, shape = [100, 100], (16, 4, 32, 32)
    make_dataset(str(tmp_path), counts, latent_shape=shape)
    make_dataset(s3_bucket + "/big", counts, latent_shape=shape)
    kw = {"batch_size": 4, "shuffle_buffer": 8, "retry_backoff": 0.2}
    reference = list(make(str(tmp_path), **kw))
    loader = make(s3_bucket + "/big/index.json", **kw)
    it = iter(loader)
    got = [next(it)]  # a few MiB into the first shard: the reader holds an open stream
    seaweed.stop()
    restarter = threading.Timer(1.5, seaweed.start)  # down while the loader needs to read
    restarter.start()
    try:
        got += list(it)
    finally:
        restarter.join()
    assert_same(got, reference)
    assert loader.metrics()["retries"] >= 1  # the broken stream was reopened at its sample
    # webdataset itself reads our shards through the registered scheme
    shard = s3_bucket + "/big/" + shard_name("shard", 0)
    first = next(iter(webdataset.WebDataset(shard, shardshuffle=False)))
    assert first["__key__"] == "clip000000" and np.load(io.BytesIO(first["latent.npy"])).shape == shape


def test_s3_opener_reads_from_an_offset(s3_bucket):
    url = s3_bucket + "/blob.bin"
    storage.write_bytes(url, bytes(range(256)) * 8)
    assert webdataset.gopen_schemes["s3"] is s3_opener.gopen_s3
    with s3_opener.open_shard(url, offset=1000) as stream:
        assert stream.read() == (bytes(range(256)) * 8)[1000:]
    assert not s3_opener.is_transient(_storage_error(url + ".missing"))


def _storage_error(url: str) -> storage.StorageError:
    try:
        storage.open_read(url)
    except storage.StorageError as exc:
        return exc
    raise AssertionError(f"{url} exists")
