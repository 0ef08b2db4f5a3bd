"""Local and S3 storage against a real S3 server: atomic publication, listing, and one-line errors."""

from __future__ import annotations

import pytest

from data_pipeline import storage
from data_pipeline.index import (
    DatasetFacts,
    DatasetIndex,
    ShardInfo,
    load_index,
    merge_parts,
    part_url,
    save_index,
)

FACTS = DatasetFacts(
    vae="tiny-vae",
    scaling_factor=0.18215,
    latent_shape=[4, 4, 8, 8],
    num_frames=4,
    frame_interval=3,
    image_size=64,
    classes=["a", "b"],
)


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "dataset")
    return request.getfixturevalue("s3_bucket") + "/datasets/toy"


def test_put_list_read_roundtrip(root, tmp_path):
    storage.check_writable(root)
    src = tmp_path / "shard.tar"
    src.write_bytes(b"x" * 1000)
    storage.put_file(src, storage.join(root, "shard-00000-000000.tar"))
    storage.write_bytes(storage.join(root, "sub", "a.json"), b"{}")
    files = storage.list_files(root)
    assert [f.rsplit("/", 1)[-1] for f in files] == ["shard-00000-000000.tar", "a.json"]  # shard < sub
    assert storage.read_bytes(storage.join(root, "shard-00000-000000.tar")) == b"x" * 1000
    with storage.open_read(storage.join(root, "shard-00000-000000.tar"), offset=990) as f:
        assert f.read() == b"x" * 10
    assert storage.exists(storage.join(root, "sub", "a.json"))
    assert not storage.exists(storage.join(root, "nope.tar"))
    if not storage.is_s3(root):  # nothing half-written or temporary is left beside the files
        assert all(".tmp" not in f for f in files)


def test_index_parts_merge(root):
    for task in (1, 0):
        part = DatasetIndex(
            FACTS, [ShardInfo(f"shard-{task:05d}-000000.tar", 3 + task, 100, "ab" * 32, task)]
        )
        save_index(part, part_url(root, task))
    merged = merge_parts(root, num_tasks=2)
    assert [s.task for s in merged.shards] == [0, 1] and merged.num_samples == 7
    again = load_index(root)
    assert again.to_json() == merged.to_json()
    assert again.shard_urls(storage.join(root, "index.json"))[0] == storage.join(
        root, "shard-00000-000000.tar"
    )


def test_merge_refuses_disagreeing_or_missing_parts(tmp_path):
    root = str(tmp_path)
    save_index(DatasetIndex(FACTS), part_url(root, 0))
    with pytest.raises(ValueError, match=r"tasks \[1\] of 2 have not written their parts"):
        merge_parts(root, num_tasks=2)
    other = DatasetFacts(**{**FACTS.__dict__, "scaling_factor": 0.13025})
    save_index(DatasetIndex(other), part_url(root, 1))
    with pytest.raises(ValueError, match="task 1 disagrees with task 0 on scaling_factor"):
        merge_parts(root, num_tasks=2)


def test_s3_errors_are_one_clear_line(s3_bucket, seaweed, monkeypatch):
    with pytest.raises(storage.StorageError, match="S3 bucket 'no-such-bucket' does not exist"):
        storage.check_writable("s3://no-such-bucket/prefix")
    with pytest.raises(
        storage.StorageError, match=f"S3 object '{s3_bucket}/missing.tar' does not exist"
    ) as info:
        storage.check_readable(f"{s3_bucket}/missing.tar")
    assert not info.value.transient
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    with pytest.raises(storage.StorageError) as info:
        storage.check_writable(s3_bucket + "/x")
    assert "denied" in str(info.value) and "check the credentials" in str(info.value)
    assert "wrong-secret" not in str(info.value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    with pytest.raises(storage.StorageError, match="cannot reach the S3 endpoint http://127.0.0.1:9") as info:
        storage.check_writable(s3_bucket + "/x")
    assert info.value.transient  # a server that is away may come back: readers retry these


def test_unwritable_local_output(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(storage.StorageError, match="is not writable"):
        storage.check_writable(str(blocker / "sub"))
