"""A progress bar over denoising steps: tqdm when it is installed, else a line rewritten every ~2%."""

from __future__ import annotations

import sys
import time
from typing import Any


class Progress:
    """``with Progress(total, enabled) as bar: ... bar.update()``; prints nothing when not enabled."""

    def __init__(self, total: int, enabled: bool = True, label: str = "steps") -> None:
        self.total, self.enabled, self.label = total, enabled, label
        self.done, self._shown, self._start = 0, -1, time.perf_counter()
        self._bar: Any = None
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(total=total, desc=label, unit="step", dynamic_ncols=True)

    def update(self) -> None:
        self.done += 1
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update()
            return
        percent = 100 * self.done // max(1, self.total)
        if percent // 2 != self._shown // 2 or self.done == self.total:
            self._shown = percent
            rate = self.done / max(time.perf_counter() - self._start, 1e-9)
            print(f"\r{self.label}: {self.done}/{self.total} ({percent}%, {rate:.1f} step/s)", end="",
                  file=sys.stderr, flush=True)  # fmt: skip

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled:
            print(file=sys.stderr, flush=True)
