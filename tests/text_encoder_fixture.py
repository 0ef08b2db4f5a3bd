"""A tiny random T5 encoder + tokenizer, made once per session (``data_pipeline.toy_text``; ~2 s, offline).

from text_encoder_fixture import tiny_t5_dir

@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory) -> str:
    return tiny_t5_dir(tmp_path_factory)   # the same directory for every module of the session
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded: the encoder is a local directory
_made: dict[int, str] = {}


def tiny_t5_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The session's tiny T5 directory (width 32, 120 tokens), made on first use."""
    from data_pipeline.toy_text import make_tiny_t5

    key = id(tmp_path_factory)
    if key not in _made:
        _made[key] = str(make_tiny_t5(tmp_path_factory.mktemp("tiny_t5")))
    return _made[key]
