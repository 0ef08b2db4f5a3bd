"""Which VAE decodes the samples and which scaling factor it divides by.

The factor is typed once, where the latents were made: ``data.scaling_factor`` when the config sets it, else
the dataset index that ``data.index`` names (its ``facts.scaling_factor``, the factor the sharding job
multiplied in), else the VAE's own ``config.scaling_factor``. The VAE defaults to the index's ``facts.vae``.
The index is read as plain JSON (a local path, or ``s3://`` through boto3): sampling does not import
``data_pipeline``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
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


def choose_vae(given: str | None, facts: DatasetFacts | None) -> tuple[str, str]:
    """(VAE id, where it came from): ``given`` (--vae), else the one that encoded the dataset."""
    if given:
        return given, "--vae"
    if facts is not None and facts.facts and facts.facts.get("vae"):
        return str(facts.facts["vae"]), f"dataset index {facts.url}"
    why = f" (the dataset index {facts.url} names none: {facts.problem or 'no facts.vae'})" if facts else ""
    raise VaeError(f"no VAE: pass --vae (a diffusers AutoencoderKL directory or hub id){why}")


def scaling_factor(
    cfg: Config, facts: DatasetFacts | None, vae_factor: float, warn: Callable[[str], None] = print
) -> tuple[float, str]:
    """(factor, its source): data.scaling_factor, else the dataset index's, else the VAE config's."""
    if cfg.data.scaling_factor is not None:
        return float(cfg.data.scaling_factor), "config data.scaling_factor"
    if facts is not None:
        if facts.facts is not None and "scaling_factor" in facts.facts:
            return float(facts.facts["scaling_factor"]), f"dataset index {facts.url}"
        why = facts.problem or "it has no facts.scaling_factor"
        warn(f"warning: cannot take the scaling factor from the dataset index {facts.url} ({why})")
    return float(vae_factor), "the VAE's config"
