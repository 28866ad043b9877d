"""Progress bars for the command line (tqdm): stderr only, TTY only, silent until work takes a moment.

Bars count bytes: hashed or compared chunks as they go, and for the native writer (which runs with
the GIL released and reports nothing) the bytes this process has written so far, read from
``/proc/self/io`` by a watcher thread (:meth:`Progress.watch_writes`).
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any, TextIO

__all__ = ["Progress", "human_bytes"]

_IO_STATS = "/proc/self/io"


def human_bytes(n: float) -> str:
    """``1536`` → ``1.5 kB`` (decimal units, as disk sizes are usually shown)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def written_bytes() -> int | None:
    """Bytes this process has passed to write(2)/pwrite(2) so far (``wchar``), or None off Linux."""
    try:
        with open(_IO_STATS, "rb") as f:
            for line in f:
                if line.startswith(b"wchar:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


class Progress:
    """``with Progress(total, "sha256", enabled=True) as p: p.update(n)`` draws a tqdm bar on stderr:
    label and current file, percentage, bytes done, elapsed < ETA, throughput.

    Drawn only when ``enabled`` and the stream is a terminal, and only once the work has taken more
    than ``delay`` seconds (instant operations print nothing); redrawn at most every ``interval``
    seconds; erased when done. Thread-safe.
    """

    def __init__(
        self,
        total: int,
        label: str,
        *,
        enabled: bool = True,
        unit: str = "B",
        delay: float = 0.3,
        interval: float = 0.1,
        stream: TextIO | None = None,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = bool(enabled) and _isatty(self.stream)
        self.total = max(0, int(total))
        self.label = label
        self.done = 0
        self._lock = threading.Lock()
        self._bar: Any = None
        self._shown_after = time.monotonic() + delay
        if self.enabled:
            from tqdm import tqdm

            self._bar = tqdm(
                total=self.total or None, desc=label, file=self.stream, unit=unit, unit_scale=True,
                unit_divisor=1000, delay=delay, mininterval=interval, smoothing=0.05, leave=False,
                ncols=_columns(self.stream),
                bar_format=None if self.total else "{desc} {elapsed}",  # unknown total: a ticking clock
            )

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int) -> None:
        """Count ``n`` more units of work done."""
        with self._lock:
            self.done += n
            if self._bar is not None:
                self._bar.update(n)

    def advance_to(self, done: int) -> None:
        """Count work up to ``done`` units (never backwards, never past the total)."""
        with self._lock:
            step = min(done, self.total) - self.done
        if step > 0:
            self.update(step)

    def set_label(self, label: str) -> None:
        """Show ``label`` (e.g. the file being worked on) in front of the bar."""
        with self._lock:
            self.label = label
            if self._bar is not None:
                self._bar.set_description_str(label, refresh=False)

    @contextlib.contextmanager
    def watch_writes(self, interval: float = 0.1) -> Iterator[None]:
        """While the block runs, advance the bar by the bytes this process writes (native writers
        report nothing themselves), and keep elapsed time and ETA moving."""
        with self._ticking(interval, count_writes=True):
            yield

    @contextlib.contextmanager
    def ticking(self, interval: float = 0.1) -> Iterator[None]:
        """While the block runs, redraw the bar (elapsed time moves) although nothing is counted."""
        with self._ticking(interval, count_writes=False):
            yield

    @contextlib.contextmanager
    def _ticking(self, interval: float, count_writes: bool) -> Iterator[None]:
        start = written_bytes() if self.enabled and count_writes else None
        if not self.enabled:
            yield
            return
        base = self.done
        stop = threading.Event()

        def count() -> None:
            now = written_bytes() if start is not None else None
            if start is not None and now is not None:
                self.advance_to(base + now - start)

        def tick() -> None:
            while not stop.wait(interval):
                count()
                with self._lock:
                    if self._bar is not None and time.monotonic() >= self._shown_after:
                        self._bar.refresh()
                        self._mark_drawn()

        thread = threading.Thread(target=tick, name="shardwise-progress", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            count()

    def _mark_drawn(self) -> None:
        """Tell tqdm the bar is on screen, so that ``close()`` erases it: tqdm judges that by its own
        clock against ``start_t + delay``, which a refresh just past our own delay may not reach."""
        bar = self._bar
        if bar is not None:
            bar.last_print_t = max(bar._time(), bar.start_t + bar.delay)

    def close(self) -> None:
        """Erase the bar (if one was drawn) so that the next output starts on a clean line."""
        with self._lock:
            if self._bar is not None:
                self._bar.close()
                self._bar = None
            self.enabled = False


def _columns(stream: TextIO) -> int:
    """The terminal's width; $COLUMNS or 100 where it reports none (a fresh pseudo-terminal says 0)."""
    try:
        cols = os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, ValueError, OSError, io.UnsupportedOperation):
        cols = 0
    if cols:
        return cols
    import shutil

    return shutil.get_terminal_size((100, 24)).columns


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
