"""Which VAE decodes the samples and which scaling factor it divides by.

The factor is typed once, where the latents were made: ``data.scaling_factor`` when the config sets it, else
the one the checkpoint recorded (training records the dataset's factor and VAE in meta.json), else the
dataset index that ``data.index`` names (its ``facts.scaling_factor``, the factor the sharding job multiplied
in). When the model was trained on a dataset whose factor none of these give (an index moved or unreadable,
weights without meta.json), sampling stops with one line asking for ``data.scaling_factor`` instead of
guessing: the VAE config's factor differs from the dataset's whenever the sharding job was given another, and
wrongly scaled videos look like results. Only without any dataset (synthetic latents) is the VAE's own
``config.scaling_factor`` used. The VAE defaults to the recorded one, else the index's ``facts.vae``.

The index itself is read by the entry point (``latte.sample``, through ``data_pipeline.index``, the one
reader of index.json); this library only decides, from what it was given (``IndexFacts``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from latte.config import Config
from latte.vae import VaeError


class Facts(Protocol):
    """What decoding needs of a dataset's facts (``data_pipeline.index.DatasetFacts``)."""

    vae: str
    scaling_factor: float


@dataclass(frozen=True)
class IndexFacts:
    """The dataset index ``data.index`` names: its url, its facts, or why they could not be read."""

    url: str
    facts: Facts | None  # None when the index could not be read
    problem: str = ""  # why not, one line


def choose_vae(
    given: str | None, facts: IndexFacts | None, recorded: dict[str, Any] | None = None
) -> tuple[str, str]:
    """(VAE id, where it came from): ``given`` (--vae), else the one that encoded the dataset (as the
    checkpoint recorded it, else as its index says)."""
    if given:
        return given, "--vae"
    if recorded and recorded.get("vae"):
        return str(recorded["vae"]), "the checkpoint's meta.json"
    if facts is not None and facts.facts is not None and facts.facts.vae:
        return str(facts.facts.vae), f"dataset index {facts.url}"
    why = f" (the dataset index {facts.url} names none: {facts.problem or 'no facts.vae'})" if facts else ""
    raise VaeError(f"no VAE: pass --vae (a diffusers AutoencoderKL directory or hub id){why}")


def scaling_factor(
    cfg: Config, facts: IndexFacts | None, vae_factor: float, recorded: dict[str, Any] | None = None
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
    if facts.facts is not None and facts.facts.scaling_factor is not None:
        return float(facts.facts.scaling_factor), f"dataset index {facts.url}"
    why = facts.problem or "it has no facts.scaling_factor"
    raise VaeError(
        f"the latents' scaling factor is unknown: the dataset index {facts.url} cannot give it "
        f"({why}) and the weights record none; pass --set data.scaling_factor=F (the factor the "
        f"dataset was encoded with; the VAE's own is {vae_factor:g})"
    )
