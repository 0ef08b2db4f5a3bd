"""Prompts of a text-to-video model: prompt files, and precomputed prompt embeddings (``--prompt-embeds``).

A prompt-embeds file (``torch.save`` .pt, or .safetensors) holds what the T5 encoder gives, as diffusers'
``LattePipeline.encode_prompt`` returns it:

    prompt_embeds                  (N, L, D) float      one row per prompt, padded
    prompt_attention_mask          (N, L) bool/0-1      optional: the real tokens (default: all)
    negative_prompt_embeds         (L0, D) or (1, L0, D) optional: the null condition (default: the dataset's)
    negative_prompt_attention_mask (L0,) or (1, L0)      optional
    prompts                        list of N strings    optional (.pt only): named in samples.json

so machines without T5 (or without the 9 GB T5-XXL) can sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor


class PromptError(ValueError):
    """A prompt file or prompt-embeds file that cannot be used; one line naming it."""


@dataclass(frozen=True)
class PromptEmbeds:
    prompts: tuple[str, ...]  # the texts ("" where a file gave none)
    embeds: tuple[Tensor, ...]  # (L_i, D) float32 each, real tokens only
    negative: Tensor | None  # (L0, D) float32, or None: not in the file


def read_prompt_file(path: str | Path) -> list[str]:
    """One prompt per non-empty line."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise PromptError(f"cannot read the prompts file '{path}': {exc}") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise PromptError(f"the prompts file '{path}' has no prompt (one per line)")
    return prompts


def _unpad(states: Tensor, mask: Tensor | None) -> list[Tensor]:
    """(N, L, D) + (N, L) real-token mask -> [(L_i, D)] (the real tokens of each row)."""
    if mask is None:
        return [row.float() for row in states]
    return [row[m.bool()].float() for row, m in zip(states, mask, strict=True)]


def load_prompt_embeds(path: str | Path, width: int) -> PromptEmbeds:
    """The embeddings in ``path``, checked against the model's caption width ``width``."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            data = dict(load_file(str(path)))
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # missing, truncated, not a tensor file
        raise PromptError(f"cannot read --prompt-embeds '{path}': {type(exc).__name__}: {exc}") from None
    if not isinstance(data, dict) or "prompt_embeds" not in data:
        raise PromptError(f"--prompt-embeds '{path}' has no 'prompt_embeds' tensor (N, L, D)")
    states = data["prompt_embeds"]
    if states.dim() == 2:  # one prompt: (L, D)
        states = states[None]
    if states.dim() != 3 or states.shape[-1] != width:
        raise PromptError(
            f"--prompt-embeds '{path}' holds embeddings of shape {tuple(states.shape)}: the model takes "
            f"(N, L, {width}) (its text encoder's width is {width})"
        )
    embeds = _unpad(states, data.get("prompt_attention_mask"))
    if any(len(e) == 0 for e in embeds):
        raise PromptError(f"--prompt-embeds '{path}': a prompt's attention mask has no real token")
    negative = data.get("negative_prompt_embeds")
    if negative is not None:
        negative = negative.reshape(-1, negative.shape[-1])  # (1, L0, D) or (L0, D) -> (L0, D)
        if negative.shape[-1] != width:
            raise PromptError(
                f"--prompt-embeds '{path}': negative_prompt_embeds has width {negative.shape[-1]}, "
                f"the model takes {width}"
            )
        neg_mask = data.get("negative_prompt_attention_mask")
        negative = _unpad(negative[None], None if neg_mask is None else neg_mask.reshape(1, -1))[0]
    texts = data.get("prompts") or [""] * len(embeds)
    if len(texts) != len(embeds):
        raise PromptError(f"--prompt-embeds '{path}': {len(texts)} prompts for {len(embeds)} embeddings")
    return PromptEmbeds(tuple(texts), tuple(embeds), negative)
