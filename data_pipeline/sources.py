"""Where training's batches come from: the ``BatchSource`` interface, and ``open_batches``, which picks one.

    data = open_batches(cfg, rank, world_size, device_type)  # the dataset's shards, or synthetic clips
    for batch in data:                                       # {"latent": (B, F, C, h, w), "y": (B,), ...}
        ...
    checkpoint["loader"] = data.state_dict()
    data.load_state_dict(checkpoint["loader"])               # then iterate again: the stream continues
    data.facts                                               # the index's DatasetFacts; None: synthetic

``cfg.data.index`` set: ``loader.LatentLoader`` over that dataset, checked against the model the config
builds; empty: ``synthetic.SyntheticStream``. What a batch holds follows from ``latent_sample.FIELDS``.

Video-image joint training (``data.use_image_num`` K > 0): ``JointSource`` zips that clip source with a
second one of single-frame images (a ``LatentLoader`` over ``data.image_index``, or synthetic one-frame
clips) whose batches hold micro_batch_size x K images: batch ``latent`` (B, F+K, C, h, w), the images after
the frames, and ``y_image`` (B, K) for labelled data. The image stream has its own seed, ``image_seed(seed)``,
and its own epochs: the **image epoch** is one pass over the image dataset (each image at most once across
all ranks, in an order seeded by (image seed, image epoch); only the loader's equalisation tail is left
out), independent of the clip epoch; both streams resume exactly and survive a world-size change as
``LatentLoader`` does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from data_pipeline.index import DatasetFacts
from latte.config import Config, ConfigError, caption_channels_of
from latte.seeding import mix_seed

IMAGE_STREAM = 1  # the image stream's seed is mix_seed(train.seed, IMAGE_STREAM) (clips: train.seed itself)
JOINT_FORMAT = "latte-joint/1"


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
    clips = _open_clips(cfg, rank, world_size, device_type)
    if not cfg.data.use_image_num:
        return clips
    return JointSource(clips, _open_images(cfg, rank, world_size, device_type, clips), cfg.data.use_image_num)


def image_seed(seed: int) -> int:
    """The seed of the image stream of a run seeded ``seed`` (its shard orders, windows and posterior draws
    derive from it as the clips' do from ``seed``)."""
    return mix_seed(seed, IMAGE_STREAM)


def _stream(
    cfg: Config,
    rank: int,
    world_size: int,
    device_type: str,
    index: str,
    seed: int,
    batch_size: int,
    frames: int,
    name: str,
) -> BatchSource:
    """``batch_size`` samples of ``frames`` latent frames per batch: synthetic ones when ``index`` is "",
    else a ``LatentLoader`` over ``index`` checked against the config (``name``: the config key the
    error line names for it)."""
    if not index:
        from data_pipeline.synthetic import SyntheticStream

        return SyntheticStream(
            seed,
            batch_size,
            cfg.model.num_classes,
            frames,
            cfg.model.in_channels,
            cfg.data.latent_size,
            rank=rank,
            world_size=world_size,
            accumulation=cfg.train.gradient_accumulation_steps,
            caption_channels=caption_channels_of(cfg.model),  # 0: the model takes no captions
        )
    from data_pipeline.loader import LatentLoader, LoaderError  # (its imports are heavier)

    expected = expected_of(cfg)
    expected = dataclasses.replace(expected, latent_shape=(frames, *expected.latent_shape[1:]))
    try:
        return LatentLoader(
            index,
            batch_size,
            rank=rank,
            world_size=world_size,
            seed=seed,
            num_workers=cfg.data.num_workers,
            shuffle_buffer=cfg.data.shuffle_buffer,
            infinite=True,
            expected=expected,
            pin_memory=device_type == "cuda",
        )
    except (ValueError, LoaderError) as exc:  # unreadable index, missing shard, index vs config
        message = str(exc)
        raise ConfigError(
            message if name == "data.index" else message.replace("the config expects", f"{name} needs")
        ) from None


def _open_clips(cfg: Config, rank: int, world_size: int, device_type: str) -> BatchSource:
    d, t = cfg.data, cfg.train
    return _stream(
        cfg, rank, world_size, device_type, d.index, t.seed, t.micro_batch_size, d.num_frames, "data.index"
    )


def _open_images(
    cfg: Config, rank: int, world_size: int, device_type: str, clips: BatchSource
) -> BatchSource:
    """The image stream of joint training: micro_batch_size x K single-frame latents per batch (synthetic
    clips: synthetic one-frame "images" of the same classes)."""
    d = cfg.data
    per_batch = cfg.train.micro_batch_size * d.use_image_num
    seed = image_seed(cfg.train.seed)
    images = _stream(
        cfg, rank, world_size, device_type, d.image_index, seed, per_batch, 1, "data.image_index"
    )
    if not d.image_index:
        return images
    if (
        cfg.model.num_classes
        and clips.facts is not None
        and list(images.facts.classes) != list(clips.facts.classes)
    ):
        raise ConfigError(
            f"image dataset '{cfg.data.image_index}' has classes {_short(images.facts.classes)}, the clip "
            f"dataset '{cfg.data.index}' {_short(clips.facts.classes)}: the labels must mean the same classes"
        )
    captioned = caption_channels_of(cfg.model) and clips.facts is not None
    if captioned and images.facts.text_encoder != clips.facts.text_encoder:
        raise ConfigError(
            f"image dataset '{cfg.data.image_index}' was captioned by '{images.facts.text_encoder}', the "
            f"clip dataset '{cfg.data.index}' by '{clips.facts.text_encoder}': one text encoder for both"
        )
    return images


def _short(names) -> str:
    names = list(names)
    return repr(names) if len(names) <= 4 else f"[{', '.join(map(repr, names[:3]))}, ... ({len(names)})]"


class JointSource:
    """Clip batches with K single-frame images each (video-image joint training; module docstring).

    Both sources hand out one batch per micro-batch in lockstep; ``state_dict()`` is ``{"format", "clips",
    "images", "use_image_num"}``. A state of the clip source alone (a checkpoint from before images were
    turned on) loads into the clips; the images then start at their first epoch."""

    def __init__(self, clips: BatchSource, images: BatchSource, use_image_num: int) -> None:
        self.clips, self.images, self.k = clips, images, use_image_num
        self.facts = clips.facts
        self.labelled = "y" in clips.batch_keys and "y" in images.batch_keys
        self.captioned = (
            "encoder_hidden_states" in clips.batch_keys and "encoder_hidden_states" in images.batch_keys
        )
        captions = ("image_encoder_hidden_states", "image_encoder_attention_mask")
        self.batch_keys = (
            clips.batch_keys
            + (("y_image",) if self.labelled else ())
            + (captions if self.captioned else ())
            + (("image_key",) if "key" in images.batch_keys else ())  # (B lists of K sample ids)
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch, images in zip(self.clips, self.images, strict=False):  # both endless, in lockstep
            latent = images["latent"]  # (B*K, 1, C, h, w)
            b = len(batch["latent"])
            images_latent = latent.reshape(b, self.k, *latent.shape[2:])  # (B, K, C, h, w), sample-major
            batch = dict(batch)
            batch["latent"] = torch.cat([batch["latent"], images_latent.to(batch["latent"].dtype)], dim=1)
            if self.labelled:
                batch["y_image"] = images["y"].reshape(b, self.k)  # (B, K)
            if self.captioned:  # (B*K, L, D) -> (B, K, L, D), (B*K, L) -> (B, K, L)
                for key in ("encoder_hidden_states", "encoder_attention_mask"):
                    batch[f"image_{key}"] = images[key].reshape(b, self.k, *images[key].shape[1:])
            if "key" in images:
                batch["image_key"] = [images["key"][i * self.k : (i + 1) * self.k] for i in range(b)]
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": JOINT_FORMAT,
            "use_image_num": self.k,
            "clips": self.clips.state_dict(),
            "images": self.images.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if isinstance(state, dict) and state.get("format") == JOINT_FORMAT:
            self.clips.load_state_dict(state["clips"])
            self.images.load_state_dict(state["images"])
        else:  # saved without images: the clips continue, the images start afresh
            self.clips.load_state_dict(state)

    def null_caption(self) -> np.ndarray | None:
        return self.clips.null_caption()


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
