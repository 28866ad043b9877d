"""The ``shardwise`` command: a parser, one module per command, progress bars."""

from .app import main

__all__ = ["main"]
