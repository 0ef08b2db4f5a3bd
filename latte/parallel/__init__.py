"""Parallelism across ranks inside one sample (sequence parallelism)."""
