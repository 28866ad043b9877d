"""Reading a checkpoint wherever it is: ``locate(path)`` gives a local path or a remote one with the
same few methods (listing, stat, headers, checksums, the completion-marker rule), so the scan and the
reports never ask whether a location is a URL. No torch import here.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Sequence
from pathlib import Path, PosixPath, PurePosixPath
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from .. import _core
from ..errors import CheckpointIOError
from .url import is_url

if TYPE_CHECKING:  # the fsspec backend is imported only for a URL (inspect of a folder starts faster)
    from .fsspec import Remote

__all__ = ["CHUNK", "Cancelled", "LocalPath", "Location", "RemotePath", "locate"]

#: bytes hashed per step: between two steps a checksum can be stopped
CHUNK = 16 * 1024 * 1024

HeaderReaders = tuple[Callable[[Sequence[Any]], list[Any]], Callable[[Any], Any], Callable[[Any], Path]]
#: what a problem of the marker rule looks like: (kind, message, file, detail)
Problem = tuple[str, str, str | None, str | None]


class Cancelled(Exception):
    """A checksum stopped between two chunks because its caller stopped waiting (Ctrl-C)."""


class LocalPath(PosixPath):
    """A local file or folder: a ``pathlib.Path`` with the location methods (headers by the native
    core, checksums over a private mapping, no marker rule: a local folder is published by rename)."""

    def listdir(self) -> list[str]:
        return os.listdir(self)

    def header_readers(self, threads: int = 0) -> HeaderReaders:
        def read_many(ps: Sequence[Path]) -> list[_core.SafetensorsHeader]:
            return _core.read_headers([str(p) for p in ps], threads)

        def read_one(p: Path) -> _core.SafetensorsHeader:
            return _core.read_header(str(p))

        return read_many, read_one, Path

    def sha256(self, progress: Callable[[int], object] | None = None,
               stop: Callable[[], bool] | None = None) -> str:
        """sha256 read through a private mapping in ``CHUNK`` steps (hashlib drops the GIL); raises
        ``Cancelled`` between steps once ``stop()`` is true."""
        import hashlib
        import mmap

        h = hashlib.sha256()
        with open(self, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                return h.hexdigest()
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                view = memoryview(mm)
                try:
                    for start in range(0, size, CHUNK):
                        if stop is not None and stop():
                            raise Cancelled
                        h.update(view[start : start + CHUNK])
                        if progress is not None:
                            progress(min(CHUNK, size - start))
                finally:
                    view.release()
        return h.hexdigest()

    def completeness_problems(self, single_file: bool = False) -> list[Problem]:
        """Nothing: a local checkpoint folder is complete once it exists (it was renamed into place)."""
        return []

    def save_in_progress(self) -> bool:
        """Whether this folder is one a save is still writing (never, locally: saves stage elsewhere)."""
        return False


class RemotePath:
    """A file or folder in object storage with the ``pathlib`` methods the scan and the reports use;
    a folder's listing is read once, a file is looked up in its parent's listing."""

    def __init__(self, r: Remote, info: dict[str, Any] | None = None) -> None:
        self.remote = r
        self._info = info
        self._looked_up = info is not None  # its parent's listing said whether it exists
        self._children: dict[str, dict[str, Any]] | None = None

    def __truediv__(self, name: str | os.PathLike[str]) -> RemotePath:
        rel = PurePosixPath(str(name)).as_posix()
        child = RemotePath(self.remote.join(rel))
        if "/" not in rel:
            child._info = self.children.get(rel)
            child._looked_up = True
        return child

    def __str__(self) -> str:
        return self.remote.url

    __repr__ = __str__

    def __fspath__(self) -> str:  # only for messages; nothing opens a remote path as a local file
        return self.remote.url

    @property
    def name(self) -> str:
        return self.remote.name

    @property
    def parent(self) -> RemotePath:
        r = self.remote
        from .fsspec import Remote

        return RemotePath(Remote(r.fs, r.path.rsplit("/", 1)[0])) if "/" in r.path else self

    @property
    def children(self) -> dict[str, dict[str, Any]]:
        if self._children is None:
            self._children = self.remote.listing()
        return self._children

    def listdir(self) -> list[str]:
        return list(self.children)

    def info(self) -> dict[str, Any] | None:
        if self._info is None and not self._looked_up:
            self._looked_up = True
            try:
                self._info = self.remote.fs.info(self.remote.path)
            except FileNotFoundError:
                return None
            except Exception as e:  # noqa: BLE001
                from .fsspec import fail

                raise fail(self.remote.url, "cannot look the file up", e) from e
        return self._info

    def is_file(self) -> bool:
        info = self.info()
        return info is not None and info.get("type") != "directory"

    def is_dir(self) -> bool:
        return bool(self.children)

    def exists(self) -> bool:
        return self.is_file() or self.is_dir()

    def stat(self) -> SimpleNamespace:
        info = self.info()
        if info is None:
            raise CheckpointIOError(errno.ENOENT, "no such file", str(self))
        return SimpleNamespace(st_size=int(info.get("size") or 0))

    def read_bytes(self) -> bytes:
        return self.remote.read_bytes()

    def sha256(self, progress: Callable[[int], object] | None = None,
               stop: Callable[[], bool] | None = None) -> str:
        from .fsspec import sha256

        return sha256(self.remote, progress)

    def header_readers(self, threads: int = 0) -> HeaderReaders:
        """Safetensors headers by ranged reads (many in parallel, or one); a torch file has no header,
        so it is downloaded into the cache and opened there."""

        def read_many(paths: Sequence[RemotePath]) -> list[Any]:
            from .fsspec import read_headers

            return read_headers([(p.remote, p.stat().st_size) for p in paths], threads or None)

        def read_one(p: RemotePath) -> Any:
            from .fsspec import read_header

            return read_header(p.remote, p.stat().st_size)

        def torch_file(p: RemotePath) -> Path:
            from .cache import download, mirror_folder

            local = mirror_folder(p.remote)
            download([(p.remote, p.info() or {}, local)])
            return local

        return read_many, read_one, torch_file

    def save_in_progress(self) -> bool:
        """An ``epoch_N``/``step_N`` folder, or one a shardwise save is writing (its progress record)."""
        from .marker import CHECKPOINT_NAME, SAVING_MARKER

        return bool(CHECKPOINT_NAME.match(self.name)) or SAVING_MARKER in self.children

    def completeness_problems(self, single_file: bool = False) -> list[Problem]:
        """The marker rule: a checkpoint folder without its completion marker is incomplete; with one,
        every file it lists must be there with its size."""
        from .marker import COMPLETE_MARKER, marker_problems

        if single_file:
            return []
        listed = marker_problems(self.remote, self.children)
        if listed is None:
            if self.save_in_progress():
                return [("incomplete", f"{self}: no {COMPLETE_MARKER}: a save that did not finish (or is running)",
                         None, None)]
            return []
        return [("incomplete", f"{self}: {p}", None, None) for p in listed]


#: a checkpoint file or folder, local or remote
Location = LocalPath | RemotePath


def locate(path: str | os.PathLike[str] | Location) -> Location:
    """The location ``path`` names: a remote one for an fsspec URL (``s3://``, ``gs://``), else local."""
    if isinstance(path, (LocalPath, RemotePath)):
        return path
    if is_url(path):
        from .fsspec import remote

        return RemotePath(remote(str(path)))
    return LocalPath(path)
