"""What a sample carries, declared once (``FIELDS``); how it is decoded from a shard and made into a batch.

Each ``Field`` names its batch key, its tar members (``KEY.<member>`` in a shard), the index fact that says a
dataset carries it (``None``: every dataset must), how its members are decoded and checked against the
index's facts, and how a batch's values are collated. ``decode_sample``, ``draw_batch``, the members the
loader reads, its batch keys and the synthetic stream's keys all follow from this table:

    batch key(s)            members                     index fact     in a batch
    latent                  latent.npy, latent_std.npy  - (all)        (B, F, C, h, w) float: mean + std * eps
    y                       cls                         classes        (B,) int64 label in [0, len(classes))
    encoder_hidden_states,  caption.npy                 text_encoder   (B, L, D) float, zeros past each
      encoder_attention_mask                                           caption; (B, L) bool, True = real token

then ``key``: the batch's sample ids. ``latent.npy`` holds the posterior mean x scaling factor, shape
(F, C, h, w), in the index's dtype; ``latent_std.npy`` the posterior std x scaling factor, same shape and
dtype; ``cls`` an ASCII decimal label; ``caption.npy`` the text encoder's hidden states of the caption's real
tokens, (L_i, D) float16 with 0 < L_i <= L = the index's ``max_caption_tokens`` and D its
``caption_channels``, padded to L in the batch (fixed shapes); ``caption.txt`` (the caption, UTF-8) and
``KEY.json`` (metadata) are not read. Every sample of a dataset whose fact is set must carry the field; a
consumer may decline an optional one by its (first) batch key (an unconditional model gets no ``y`` from a
labelled dataset, a class-conditional one no captions). A field's collate gives one batch entry, or one per
batch key (``Field.keys``) when it has several.

Adding a field is one ``Field`` in ``FIELDS``, its fact in ``data_pipeline.index.DatasetFacts`` (defaulting
to "absent", so earlier indexes still read), and the sharding job writing its members.

The noise ``eps`` of a sample comes from a generator seeded by (seed, epoch, sample id), so a sample gets the
same latent in an epoch whatever rank, worker or position reads it, and a new one every epoch.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from data_pipeline.index import DatasetFacts

MEAN, STD, LABEL = "latent.npy", "latent_std.npy", "cls"  # tar members
CAPTION, CAPTION_TEXT = "caption.npy", "caption.txt"  # tar members (the text is stored, not read)
KEY = "key"  # the batch key of the sample ids (every batch of the loader has it)
_NPY_MAGIC = b"\x93NUMPY"


class CorruptSample(ValueError):
    """A sample whose members are missing or do not decode to what the index promises."""


@dataclass(frozen=True)
class Draw:
    """The batch being collated: its sample ids, the (seed, epoch) of the noise, the dtype of float values."""

    ids: list[str]
    seed: int
    epoch: int
    dtype: torch.dtype
    facts: DatasetFacts | None = None  # the dataset's (e.g. the caption length to pad to)


@dataclass(frozen=True)
class Field:
    """One thing a sample carries (see the module docstring)."""

    key: str  # its batch key (the first, if it has several): the name a consumer declines it by
    members: tuple[str, ...]  # its tar members, all present in every sample that carries it
    fact: str | None  # the DatasetFacts attribute, truthy where the dataset carries it; None = every dataset
    decode: Callable[[str, Mapping[str, bytearray], DatasetFacts], Any]  # (id, members, facts) -> value
    # the values of a batch's samples -> its batch entry, or {batch key: entry} for each of ``keys``
    collate: Callable[[list[Any], Draw], torch.Tensor | dict[str, torch.Tensor]]
    also: tuple[str, ...] = ()  # further batch keys its collate fills

    @property
    def keys(self) -> tuple[str, ...]:
        """Its batch keys, in batch order."""
        return (self.key, *self.also)

    @property
    def required(self) -> bool:
        """Carried by every dataset, and by every batch (a consumer cannot decline it)."""
        return self.fact is None


@dataclass(frozen=True)
class SampleSpec:
    """What every sample of a dataset must look like: the index's facts and the fields its samples carry."""

    facts: DatasetFacts
    fields: tuple[Field, ...]  # in ``FIELDS`` order

    @classmethod
    def of(cls, facts: DatasetFacts, without: Collection[str] = ()) -> SampleSpec:
        """The spec of a dataset with ``facts``, less the optional fields with batch keys in ``without``."""
        return cls(facts, carried_fields(facts, without))

    @property
    def members(self) -> frozenset[str]:
        """The tar members read of a sample (the others, e.g. its ``.json``, are skipped)."""
        return frozenset(m for f in self.fields for m in f.members)

    @property
    def batch_keys(self) -> tuple[str, ...]:
        return (*(k for f in self.fields for k in f.keys), KEY)


