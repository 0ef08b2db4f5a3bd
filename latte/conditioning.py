"""What the model is conditioned on: the one place that knows it.

A ``Conditioning`` turns a training batch into the model's keyword arguments (with condition dropout for
classifier-free guidance), a user's sampling request into the same arguments, and gives the null condition
the guided forward pairs them with. ``conditioning_of(cfg.model)`` picks it:

* ``Unconditional``: no arguments, no guidance.
* ``ClassLabels``: ``y`` (N,) int64 class ids; dropout and the null condition use the label table's extra
  "no class" row (index ``num_classes``), as DiT/Latte do.

A new kind (text prompts: caption embeddings and their ``encoder_attention_mask``) is one more class here,
one more field in the data's sample declaration (``data_pipeline.latent_sample``), and one more branch in
``conditioning_of``; training (``train.py``), sampling (``latte.sampling.generate``) and the config's request
checks (``latte.config.validate``) only talk to this interface.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from latte.config import ModelConfig, SampleConfig


class RequestError(ValueError):
    """A sampling request the model cannot honour (the config turns it into a one-line ``ConfigError``)."""


@dataclass(frozen=True)
class Condition:
    """The conditioning of a batch of samples: the model's keyword arguments, and the null condition of the
    same samples for classifier-free guidance (None: the model has no null condition)."""

    kwargs: dict[str, Tensor]
    null: dict[str, Tensor] | None = None


class Conditioning(Protocol):
    batch_keys: tuple[str, ...]  # what it reads from a training batch (the data side must carry these)
    dropout_prob: float  # condition dropout in training (0 = none)

    def training_kwargs(
        self, batch: dict, device: torch.device, drop: Tensor | None, image_drop: Tensor | None = None
    ) -> dict[str, Tensor]:
        """The model's kwargs for a training batch; ``drop`` (B,) int64, 1 = replace by the null condition
        (drawn per global sample by ``latte.seeding``), None = no dropout. Video-image joint training: the
        images' conditions from the batch's ``"y_image"`` (B, K), ``image_drop`` (B,) their dropout."""
        ...

    def check_request(self, sample: SampleConfig) -> None:
        """Raise ``RequestError`` (one line) if ``sample`` asks for what this model cannot give."""
        ...

    def for_samples(self, sample: SampleConfig, indices: list[int], device: torch.device) -> Condition:
        """The condition of samples ``indices`` of a sampling request."""
        ...

    def describe(self, sample: SampleConfig, index: int) -> dict:
        """What sample ``index`` was conditioned on, for the run's ``samples.json``."""
        ...


class Unconditional:
    batch_keys: tuple[str, ...] = ()
    dropout_prob = 0.0

    def training_kwargs(
        self, batch: dict, device: torch.device, drop: Tensor | None, image_drop: Tensor | None = None
    ) -> dict[str, Tensor]:
        return {}

    def check_request(self, sample: SampleConfig) -> None:
        _not_text(sample)
        if sample.classes:
            raise RequestError("sample.classes given, but the model is unconditional (model.num_classes 0)")
        if sample.cfg_scale != 1.0:
            raise RequestError("sample.cfg_scale guides class-conditional models; model.num_classes is 0")

    def for_samples(self, sample: SampleConfig, indices: list[int], device: torch.device) -> Condition:
        return Condition({})

    def describe(self, sample: SampleConfig, index: int) -> dict:
        return {"class": None}


