"""A tiny progress bar on stderr: count, loss, accuracy, images/s (no tqdm needed)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """One line per epoch, redrawn in place on a terminal; printed once when done otherwise."""

    def __init__(self, total: int, desc: str, stream: TextIO | None = None, width: int = 24):
        self.total = max(total, 1)
        self.desc = desc
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.done = 0
        self.fields: dict[str, float] = {}
        self.start = time.perf_counter()
        self._last_draw = 0.0
        self._tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    @property
    def rate(self) -> float:
        """Items per second so far."""
        return self.done / max(time.perf_counter() - self.start, 1e-9)

    def update(self, n: int, **fields: float) -> None:
        """Count `n` more items and show the latest field values."""
        self.done += n
        self.fields.update(fields)
        now = time.perf_counter()
        if self._tty and now - self._last_draw > 0.1:
            self._last_draw = now
            self.stream.write("\r" + self.line())
            self.stream.flush()

    def line(self) -> str:
        """The bar as text."""
        filled = int(self.width * min(self.done / self.total, 1.0))
        bar = "#" * filled + "." * (self.width - filled)
        parts = [f"{self.desc} [{bar}] {self.done}/{self.total}"]
        parts += [f"{k} {v:.4f}" for k, v in self.fields.items()]
        parts.append(f"{self.rate:.1f} img/s")
        return "  ".join(parts)

    def close(self) -> None:
        """Draw the final state and end the line."""
        self.stream.write(("\r" if self._tty else "") + self.line() + "\n")
        self.stream.flush()