@dataclass(frozen=True)
class Sample:
    id: str  # "<shard url relative to the index>/<key>": unique in the dataset, stable across copies of it
    values: dict[str, Any]  # the decoded value of each field of the spec, by batch key


@functools.lru_cache(maxsize=64)
def _npy_header(text: bytes) -> tuple[np.dtype, tuple[int, ...], bool]:
    """(dtype, shape, Fortran order) of an ``.npy`` header dict (all samples share a few: cached)."""
    header = ast.literal_eval(text.decode("latin1"))
    return np.dtype(header["descr"]), tuple(header["shape"]), bool(header["fortran_order"])


def _finite(array: np.ndarray) -> bool:
    if array.dtype == np.float16:  # exponent bits all ones = Inf or NaN; 10x faster than np.isfinite on fp16
        return not ((array.view(np.uint16) & 0x7C00) == 0x7C00).any()
    return bool(np.isfinite(array).all())


def _npy_layout(buffer: bytearray, name: str) -> tuple[np.dtype, tuple[int, ...], bool, int]:
    """(dtype, shape, Fortran order, data offset) of a ``.npy`` file in ``buffer``."""
    view = memoryview(buffer)
    if len(view) < 10 or bytes(view[:6]) != _NPY_MAGIC:
        raise CorruptSample(f"{name} is not an .npy file")
    width = 2 if view[6] == 1 else 4  # format 1.0 has a 2-byte header length, 2.0 and 3.0 a 4-byte one
    start = 8 + width + int.from_bytes(view[8 : 8 + width], "little")
    try:
        found, found_shape, fortran = _npy_header(bytes(view[8 + width : start]))
    except (ValueError, SyntaxError, KeyError, TypeError) as exc:
        raise CorruptSample(f"{name} has an unreadable .npy header: {exc}") from None
    return found, found_shape, fortran, start


def parse_npy(buffer: bytearray, shape: Sequence[int | range], dtype: str, name: str) -> np.ndarray:
    """A ``.npy`` file's array as a zero-copy view of ``buffer``; checks dtype, shape (an entry may be a
    ``range`` of allowed lengths) and finiteness."""
    found, found_shape, fortran, start = _npy_layout(buffer, name)
    fits = len(found_shape) == len(shape) and all(
        n in want if isinstance(want, range) else n == want
        for n, want in zip(found_shape, shape, strict=False)
    )
    if found != np.dtype(dtype) or fortran or not fits:
        promised = [f"{w.start}..{w.stop - 1}" if isinstance(w, range) else w for w in shape]
        raise CorruptSample(
            f"{name} holds {found.name}{list(found_shape)}{' (Fortran order)' if fortran else ''}, "
            f"the index promises {dtype}{promised}".replace("'", "")
        )
    view, shape = memoryview(buffer), found_shape
    count = math.prod(shape)
    if len(view) - start != count * found.itemsize:
        raise CorruptSample(f"{name} has {len(view) - start} data bytes, expected {count * found.itemsize}")
    array = np.frombuffer(buffer, dtype=found, count=count, offset=start).reshape(shape)  # (F, C, h, w)
    if not _finite(array):
        raise CorruptSample(f"{name} holds NaN or Inf")
    return array


def noise_seed(seed: int, epoch: int, sample_id: str) -> int:
    """The seed of a sample's noise in an epoch (63 bits, from a hash: independent of order and layout)."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{sample_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


# --------------------------------------------------------------------------------------------------------
# The fields: decode (members -> value, raising CorruptSample) and collate (values -> batch entry)
# --------------------------------------------------------------------------------------------------------


def _decode_latent(
    sample_id: str, members: Mapping[str, bytearray], facts: DatasetFacts
) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std), each (F, C, h, w) in the stored dtype."""
    shape = tuple(facts.latent_shape)
    mean = parse_npy(members[MEAN], shape, facts.dtype, f"{sample_id}.{MEAN}")
    std = parse_npy(members[STD], shape, facts.dtype, f"{sample_id}.{STD}")
    return mean, std


def _draw_latent(values: list[tuple[np.ndarray, np.ndarray]], draw: Draw) -> torch.Tensor:
    """``mean + std * eps`` (B, F, C, h, w), computed in float32 (then cast to ``draw.dtype``)."""
    shape = values[0][0].shape  # (F, C, h, w)
    latent = torch.empty((len(values), *shape), dtype=torch.float32)  # (B, F, C, h, w)
    generator = torch.Generator()
    for i, (sample_id, (mean, std)) in enumerate(zip(draw.ids, values, strict=True)):
        generator.manual_seed(noise_seed(draw.seed, draw.epoch, sample_id))
        out = latent[i]  # (F, C, h, w)
        torch.randn(shape, generator=generator, out=out)
        out.mul_(torch.from_numpy(std).float()).add_(torch.from_numpy(mean).float())
    return latent.to(draw.dtype)


