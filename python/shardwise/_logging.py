"""The ``shardwise`` logger: its INFO lines (what was saved where, how big, which folder a resume
loaded) are seen in a torchtune recipe and in a plain script, as torchtune's own are, without touching
the root logger.

torchtune 0.6.1's ``utils.get_logger`` gives its logger a ``StreamHandler`` (stderr, the bare message)
and a level. shardwise does the same, with one difference: its handler stays silent when a handler up
the hierarchy would print the record (the application configured logging), so nothing is printed
twice and the application's format wins. ``logging.getLogger("shardwise").setLevel(...)`` still rules.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import logging

__all__ = ["LOGGER_NAME", "get_logger", "set_level"]

LOGGER_NAME = "shardwise"

#: a level asked for before the logger existed (the command line, which never imports logging itself:
#: ``shardwise inspect`` starts faster); applied when the logger is first set up
_pending_level: int | None = None


def set_level(level: int) -> None:
    """Set the ``shardwise`` logger's level now if logging is in use, else when it is first set up."""
    global _pending_level
    if "logging" in sys.modules:
        get_logger().setLevel(level)
    else:
        _pending_level = level


def _handled_above(logger: logging.Logger) -> bool:
    """Whether a record of ``logger`` propagates to some other logger's handler."""
    current: logging.Logger | None = logger
    while current is not None and current.propagate:
        current = current.parent
        if current is not None and current.handlers:
            return True
    return False


_handler_class: type | None = None


def _fallback_handler_class() -> type:
    """``_FallbackHandler``, defined on first use (it subclasses a logging class)."""
    global _handler_class
    if _handler_class is None:
        import logging
        from typing import TextIO

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

        _handler_class = _FallbackHandler
    return _handler_class


def get_logger() -> logging.Logger:
    """The ``shardwise`` logger, set up once: the fallback handler, and INFO unless a level was set."""
    import logging

    global _pending_level
    logger = logging.getLogger(LOGGER_NAME)
    handler = _fallback_handler_class()
    if not any(isinstance(h, handler) for h in logger.handlers):
        logger.addHandler(handler())
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)
    if _pending_level is not None:
        logger.setLevel(_pending_level)
        _pending_level = None
    return logger
