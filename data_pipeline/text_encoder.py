"""The text side: a T5 encoder + tokenizer that turns captions (sharding job) and prompts (sampling) into
unpadded embeddings, and the padding both sides apply before the model sees them.

    encoder = load_text_encoder("DeepFloyd/t5-v1_1-xxl", device="cuda")   # or a local directory
    embeds, truncated = encoder.encode(["a dog runs on the beach", ""])    # [(L_i, D) float16], count
    hidden, mask = pad_captions(embeds, encoder.max_length)                 # (B, L, D) float32, (B, L) bool

``path_or_id``: a transformers ``T5EncoderModel`` + ``AutoTokenizer`` in one directory (or hub id), or a
diffusers pipeline directory holding ``text_encoder/`` and ``tokenizer/`` (as Latte-1's and PixArt's do).
Latte-1 uses T5 v1.1 XXL with 120 tokens. A caption is cut to ``max_length`` tokens (its end-of-sequence
token kept, as ``truncation=True`` does) and counted; only the real tokens' hidden states are kept.

Encoding runs under ``torch.no_grad`` in batches of ``batch_size``, fp32 on the CPU and bf16 on a GPU that
has it (fp16 overflows in T5 v1.1). ``transformers`` is imported only when an encoder is loaded, so the
loader, which only pads, never imports it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latte.conditioning import pad_captions  # the one padding of captions (re-exported here)
from latte.errors import first_line

DEFAULT_MAX_LENGTH = 120  # Latte-1's (and PixArt-alpha's) caption length


class TextEncoderError(RuntimeError):
    """A text encoder that cannot be loaded; one line naming it."""


@dataclass
class TextEncoder:
    """A T5 encoder in eval mode on one device, with its tokenizer."""

    model: torch.nn.Module
    tokenizer: Any
    name: str  # the local path or hub id it was loaded from (recorded in the dataset index)
    max_length: int = DEFAULT_MAX_LENGTH
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    batch_size: int = 32

    def __str__(self) -> str:
        where = f"on {self.device} ({self.dtype})"
        return f"text encoder {self.name} {where}, width {self.width}, {self.max_length} tokens"

    @property
    def width(self) -> int:
        """D, the width of its hidden states (4096 for T5 v1.1 XXL)."""
        return int(self.model.config.d_model)

    def token_counts(self, texts: Sequence[str]) -> list[int]:
        """Tokens of each text without truncation (end-of-sequence token included)."""
        tokens = self.tokenizer(list(texts), truncation=False, verbose=False)  # (no "longer than" warning)
        return [len(ids) for ids in tokens["input_ids"]]

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> tuple[list[np.ndarray], int]:
        """(each text's (L_i, D) float16 hidden states over its real tokens, L_i <= max_length; how many
        texts were cut to ``max_length`` tokens). The empty text "" gives one token (T5's ``</s>``)."""
        texts = list(texts)
        truncated = sum(n > self.max_length for n in self.token_counts(texts))
        out: list[np.ndarray] = []
        for start in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(
                texts[start : start + self.batch_size],
                max_length=self.max_length,
                truncation=True,
                padding="longest",
                return_tensors="pt",
            )
            ids = tokens["input_ids"].to(self.device)  # (b, l)
            mask = tokens["attention_mask"].to(self.device)  # (b, l) 1 = real token
            hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state  # (b, l, D)
            hidden = hidden.float().cpu()
            for row, length in zip(hidden, mask.sum(1).tolist(), strict=True):
                out.append(row[: int(length)].to(torch.float16).numpy())  # (L_i, D): the real tokens
        return out, truncated


def _resolve_dtype(device: torch.device, name: str) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    table = {"fp32": torch.float32, "bf16": torch.bfloat16}
    if name not in table:
        raise TextEncoderError(
            f"text encoder dtype must be auto, fp32 or bf16 (fp16 overflows in T5), got {name}"
        )
    return table[name]


def _locations(path_or_id: str) -> tuple[dict, dict]:
    """(model kwargs, tokenizer kwargs): a local pipeline directory's ``text_encoder``/``tokenizer``."""
    root = Path(path_or_id)
    if root.is_dir() and not (root / "config.json").is_file() and (root / "text_encoder").is_dir():
        return {"subfolder": "text_encoder"}, {"subfolder": "tokenizer"}
    return {}, {}


def load_text_encoder(
    path_or_id: str,
    device: str | torch.device = "cpu",
    dtype: str = "auto",
    max_length: int = DEFAULT_MAX_LENGTH,
    batch_size: int = 32,
) -> TextEncoder:
    """Load a ``T5EncoderModel`` + ``AutoTokenizer`` from a local directory or hub id (a pipeline repo's
    ``text_encoder``/``tokenizer`` subfolders too). Raises ``TextEncoderError`` with one line."""
    if max_length < 1:
        raise TextEncoderError(f"the caption length must be at least 1 token, got {max_length}")
    device = torch.device(device)
    torch_dtype = _resolve_dtype(device, dtype)
    try:
        from transformers import AutoTokenizer, T5EncoderModel
    except ImportError as exc:
        raise TextEncoderError(f"captions need transformers (pip install transformers): {exc}") from None
    model_kw, tokenizer_kw = _locations(path_or_id)
    try:
        try:
            model = T5EncoderModel.from_pretrained(path_or_id, dtype=torch_dtype, **model_kw)
            tokenizer = AutoTokenizer.from_pretrained(path_or_id, **tokenizer_kw)
        except OSError:
            if model_kw or Path(path_or_id).is_dir():
                raise
            # a hub pipeline repo (e.g. maxin-cn/Latte-1): the encoder and tokenizer sit in subfolders
            model = T5EncoderModel.from_pretrained(path_or_id, dtype=torch_dtype, subfolder="text_encoder")
            tokenizer = AutoTokenizer.from_pretrained(path_or_id, subfolder="tokenizer")
    except Exception as exc:  # OSError, ValueError, HF hub errors: all one line
        raise TextEncoderError(
            f"cannot load the text encoder '{path_or_id}': {type(exc).__name__}: {first_line(exc)}"
        ) from None
    model.to(device).eval().requires_grad_(False)
    return TextEncoder(model, tokenizer, path_or_id, max_length, device, torch_dtype, batch_size)


__all__ = ["TextEncoder", "TextEncoderError", "load_text_encoder", "pad_captions"]
