"""The one line an error is reported in: the first non-empty line of an exception's message.

Standard library only, so that every part (the models, the data pipeline, benchmarks) may import it.
"""

from __future__ import annotations


def first_line(exc: BaseException, limit: int | None = None, default: str | None = None) -> str:
    """The first non-empty line of ``str(exc)``, at most ``limit`` characters; for an empty message
    ``default`` (None: the exception's type name)."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else (type(exc).__name__ if default is None else default)
    return line[:limit] if limit is not None else line