def _decode_label(sample_id: str, members: Mapping[str, bytearray], facts: DatasetFacts) -> int:
    try:
        label = int(bytes(members[LABEL]).decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise CorruptSample(f"{sample_id}.{LABEL} is not a decimal integer") from None
    if not 0 <= label < len(facts.classes):
        raise CorruptSample(f"{sample_id}.{LABEL} = {label} is outside [0, {len(facts.classes)})")
    return label


def _stack_labels(values: list[int], draw: Draw) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)  # (B,)


def _decode_caption(sample_id: str, members: Mapping[str, bytearray], facts: DatasetFacts) -> np.ndarray:
    """The caption's (L_i, D) float16 hidden states, its real tokens only (0 < L_i <= max tokens)."""
    shape = (range(1, facts.max_caption_tokens + 1), facts.caption_channels)
    return parse_npy(members[CAPTION], shape, "float16", f"{sample_id}.{CAPTION}")


def _pad_captions(values: list[np.ndarray], draw: Draw) -> dict[str, torch.Tensor]:
    """``encoder_hidden_states`` (B, L, D) in ``draw.dtype`` and ``encoder_attention_mask`` (B, L) bool, L
    the index's ``max_caption_tokens``."""
    from data_pipeline.text_encoder import pad_captions

    assert draw.facts is not None  # (draw_batch passes the spec's)
    embeds, mask = pad_captions(values, draw.facts.max_caption_tokens)  # (B, L, D) float32, (B, L)
    return {CAPTION_FIELD.key: embeds.to(draw.dtype), CAPTION_FIELD.also[0]: mask}


LATENT_FIELD = Field("latent", (MEAN, STD), None, _decode_latent, _draw_latent)
LABEL_FIELD = Field("y", (LABEL,), "classes", _decode_label, _stack_labels)
CAPTION_FIELD = Field(
    "encoder_hidden_states",
    (CAPTION,),
    "text_encoder",
    _decode_caption,
    _pad_captions,
    ("encoder_attention_mask",),
)
FIELDS: tuple[Field, ...] = (LATENT_FIELD, LABEL_FIELD, CAPTION_FIELD)  # batch order


def carried_fields(
    facts: DatasetFacts | Mapping[str, Any], without: Collection[str] = ()
) -> tuple[Field, ...]:
    """The fields a dataset's samples carry: every required one and each optional one whose fact is set in
    ``facts`` (the index's ``DatasetFacts``, or a mapping of fact names for data made on the fly), less those
    whose batch keys are in ``without``."""
    declined = [f.key for f in FIELDS if f.required and f.key in without]
    if declined:
        raise ValueError(f"fields {declined} are carried by every sample and cannot be declined")

    def has(fact: str) -> bool:
        return bool(facts.get(fact) if isinstance(facts, Mapping) else getattr(facts, fact, None))

    return tuple(f for f in FIELDS if f.key not in without and (f.required or has(f.fact)))


def decode_sample(sample_id: str, members: Mapping[str, bytearray], spec: SampleSpec) -> Sample:
    """Check and decode one sample's members; raises ``CorruptSample`` saying what is wrong."""
    missing = [m for f in spec.fields for m in f.members if m not in members]
    if missing:
        raise CorruptSample(f"sample '{sample_id}' lacks {', '.join(missing)}")
    return Sample(sample_id, {f.key: f.decode(sample_id, members, spec.facts) for f in spec.fields})


def draw_batch(
    samples: Sequence[Sample], spec: SampleSpec, seed: int, epoch: int, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor | list[str]]:
    """A batch ``{"latent": (B, F, C, h, w), "y": (B,) int64 when labelled, "encoder_hidden_states": (B, L,
    D) and "encoder_attention_mask": (B, L) bool when captioned, "key": [B sample ids]}``: the entries of
    each field of ``spec``, then the sample ids. ``latent = mean + std * eps``, eps ~ N(0, 1) per
    sample, computed in float32 and cast to ``dtype``."""
    draw = Draw([s.id for s in samples], seed, epoch, dtype, spec.facts)
    batch: dict[str, torch.Tensor | list[str]] = {}
    for f in spec.fields:
        entry = f.collate([s.values[f.key] for s in samples], draw)
        batch.update(entry if isinstance(entry, dict) else {f.key: entry})
    batch[KEY] = draw.ids
    return batch