@dataclass(frozen=True)
class ClassLabels:
    """Class-conditional: ``y`` from the batch's ``"y"``; the null condition is the "no class" row, which
    the label table has when the model was built with ``class_dropout_prob > 0``."""

    num_classes: int
    dropout_prob: float
    batch_keys: tuple[str, ...] = ("y",)

    @property
    def has_null(self) -> bool:
        return self.dropout_prob > 0

    def training_kwargs(
        self, batch: dict, device: torch.device, drop: Tensor | None, image_drop: Tensor | None = None
    ) -> dict[str, Tensor]:
        kwargs = {"y": to_device(batch["y"], device)}  # (B,) int64
        if drop is not None:
            kwargs["force_drop_ids"] = drop  # the model swaps in the "no class" row (its table's last row)
        if "y_image" in batch:  # joint training: the K images' own labels (B, K), from the same table
            kwargs["y_image"] = to_device(batch["y_image"], device)
            if image_drop is not None:
                kwargs["force_drop_image_ids"] = image_drop  # (B,): a sample's K image labels together
        return kwargs

    def check_request(self, sample: SampleConfig) -> None:
        _not_text(sample)
        n = self.num_classes
        for c in sample.classes:
            if not 0 <= c < n:
                raise RequestError(f"class {c} is out of range: the model has {n} classes, 0..{n - 1}")
        if sample.cfg_scale != 1.0 and not self.has_null:
            raise RequestError(
                "sample.cfg_scale needs the 'no class' label, which a model trained with "
                "model.class_dropout_prob 0 does not have"
            )

    def class_of(self, sample: SampleConfig, index: int) -> int:
        """Sample ``index``'s class: sample.classes cycled, else 0, 1, 2, ... cycled."""
        classes = sample.classes or range(self.num_classes)
        return classes[index % len(classes)]

    def for_samples(self, sample: SampleConfig, indices: list[int], device: torch.device) -> Condition:
        return self.labels(torch.tensor([self.class_of(sample, i) for i in indices], device=device))  # (N,)

    def labels(self, y: Tensor) -> Condition:
        """The condition of given class ids ``y`` (N,)."""
        return Condition({"y": y}, {"y": torch.full_like(y, self.num_classes)} if self.has_null else None)

    def describe(self, sample: SampleConfig, index: int) -> dict:
        return {"class": self.class_of(sample, index)}


