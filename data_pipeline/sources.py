"""Where training's batches come from: the ``BatchSource`` interface, and ``open_batches``, which picks one.

    data = open_batches(cfg, rank, world_size, device_type)  # the dataset's shards, or synthetic clips
    for batch in data:                                       # {"latent": (B, F, C, h, w), "y": (B,), ...}
        ...
    checkpoint["loader"] = data.state_dict()
    data.load_state_dict(checkpoint["loader"])               # then iterate again: the stream continues
    data.facts                                               # the index's DatasetFacts; None: synthetic

``cfg.data.index`` set: ``loader.LatentLoader`` over that dataset, checked against the model the config
builds; empty: ``synthetic.SyntheticStream``. What a batch holds follows from ``latent_sample.FIELDS``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

import numpy as np

from data_pipeline.index import DatasetFacts
from latte.config import Config, ConfigError, caption_channels_of


@runtime_checkable
class BatchSource(Protocol):
    """This rank's resumable stream of micro-batches."""

    facts: DatasetFacts | None  # the dataset index's facts (VAE, scaling factor, ...); None: no dataset
    batch_keys: tuple[str, ...]  # the keys of every batch, e.g. ("latent", "y", "key")

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Micro-batches from the current position on."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """The position after the batches handed out so far (small, JSON; the same on every rank)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; call it before iterating."""
        ...

    def null_caption(self) -> np.ndarray | None:
        """The empty prompt's (L0, D) embedding (the null condition of captioned data), else None."""
        ...


def open_batches(cfg: Config, rank: int, world_size: int, device_type: str) -> BatchSource:
    """The batch source of data-parallel ``rank`` of ``world_size`` (``device_type``: "cuda" pins batches).

    Raises ``ConfigError`` (one line) for an index that cannot be read, a missing shard, or an index that
    disagrees with the config (latent shape, VAE scaling factor, classes, caption width)."""
    caption_channels = caption_channels_of(cfg.model)  # 0: the model takes no captions
    if not cfg.data.index:
        from data_pipeline.synthetic import SyntheticStream

        return SyntheticStream(
            cfg.train.seed,
            cfg.train.micro_batch_size,
            cfg.model.num_classes,
            cfg.data.num_frames,
            cfg.model.in_channels,
            cfg.data.latent_size,
            rank=rank,
            world_size=world_size,
            accumulation=cfg.train.gradient_accumulation_steps,
            caption_channels=caption_channels,
        )
    from data_pipeline.loader import LatentLoader, LoaderError  # (its imports are heavier)

    try:
        return LatentLoader(
            cfg.data.index,
            cfg.train.micro_batch_size,
            rank=rank,
            world_size=world_size,
            seed=cfg.train.seed,
            num_workers=cfg.data.num_workers,
            shuffle_buffer=cfg.data.shuffle_buffer,
            infinite=True,
            expected=expected_of(cfg),
            pin_memory=device_type == "cuda",
        )
    except (ValueError, LoaderError) as exc:  # unreadable index, missing shard, index vs config
        raise ConfigError(str(exc)) from None


def expected_of(cfg: Config):
    """What the model ``cfg`` builds expects of a dataset (``loader.Expected``): the latent shape, the VAE
    scaling factor, the classes and the caption width."""
    from data_pipeline.loader import Expected

    size = cfg.data.latent_size
    shape = (cfg.data.num_frames, cfg.model.in_channels, size, size)  # (F, C, h, w) the model is built for
    return Expected(shape, cfg.data.scaling_factor, cfg.model.num_classes, caption_channels_of(cfg.model))


def open_validation_set(cfg: Config, train_facts: DatasetFacts | None):
    """The fixed clips of the validation loss (``data.val_index``), checked against the model and the
    training data (``train_facts``, None for synthetic data); ``ConfigError`` (one line) otherwise."""
    from data_pipeline.validation_set import ValidationSet, ValidationSetError

    try:
        return ValidationSet.read(cfg.data.val_index, cfg.train.val_clips, expected_of(cfg), like=train_facts)
    except ValidationSetError as exc:
        raise ConfigError(str(exc)) from None
