"""Which VAE decodes the samples and which scaling factor it divides by.

The factor is typed once, where the latents were made: ``data.scaling_factor`` when the config sets it, else
the one the checkpoint recorded (training records the dataset's factor and VAE in meta.json), else the
dataset index that ``data.index`` names (its ``facts.scaling_factor``, the factor the sharding job multiplied
in). When the model was trained on a dataset whose factor none of these give (an index moved or unreadable,
weights without meta.json), sampling stops with one line asking for ``data.scaling_factor`` instead of
guessing: the VAE config's factor differs from the dataset's whenever the sharding job was given another, and
wrongly scaled videos look like results. Only without any dataset (synthetic latents) is the VAE's own
``config.scaling_factor`` used. The VAE defaults to the recorded one, else the index's ``facts.vae``.
The index is read as plain JSON (a local path, or ``s3://`` through boto3): sampling does not import
``data_pipeline``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from latte.config import Config
from latte.vae import VaeError

INDEX_NAME = "index.json"  # the dataset index at a dataset's root (data_pipeline.index)


@dataclass(frozen=True)
class DatasetFacts:
    url: str
    facts: dict[str, Any] | None  # the index's "facts", or None when it could not be read
    problem: str = ""  # why not


def index_url(root_or_index: str) -> str:
    """``data.index`` may name the dataset root or its index.json."""
    return root_or_index if root_or_index.endswith(".json") else f"{root_or_index.rstrip('/')}/{INDEX_NAME}"


def read_facts(url: str) -> DatasetFacts:
    """The ``facts`` of the dataset index at ``url``; never raises (sampling can go on without them)."""
    try:
        if url.startswith("s3://"):
            import boto3

            bucket, _, key = url[len("s3://") :].partition("/")
            raw = boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()
        else:
            raw = Path(url).read_bytes()
        facts = json.loads(raw)["facts"]
        if not isinstance(facts, dict):
            raise TypeError("facts is not a mapping")
        return DatasetFacts(url, facts)
    except Exception as exc:  # OSError, botocore errors, JSON/KeyError: reported, then the fallback applies
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return DatasetFacts(url, None, f"{type(exc).__name__}: {reason}")


def dataset_facts(cfg: Config) -> DatasetFacts | None:
    """The facts of the config's dataset (``data.index``), or None for synthetic data."""
    return read_facts(index_url(cfg.data.index)) if cfg.data.index else None


def choose_vae(
    given: str | None, facts: DatasetFacts | None, recorded: dict[str, Any] | None = None
) -> tuple[str, str]:
    """(VAE id, where it came from): ``given`` (--vae), else the one that encoded the dataset (as the
    checkpoint recorded it, else as its index says)."""
    if given:
        return given, "--vae"
    if recorded and recorded.get("vae"):
        return str(recorded["vae"]), "the checkpoint's meta.json"
    if facts is not None and facts.facts and facts.facts.get("vae"):
        return str(facts.facts["vae"]), f"dataset index {facts.url}"
    why = f" (the dataset index {facts.url} names none: {facts.problem or 'no facts.vae'})" if facts else ""
    raise VaeError(f"no VAE: pass --vae (a diffusers AutoencoderKL directory or hub id){why}")


def scaling_factor(
    cfg: Config, facts: DatasetFacts | None, vae_factor: float, recorded: dict[str, Any] | None = None
) -> tuple[float, str]:
    """(factor, its source): data.scaling_factor, else the checkpoint's record, else the dataset index's;
    the VAE config's only for a model trained without a dataset. A ``VaeError`` when a dataset's factor is
    unknown."""
    if cfg.data.scaling_factor is not None:
        return float(cfg.data.scaling_factor), "config data.scaling_factor"
    if recorded and recorded.get("scaling_factor") is not None:
        return float(recorded["scaling_factor"]), "the checkpoint's meta.json"
    if facts is None:
        return float(vae_factor), "the VAE's config (the model was trained without a dataset)"
    if facts.facts is not None and "scaling_factor" in facts.facts:
        return float(facts.facts["scaling_factor"]), f"dataset index {facts.url}"
    why = facts.problem or "it has no facts.scaling_factor"
    raise VaeError(f"the latents' scaling factor is unknown: the dataset index {facts.url} cannot give it "
                   f"({why}) and the weights record none; pass --set data.scaling_factor=F (the factor the "
                   f"dataset was encoded with; the VAE's own is {vae_factor:g})")  # fmt: skip
