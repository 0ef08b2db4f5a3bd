"""The one table from a precision's name in the config (``fp32``, ``bf16``, ``fp16``) to its torch dtype, and
the call that runs a network in one of them under the diffusion's fp32 arithmetic."""

from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def call_in(net, dtype: torch.dtype, x_t: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
    """``net`` as the diffusion math calls a model: the input (and floating conditioning such as caption
    embeddings) cast to ``dtype``, what the network computes in (other kwargs, e.g. ``use_image_num``, as
    they are); the output back to fp32 (the diffusion's arithmetic stays fp32)."""
    kwargs = {
        k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kwargs.items()
    }
    return net(x_t.to(dtype), t, **kwargs).float()