@dataclass(frozen=True)
class TextCaptions:
    """Text-to-video (Latte-1): caption embeddings of a T5 encoder, ``encoder_hidden_states`` (N, L, D) and
    ``encoder_attention_mask`` (N, L) bool (True = real token), passed to the model in training and in
    sampling. The null condition (caption dropout, guidance) is the empty prompt's embedding
    (``null_caption`` (L0, D), recorded in the dataset's index; a negative prompt's in sampling).

    For sampling, ``prompts`` (texts, cycled over the samples as classes are) with their embeddings
    ``prompt_embeds`` ((L_i, D) each) are set by the entry point that encoded them."""

    caption_channels: int
    dropout_prob: float
    null_caption: Tensor | None = None  # (L0, D)
    prompts: tuple[str, ...] = ()
    prompt_embeds: tuple[Tensor, ...] = ()
    batch_keys: tuple[str, ...] = ("encoder_hidden_states", "encoder_attention_mask")

    def _null(self, length: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """The null condition padded to ``length`` tokens: (1, L, D) embeddings and (1, L) mask."""
        if self.null_caption is None:
            raise RequestError("the null caption (the empty prompt's embedding) is unknown")
        return pad_captions([self.null_caption], length, device)

    def training_kwargs(
        self, batch: dict, device: torch.device, drop: Tensor | None, image_drop: Tensor | None = None
    ) -> dict[str, Tensor]:
        states = to_device(batch["encoder_hidden_states"], device, torch.float32)  # (B, L, D)
        mask = to_device(batch["encoder_attention_mask"], device)  # (B, L) bool
        if drop is not None:  # caption dropout: the dropped samples get the empty prompt
            null_states, null_mask = self._null(states.shape[1], device)  # (1, L, D), (1, L)
            dropped = drop.to(device) == 1  # (B,)
            states = torch.where(dropped[:, None, None], null_states, states)
            mask = torch.where(dropped[:, None], null_mask, mask)
        if "image_encoder_hidden_states" in batch:  # joint training: each of the K images its own caption
            return self._with_images(batch, device, states, mask, image_drop)
        return {"encoder_hidden_states": states, "encoder_attention_mask": mask}

    def _with_images(
        self, batch: dict, device: torch.device, states: Tensor, mask: Tensor, drop: Tensor | None
    ) -> dict[str, Tensor]:
        """The clip's caption then its K images' own, (B, 1+K, L, D) and (B, 1+K, L), padded to one length
        L (the longer of the two datasets' caption lengths); ``drop`` (B,): a sample's image captions
        replaced by the empty prompt together."""
        images = to_device(batch["image_encoder_hidden_states"], device, torch.float32)  # (B, K, Li, D)
        image_mask = to_device(batch["image_encoder_attention_mask"], device)  # (B, K, Li)
        length = max(states.shape[1], images.shape[2])
        if drop is not None:
            null_states, null_mask = self._null(images.shape[2], device)  # (1, Li, D), (1, Li)
            dropped = drop.to(device) == 1  # (B,)
            images = torch.where(dropped[:, None, None, None], null_states[:, None], images)
            image_mask = torch.where(dropped[:, None, None], null_mask[:, None], image_mask)

        def padded(x: Tensor, dim: int) -> Tensor:  # zeros (False) after the last token, to ``length``
            pad = list(x.shape)
            pad[dim] = length - x.shape[dim]
            return torch.cat([x, x.new_zeros(pad)], dim=dim)

        states = torch.cat([padded(states, 1)[:, None], padded(images, 2)], dim=1)  # (B, 1+K, L, D)
        mask = torch.cat([padded(mask, 1)[:, None], padded(image_mask, 2)], dim=1)  # (B, 1+K, L)
        return {"encoder_hidden_states": states, "encoder_attention_mask": mask}

    def check_request(self, sample: SampleConfig) -> None:
        if sample.classes:
            raise RequestError("sample.classes given, but the model is text-to-video: give prompts instead")

    def for_samples(self, sample: SampleConfig, indices: list[int], device: torch.device) -> Condition:
        if not self.prompt_embeds:
            raise RequestError("a text-to-video model samples from prompts: give --prompt or --prompts FILE")
        chosen = [self.prompt_embeds[i % len(self.prompt_embeds)] for i in indices]
        length = max(len(e) for e in chosen)
        if self.null_caption is not None:  # one length for the prompts and the null condition they pair with
            length = max(length, len(self.null_caption))
        states, mask = pad_captions(chosen, length, device)  # (N, L, D), (N, L)
        kwargs = {"encoder_hidden_states": states, "encoder_attention_mask": mask}
        null = None
        if self.null_caption is not None:
            null_states, null_mask = self._null(length, device)  # (1, L, D), (1, L)
            null = {
                "encoder_hidden_states": null_states.expand(len(indices), -1, -1),
                "encoder_attention_mask": null_mask.expand(len(indices), -1),
            }
        return Condition(kwargs, null)

    def describe(self, sample: SampleConfig, index: int) -> dict:
        return {"prompt": self.prompts[index % len(self.prompts)] if self.prompts else None}


def pad_captions(
    embeds: Sequence[Tensor | np.ndarray], length: int, device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor]:
    """Unpadded caption embeddings ((L_i, D) each, 0 < L_i <= length) -> (N, L, D) float32, zeros after each
    caption's tokens, and the (N, L) bool mask of the real tokens (True = real). Fixed shapes whatever the
    captions (friendly to compile and ZeRO); the loader, training and sampling all pad through here. A
    ``ValueError`` for a caption longer than ``length``, an empty one, or mixed widths."""
    if not len(embeds):
        raise ValueError("pad_captions needs at least one caption")
    width = embeds[0].shape[-1]
    states = torch.zeros(len(embeds), length, width, device=device)  # (N, L, D)
    mask = torch.zeros(len(embeds), length, dtype=torch.bool, device=device)  # (N, L)
    for i, e in enumerate(embeds):
        if e.ndim != 2 or e.shape[1] != width or not 0 < e.shape[0] <= length:
            raise ValueError(
                f"caption {i} has shape {tuple(e.shape)}, expected (L, {width}) with 0 < L <= {length}"
            )
        value = torch.from_numpy(e) if isinstance(e, np.ndarray) else e
        states[i, : len(value)] = value.to(device, torch.float32)
        mask[i, : len(value)] = True
    return states, mask


def _not_text(sample: SampleConfig) -> None:
    """What only a text-to-video model can do."""
    if sample.prompts:
        raise RequestError("sample.prompts given, but the model is not text-to-video")
    if sample.images:
        raise RequestError("sample.images (text-to-image) needs a text-to-video model")


def conditioning_of(model: ModelConfig, null_caption: Tensor | None = None) -> Conditioning:
    """The conditioning a model config describes (``null_caption``: the empty prompt's embedding, for a
    text-to-video model: from the dataset's index in training)."""
    from latte.config import caption_channels_of

    channels = caption_channels_of(model)
    if channels:
        return TextCaptions(channels, model.caption_dropout_prob, null_caption)
    if model.num_classes:
        return ClassLabels(model.num_classes, model.class_dropout_prob)
    return Unconditional()


def to_device(tensor: Tensor, device: torch.device, dtype: torch.dtype | None = None) -> Tensor:
    """Host batch tensor -> ``device`` without a blocking copy: pinned (the loader's workers pin already on
    CUDA) and ``non_blocking``. The caching host allocator keeps the pinned buffer until the copy is done."""
    if device.type == "cuda" and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, dtype, non_blocking=True)
