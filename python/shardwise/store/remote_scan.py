"""The headers-only commands on URLs: ``inspect`` / ``verify`` of a remote checkpoint list the folder
once and read each safetensors header by two ranged GETs (``--checksums`` streams the files);
``convert`` / ``roundtrip`` / ``compare`` work on local copies from the download cache and publish
a remote output by the completion-marker rule. No torch import here.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from types import SimpleNamespace
from typing import Any

from ..errors import CheckpointError, CheckpointIOError
from ..format.scan import TORCH_SUFFIXES, Scan, scan_folder
from . import fsspec as rm

__all__ = ["RemotePath", "completeness_problems", "local_copy", "header_readers", "publish_folder", "scan_remote"]


class RemotePath:
    """A remote file or folder with the few ``pathlib`` methods the scan and the reports use; a
    folder's listing is read once."""

    is_remote = True

    def __init__(self, r: rm.Remote, info: dict[str, Any] | None = None) -> None:
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

    @property
    def name(self) -> str:
        return self.remote.name

    @property
    def children(self) -> dict[str, dict[str, Any]]:
        if self._children is None:
            self._children = self.remote.listing()
        return self._children

    def info(self) -> dict[str, Any] | None:
        if self._info is None and not self._looked_up:
            self._looked_up = True
            try:
                self._info = self.remote.fs.info(self.remote.path)
            except FileNotFoundError:
                return None
            except Exception as e:  # noqa: BLE001
                raise rm._fail(self.remote.url, "cannot look the file up", e) from e
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

    def sha256(self, progress: Callable[[int], object] | None = None) -> str:
        return rm.sha256(self.remote, progress)


def scan_remote(url: str) -> Scan:
    """``_scan.scan`` for a URL: a folder (its index and shards) or one weight or index file."""
    r = rm.remote(url)
    folder = RemotePath(r)
    if folder.children:
        return _scan_folder(folder)
    parent = RemotePath(rm.Remote(r.fs, r.path.rsplit("/", 1)[0])) if "/" in r.path else None
    info = parent.children.get(r.name) if parent is not None else None
    if parent is None or info is None or info.get("type") == "directory":
        raise CheckpointIOError(errno.ENOENT, "no such file or folder", url)
    if r.name.endswith(".index.json"):
        return _scan_folder(parent, r.name)
    if not (r.name.endswith(".safetensors") or r.name.endswith(TORCH_SUFFIXES)):
        raise CheckpointError(f"{url}: not a checkpoint file (expected .safetensors, .bin, .pt or .pth)")
    return Scan(parent, True, None, [r.name], set(), {r.name})  # type: ignore[arg-type]


def _scan_folder(folder: RemotePath, index_name: str | None = None) -> Scan:
    """``_scan.scan_folder`` on the listing; an ``epoch_N`` folder (or one a save is writing) without
    any shard yet is an incomplete checkpoint for ``verify``, not a bad argument."""
    try:
        return scan_folder(folder, index_name)  # type: ignore[arg-type]
    except CheckpointError:
        if rm.CHECKPOINT_NAME.match(folder.name) or rm.SAVING_MARKER in folder.children:
            return Scan(folder, False, None, [])  # type: ignore[arg-type]
        raise


def header_readers(
    threads: int = 0,
) -> tuple[
    Callable[[Sequence[RemotePath]], list[Any]], Callable[[RemotePath], Any], Callable[[RemotePath], Path]
]:
    """How ``_scan.read_files`` reads a remote folder: safetensors headers by ranged reads (many in
    parallel, or one); a torch file has no header, so it is downloaded into the cache and opened there."""

    def read_many(paths: Sequence[RemotePath]) -> list[Any]:
        return rm.read_headers([(p.remote, p.stat().st_size) for p in paths], threads or None)

    def read_one(p: RemotePath) -> Any:
        return rm.read_header(p.remote, p.stat().st_size)

    def torch_file(p: RemotePath) -> Path:
        local = rm.mirror_folder(p.remote)
        rm.download([(p.remote, p.info() or {}, local)])
        return local

    return read_many, read_one, torch_file


def completeness_problems(s: Scan) -> list[tuple[str, str, str | None, str | None]]:
    """The marker rule for ``verify``: a remote ``epoch_N``/``step_N`` folder (or any folder a shardwise
    save is writing) without its completion marker is incomplete; with one, every file it lists must
    be there with its size."""
    root: RemotePath = s.root  # type: ignore[assignment]
    if s.single_file:
        return []
    children = root.children
    listed = rm.marker_problems(root.remote, children)
    if listed is None:
        if rm.CHECKPOINT_NAME.match(root.name) or rm.SAVING_MARKER in children:
            return [("incomplete", f"{root}: no {rm.COMPLETE_MARKER}: a save that did not finish (or is running)",
                     None, None)]
        return []
    return [("incomplete", f"{root}: {p}", None, None) for p in listed]


@contextmanager
def local_copy(path: str | os.PathLike[str]) -> Iterator[Path]:
    """``path`` itself when local; a URL's folder (or file) brought into the download cache."""
    if not rm.is_url(path):
        yield Path(path)
        return
    r = rm.remote(str(path))
    folder = RemotePath(r)
    if not folder.children:  # one file
        parent = rm.Remote(r.fs, r.path.rsplit("/", 1)[0])
        local = rm.mirror_folder(parent) / r.name
        info = RemotePath(parent).children.get(r.name)
        if info is None:
            raise CheckpointIOError(errno.ENOENT, "no such file or folder", str(path))
        rm.download([(r, info, local)])
        yield local
        return
    complete = completeness_problems(Scan(folder, False, None, []))  # type: ignore[arg-type]
    if complete:
        raise CheckpointIOError(errno.ENOENT, complete[0][1], str(path))
    yield rm.mirror(r, [n for n in r.walk_files() if not n.rsplit("/", 1)[-1].startswith(".")])


@contextmanager
def publish_folder(dst: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """A local folder to write into; for a URL, a temporary one that is uploaded on success by the
    marker rule (files first, the completion marker last). A remote folder that is not empty is
    replaced only with ``overwrite``."""
    if not rm.is_url(dst):
        yield Path(dst)
        return
    r = rm.remote(str(dst))
    if r.listing() and not overwrite:
        raise CheckpointError(f"{dst}: exists and is not empty (pass --overwrite to replace it)")
    tmp = Path(tempfile.mkdtemp(prefix=".shardwise-upload-", dir=rm.cache_root().as_posix()
                                if _mkdir(rm.cache_root()) else None))
    try:
        yield tmp / "out"
        if (tmp / "out").is_dir():
            rm.begin_save(r)
            try:
                rm.finish_save(r, rm.upload_tree(tmp / "out", r))
            except BaseException:
                rm.discard(r)
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _mkdir(p: Path) -> bool:
    try:
        p.mkdir(parents=True, exist_ok=True)
        return True
    except OSError:
        return False
