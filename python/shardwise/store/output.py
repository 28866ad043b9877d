"""The storage interface a save talks to: one ``Output`` per ``output_dir``, two backends (``local``:
stage, fsync, rename; ``remote_output``: multipart uploads, completion marker); ``dirs.open_dirs``
picks the backend."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["Output", "ShardBytes"]

#: one file to write: (name, header bytes, [(offset in the data area, C-contiguous buffer)])
ShardBytes = tuple[str, bytes, Sequence[tuple[int, Any]]]


class Output(ABC):
    """Where checkpoint folders are saved. A save is ``begin(name)`` → files into the returned local
    staging folder and/or ``write_files`` → ``publish()`` (or ``discard()`` on any failure): until
    ``publish`` returns, nothing at ``name`` looks complete, and what was there stays as it was."""

    #: the local folder standing for ``output_dir`` (itself, or a work folder in the download cache)
    folder: Path
    #: whether every rank of a sharded (DTensor) state dict can write its own bytes here
    collective: bool

    @abstractmethod
    def where(self, name: str | None = None) -> str:
        """``output_dir`` (or ``output_dir/name``) as the user named it: a path or a URL."""

    @abstractmethod
    def begin(self, name: str) -> Path:
        """Start saving folder ``name``: remove what dead saves left; return a fresh local staging folder."""

    @abstractmethod
    def write_files(self, groups: Iterable[Sequence[ShardBytes]]) -> None:
        """Write the large files (shards) of the save straight from their buffers, group by group."""

    @abstractmethod
    def publish(self) -> str:
        """Make the save complete (the staging folder's files and the written ones); returns ``where(name)``."""

    @abstractmethod
    def discard(self) -> None:
        """Forget a failed save and remove what it wrote (best effort); a no-op after ``publish``."""

    def send(self, local: Path, rel: str) -> None:
        """Make the local file ``local`` durable at ``output_dir/rel`` too (the recipe state): a no-op
        where ``folder`` is ``output_dir`` itself."""
        return None

    @abstractmethod
    def prune(self, prefix: str, keep: str, keep_n: int, paired: str | None, reads: Sequence[Path] = ()) -> None:
        """Delete all but the newest ``keep_n`` complete ``{prefix}_N`` folders: never ``keep`` (just
        saved), ``paired`` (the one the recipe state goes with) nor one this run reads (``reads``)."""
