"""A progress bar over denoising steps (tqdm, on standard error)."""

from __future__ import annotations

from tqdm.auto import tqdm


class Progress:
    """``with Progress(total, enabled) as bar: ... bar.update()``; prints nothing when not enabled."""

    def __init__(self, total: int, enabled: bool = True, label: str = "steps") -> None:
        self.total, self.done = total, 0
        self._bar = tqdm(total=total, desc=label, unit="step", dynamic_ncols=True) if enabled else None

    def update(self) -> None:
        self.done += 1
        if self._bar is not None:
            self._bar.update()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.close()
