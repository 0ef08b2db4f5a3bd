"""Shared test set-up: CPU-only DeepSpeed, the repository root importable, the shared/ folder located."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before any `import deepspeed`: no CUDA here
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
