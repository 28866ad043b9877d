"""Whole checkpoints as local folders for the commands that rewrite them (``convert``, ``roundtrip``,
``compare``): a remote folder is brought into the download cache, and a remote destination is
written locally, then uploaded by the completion-marker rule. Local paths pass through unchanged."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import CheckpointError, CheckpointIOError
from . import fsspec as rm
from .cache import cache_root, download, mirror, mirror_folder
from .location import RemotePath, locate
from .marker import begin_save, discard, finish_save
from .upload import upload_tree

__all__ = ["local_copy", "publish_folder"]


@contextmanager
def local_copy(path: str | os.PathLike[str]) -> Iterator[Path]:
    """``path`` itself when local; a URL's folder (or file) brought into the download cache."""
    folder = locate(path)
    if not isinstance(folder, RemotePath):
        yield Path(path)
        return
    r = folder.remote
    if not folder.children:  # one file
        parent = folder.parent
        local = mirror_folder(parent.remote) / r.name
        info = parent.children.get(r.name)
        if info is None:
            raise CheckpointIOError(errno.ENOENT, "no such file or folder", str(path))
        download([(r, info, local)])
        yield local
        return
    complete = folder.completeness_problems()
    if complete:
        raise CheckpointIOError(errno.ENOENT, complete[0][1], str(path))
    yield mirror(r, [n for n in r.walk_files() if not n.rsplit("/", 1)[-1].startswith(".")])


@contextmanager
def publish_folder(dst: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """A local folder to write into; for a URL, a temporary one that is uploaded on success by the
    marker rule (files first, the completion marker last). A remote folder that is not empty is
    replaced only with ``overwrite``."""
    target = locate(dst)
    if not isinstance(target, RemotePath):
        yield Path(dst)
        return
    r: rm.Remote = target.remote
    if r.listing() and not overwrite:
        raise CheckpointError(f"{dst}: exists and is not empty (pass --overwrite to replace it)")
    tmp = Path(tempfile.mkdtemp(prefix=".shardwise-upload-", dir=cache_root().as_posix()
                                if _mkdir(cache_root()) else None))
    try:
        yield tmp / "out"
        if (tmp / "out").is_dir():
            begin_save(r)
            try:
                finish_save(r, upload_tree(tmp / "out", r))
            except BaseException:
                discard(r)
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _mkdir(p: Path) -> bool:
    try:
        p.mkdir(parents=True, exist_ok=True)
        return True
    except OSError:
        return False
