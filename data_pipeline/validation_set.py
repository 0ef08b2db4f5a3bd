"""The fixed held-out clips of the validation loss: the first ``clips`` readable samples of a dataset, in
index order (shard by shard, sample by sample), read once.

    val = ValidationSet.read(cfg.data.val_index, clips=64, expected=expected_of(cfg))
    val.ids                          # the chosen samples' ids, the same on every rank and world size
    val.batch(positions)             # {"latent": (n, F, C, h, w) float32, "y" / captions as the loader's}

The set depends on the index alone, not on the world size, seeds or training: each latent is drawn once
from its stored posterior (``mean + std * eps``) with eps seeded by the sample's id (``noise_seed(0, 0,
id)``), so a value logged for a checkpoint is a function of the checkpoint and the dataset. Every rank reads
the same samples (a few shards' worth) and keeps them in host memory; a rank evaluates its share.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from data_pipeline.epoch_plan import Piece
from data_pipeline.index import DatasetFacts, index_url_for, load_index
from data_pipeline.latent_sample import Sample, SampleSpec, draw_batch
from data_pipeline.loader import Expected, check_facts
from data_pipeline.stream_batches import PieceSource

VALIDATION_SEED = 0  # the latents' posterior draw: fixed, so values compare across runs and configs


class ValidationSetError(ValueError):
    """The validation index cannot give a validation set (one line naming it)."""


@dataclass
class ValidationSet:
    index_url: str
    facts: DatasetFacts
    spec: SampleSpec
    samples: list[Sample]  # in index order
    skipped: int  # unreadable samples passed over
    _drawn: dict[tuple[int, ...], dict[str, Any]] = field(default_factory=dict, repr=False)

    @property
    def ids(self) -> list[str]:
        return [s.id for s in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    @classmethod
    def read(
        cls, index_url: str, clips: int, expected: Expected | None = None, like: DatasetFacts | None = None
    ) -> ValidationSet:
        """The first ``clips`` readable samples of ``index_url`` (all of them when it holds fewer);
        ``expected``: the training config's checks (shape, scaling factor, classes, caption width); ``like``:
        the training data's facts, which it must share (VAE, scaling factor, text encoder, classes)."""
        url = index_url_for(index_url)
        try:
            index = load_index(url)
            check_facts(index.facts, expected or Expected(), url)
        except ValueError as exc:
            raise ValidationSetError(f"data.val_index: {exc}") from None
        for name in ("vae", "scaling_factor", "text_encoder", "classes") if like is not None else ():
            ours, theirs = getattr(index.facts, name), getattr(like, name)
            if ours != theirs:
                raise ValidationSetError(
                    f"data.val_index '{url}' was made with another {name} than the training data: "
                    f"{ours!r}, the training data's is {theirs!r}"
                )
        spec = SampleSpec.of(index.facts, without=(expected or Expected()).declined())
        names = [s.url for s in index.shards]
        source = PieceSource(index.shard_urls(url), names, spec, Counter(), dataset=url)
        samples: list[Sample] = []
        skipped = 0
        pieces = [Piece(shard, 0, info.samples) for shard, info in enumerate(index.shards)]
        for sample in source.slots(pieces):  # lazily: reading stops once enough samples are in
            if sample is None:
                skipped += 1
                continue
            samples.append(sample)
            if len(samples) == clips:
                break
        if not samples:
            raise ValidationSetError(f"data.val_index '{url}' has no readable samples")
        return cls(url, index.facts, spec, samples, skipped)

    def batch(self, positions: Sequence[int]) -> dict[str, Any]:
        """The samples at ``positions`` (into ``samples``) as a loader batch: ``latent`` (n, F, C, h, w)
        float32, drawn as described above, plus the labels / padded captions the dataset carries. Drawn once
        per ``positions`` (every evaluation asks for the same batches) and kept: callers must not modify
        it."""
        key = tuple(positions)
        if key not in self._drawn:
            chosen = [self.samples[p] for p in key]
            self._drawn[key] = draw_batch(chosen, self.spec, VALIDATION_SEED, 0, torch.float32)
        return self._drawn[key]
