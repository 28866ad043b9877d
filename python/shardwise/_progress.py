"""A tiny progress bar for the command line: stderr only, TTY only, silent until work takes a moment."""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

__all__ = ["Progress", "human_bytes"]


def human_bytes(n: float) -> str:
    """``1536`` → ``1.5 kB`` (decimal units, as disk sizes are usually shown)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


class Progress:
    """``with Progress(total, "hashing", enabled=True) as p: p.update(n)`` draws a bar on stderr.

    Drawn only when ``enabled`` and stderr is a terminal, and only once the work has taken more than
    ``delay`` seconds (instant operations print nothing). Thread-safe; redraws at most 10 times a second.
    """

    def __init__(
        self,
        total: int,
        label: str,
        *,
        enabled: bool = True,
        unit: str = "B",
        delay: float = 0.3,
        stream: TextIO | None = None,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = bool(enabled) and _isatty(self.stream)
        self.total = max(0, int(total))
        self.label = label
        self.unit = unit
        self.delay = delay
        self.done = 0
        self._start = time.perf_counter()
        self._last = 0.0
        self._drawn = False
        self._lock = threading.Lock()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int) -> None:
        """Count ``n`` more units of work done."""
        with self._lock:
            self.done += n
            if not self.enabled:
                return
            now = time.perf_counter()
            if now - self._start < self.delay or now - self._last < 0.1:
                return
            self._last = now
            self._draw(now)

    def set_label(self, label: str) -> None:
        with self._lock:
            self.label = label

    def _fmt(self, n: float) -> str:
        return human_bytes(n) if self.unit == "B" else f"{n:.0f} {self.unit}"

    def _draw(self, now: float) -> None:
        width = 24
        frac = min(1.0, self.done / self.total) if self.total else 1.0
        filled = int(frac * width)
        bar = "#" * filled + "." * (width - filled)
        elapsed = max(now - self._start, 1e-9)
        rate = self._fmt(self.done / elapsed) + "/s"
        line = f"\r{self.label} [{bar}] {frac:4.0%} {self._fmt(self.done)}/{self._fmt(self.total)} {rate}"
        self.stream.write(line + "\x1b[K")
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        """Erase the bar (if one was drawn) so that the next output starts on a clean line."""
        with self._lock:
            if self._drawn:
                self.stream.write("\r\x1b[K")
                self.stream.flush()
                self._drawn = False
            self.enabled = False


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
