"""torch files (``.bin`` shards, ``.pt`` adapters and recipe state) written as ``torch.save`` writes
them (records named after the file), atomically: staged under a temporary name, fsynced, renamed."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from .. import _core
from ..errors import CheckpointIOError
from ..store.local import STAGING_MARK

__all__ = ["atomic_torch_save", "commit", "default_archive_name", "save_torch_file", "stage_torch_save", "temp_name"]


def _io_error(e: OSError, path: Path) -> CheckpointIOError:
    return CheckpointIOError(e.errno or 5, e.strerror or str(e), str(path))


def temp_name(path: Path) -> Path:
    """The temporary name ``path`` is written under before it is renamed into place."""
    return path.with_name(f".{path.name}.shardwise-tmp-{os.getpid()}")


#: record prefixes torch can be made to write: it names a file's records after the file (up to its
#: last dot), so any plain ASCII name without a slash can be reproduced
_ARCHIVE_NAME = re.compile(r"[\x21-\x2e\x30-\x7e]+")


def default_archive_name(path: Path) -> str:
    """The record prefix ``torch.save(obj, path)`` writes: the file name up to its last dot."""
    stem, dot, _ = path.name.rpartition(".")
    return stem if dot else path.name


def save_torch_file(obj: object, path: Path, archive: str | None = None, fsync: bool = False) -> None:
    """``torch.save(obj, path)`` with the zip records named ``archive/`` (by default the file name up to
    its last dot, as ``torch.save`` to a path, transformers and torchtune write it; a file object would
    give ``archive/``). The file is written under a private temporary folder next to ``path`` and
    renamed over it; an I/O failure is a ``CheckpointIOError`` carrying the real errno."""
    ok = archive is not None and _ARCHIVE_NAME.fullmatch(archive) is not None and archive not in (".", "..")
    name = archive if ok and archive is not None else default_archive_name(path)
    try:
        scratch = Path(tempfile.mkdtemp(prefix=f".{path.name}{STAGING_MARK}tmp-{os.getpid()}-", dir=path.parent))
    except OSError as e:
        raise _io_error(e, path) from e
    inner = scratch / f"{name}.tmp"
    try:
        try:
            torch.save(obj, str(inner))  # torch's own writer names the records after the file
        except RuntimeError:
            # ... but reports a failed write without its errno: retry through a Python file object, whose
            # OSError says what went wrong (disk full, file size limit); if that succeeds, keep it
            with open(inner, "wb") as f:
                torch.save(obj, f)
        if fsync:
            fd = os.open(inner, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(inner, path)
    except OSError as e:
        raise _io_error(e, path) from e
    except RuntimeError as e:
        cause = e.__cause__ or e.__context__
        if isinstance(cause, OSError):  # torch's zip writer reports a failed write (EFBIG, ENOSPC) like this
            raise _io_error(cause, path) from e
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def stage_torch_save(obj: object, path: Path, fsync: bool = True, tmp: Path | None = None) -> Path:
    """``torch.save`` to a temporary file (``tmp``, by default next to ``path``; it must be on the same
    filesystem), fsynced, its records named after ``path``; returns it. Nothing is left behind on
    failure. ``commit`` renames it into place."""
    if tmp is None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_name(path)
    try:
        save_torch_file(obj, tmp, default_archive_name(path), fsync)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def commit(tmp: Path, path: Path, fsync: bool = True) -> None:
    """Atomically replace ``path`` with the staged ``tmp`` (readers see the old or the new file)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, path)
        if fsync:
            _core.fsync_dir(str(path.parent))
            if tmp.parent != path.parent:
                _core.fsync_dir(str(tmp.parent))
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _io_error(e, path) from e


def atomic_torch_save(obj: object, path: Path, fsync: bool = True) -> None:
    """``torch.save`` to a temp file in the same folder, fsync, then rename over ``path``."""
    commit(stage_torch_save(obj, path, fsync), path, fsync)
