"""The one table from a precision's name in the config (``fp32``, ``bf16``, ``fp16``) to its torch dtype."""

from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
