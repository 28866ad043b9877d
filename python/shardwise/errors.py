"""The shardwise exception family: every bad input gets a typed error naming the file and the problem."""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "HeaderError",
    "ConfigError",
    "ConversionError",
    "CheckpointIOError",
]


class CheckpointError(ValueError):
    """Base of every shardwise error about a checkpoint's content (a ``ValueError``, like torchtune's)."""


class HeaderError(CheckpointError):
    """A safetensors file whose header is malformed, inconsistent or truncated."""


class ConfigError(CheckpointError):
    """``config.json`` is missing a field the model type needs, or holds a value of the wrong kind."""


class ConversionError(CheckpointError):
    """A state dict key or tensor does not fit the model type's key table (unexpected key, bad shape)."""


class CheckpointIOError(OSError, CheckpointError):
    """An I/O failure (disk full, permission, file size limit) while reading or writing a checkpoint.

    It is an ``OSError`` (with ``errno`` and ``filename``) and also a ``CheckpointError``.
    """
