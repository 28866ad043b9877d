"""The ``shardwise`` logger: its INFO lines (what was saved where, how big, which folder a resume
loaded) are seen in a torchtune recipe and in a plain script, as torchtune's own are, without touching
the root logger.

torchtune 0.6.1's ``utils.get_logger`` gives its logger a ``StreamHandler`` (stderr, the bare message)
and a level. shardwise does the same, with one difference: its handler stays silent when a handler up
the hierarchy would print the record (the application configured logging), so nothing is printed
twice and the application's format wins. ``logging.getLogger("shardwise").setLevel(...)`` still rules.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

__all__ = ["LOGGER_NAME", "get_logger"]

LOGGER_NAME = "shardwise"


class _FallbackHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Prints to the current ``sys.stderr`` (so redirections apply) unless another handler will."""

    def __init__(self) -> None:
        logging.Handler.__init__(self, logging.NOTSET)
        self.setFormatter(logging.Formatter("%(message)s"))

    @property
    def stream(self) -> TextIO:  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:  # StreamHandler API; the stream is always sys.stderr
        pass

    def emit(self, record: logging.LogRecord) -> None:
        if not _handled_above(logging.getLogger(record.name)):
            super().emit(record)


def _handled_above(logger: logging.Logger) -> bool:
    """Whether a record of ``logger`` propagates to some other logger's handler."""
    current: logging.Logger | None = logger
    while current is not None and current.propagate:
        current = current.parent
        if current is not None and current.handlers:
            return True
    return False


def get_logger() -> logging.Logger:
    """The ``shardwise`` logger, set up once: the fallback handler, and INFO unless a level was set."""
    logger = logging.getLogger(LOGGER_NAME)
    if not any(isinstance(h, _FallbackHandler) for h in logger.handlers):
        logger.addHandler(_FallbackHandler())
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)
    return logger
