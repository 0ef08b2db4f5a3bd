"""Writing a local file all at once: readers see the old file or the whole new one, never half of it.

The one atomic write of the project (the config, checkpoints and their pointer, exports, sampled videos,
the dataset index and shards of ``data_pipeline.storage``). Standard library only, so that every part may
import it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def temp_path(path: str | os.PathLike) -> Path:
    """The hidden name ``path`` is written under before the rename publishes it, ``.NAME.tmp-PID``: distinct
    per process, so two writers of one file never write into each other's temporary file."""
    dest = Path(path)
    return dest.with_name(f".{dest.name}.tmp-{os.getpid()}")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> None:
    """``write(tmp_path)``, then rename onto ``path`` (``os.replace``: atomic on one file system)."""
    tmp = temp_path(path)
    write(tmp)
    os.replace(tmp, path)
