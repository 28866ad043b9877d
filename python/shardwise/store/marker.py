"""The completion-marker rule: object stores have no atomic rename, so a checkpoint folder is complete
once ``.shardwise-complete`` (listing every file and its size) is written, last. While a save runs,
``.shardwise-saving`` names its host and process, so a later save can remove what a dead one left."""

from __future__ import annotations

import errno as _errno
import json
import os
import re
import socket
import time
from collections.abc import Iterable, Mapping
from typing import Any

from .._logging import get_logger
from ..errors import CheckpointIOError
from .fsspec import Remote
from .upload import abort_uploads

__all__ = ["CHECKPOINT_NAME", "COMPLETE_MARKER", "SAVING_MARKER", "begin_save", "checkpoint_folders", "discard",
           "finish_save", "latest_complete", "marker_problems", "read_marker", "remove_dead_saves"]

logger = get_logger()

COMPLETE_MARKER = ".shardwise-complete"
SAVING_MARKER = ".shardwise-saving"
MARKER_SCHEMA = "shardwise.complete/1"
#: a save whose progress record is this old is dead even when its host cannot be asked
STALE_SAVE_AGE = 3600.0

#: the names of checkpoint folders in an output_dir (the ones the marker rule applies to)
CHECKPOINT_NAME = re.compile(r"^(epoch|step)_\d+$")


def begin_save(folder: Remote) -> None:
    """Start a save into ``folder``: an existing checkpoint there stops being complete (its marker goes
    first), what it held is removed, and a progress record names this host and process."""
    folder.join(COMPLETE_MARKER).remove()
    abort_uploads(folder)
    folder.remove(recursive=True)
    record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
    folder.join(SAVING_MARKER).write_bytes(json.dumps(record).encode())


def finish_save(folder: Remote, files: Mapping[str, int]) -> None:
    """Write the completion marker (last), listing every file and its size; drop the progress record."""
    marker = {"schema": MARKER_SCHEMA, "files": dict(sorted(files.items()))}
    folder.join(COMPLETE_MARKER).write_bytes((json.dumps(marker, indent=2) + "\n").encode())
    folder.join(SAVING_MARKER).remove()


def discard(folder: Remote) -> None:
    """Best-effort removal of a failed save's objects (the server may be gone: then a later save does it)."""
    try:
        abort_uploads(folder)
        folder.remove(recursive=True)
    except CheckpointIOError as e:
        logger.warning("Could not remove the incomplete checkpoint %s: %s", folder.url, e)


def read_marker(folder: Remote) -> dict[str, int] | None:
    """The files a completion marker lists (name → size), or None when there is no valid marker."""
    try:
        raw = folder.join(COMPLETE_MARKER).read_bytes()
    except CheckpointIOError as e:
        if e.errno == _errno.ENOENT:
            return None
        raise
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    files = data.get("files") if isinstance(data, dict) and data.get("schema") == MARKER_SCHEMA else None
    if not isinstance(files, dict) or not all(isinstance(v, int) for v in files.values()):
        return None
    return {str(k): int(v) for k, v in files.items()}


def marker_problems(folder: Remote, found: Mapping[str, Mapping[str, Any]]) -> list[str] | None:
    """Why ``folder`` is not a complete checkpoint: no marker (None), or the files its marker lists
    that are missing or have another size (``found``: relative name → info)."""
    listed = read_marker(folder)
    if listed is None:
        return None
    out = []
    for name, size in listed.items():
        info = found.get(name)
        if info is None:
            out.append(f"{name}: listed by {COMPLETE_MARKER} but missing")
        elif int(info.get("size") or 0) != size:
            out.append(f"{name}: {info.get('size')} bytes, {COMPLETE_MARKER} says {size}")
    return out


def checkpoint_folders(out: Remote, prefix: str) -> dict[str, bool]:
    """The ``{prefix}_N`` folders of ``out`` → whether each is complete (has its marker)."""
    rx = re.compile(rf"^{prefix}_(\d+)$")
    result = {}
    for name, info in out.listing().items():
        if info.get("type") == "directory" and rx.match(name):
            result[name] = out.join(name, COMPLETE_MARKER).exists()
    return result


def latest_complete(out: Remote, prefix: str) -> str | None:
    """The complete ``{prefix}_N`` folder with the largest N (numeric order), or None."""
    best = None
    for name, complete in checkpoint_folders(out, prefix).items():
        n = int(name.rsplit("_", 1)[1])
        if complete and (best is None or n > best[0]):
            best = (n, name)
    return None if best is None else best[1]


def _dead(record: Mapping[str, Any] | None, age: float) -> bool:
    if record is None:
        return age > STALE_SAVE_AGE
    started = record.get("started")
    if isinstance(started, (int, float)) and time.time() - started > STALE_SAVE_AGE:
        return True
    if record.get("host") != socket.gethostname() or not isinstance(record.get("pid"), int):
        return False
    try:
        os.kill(record["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def remove_dead_saves(out: Remote, keep: Iterable[str] = ()) -> list[str]:
    """Delete the incomplete ``epoch_N``/``step_N`` folders of ``out`` whose save is dead (its process
    is gone on this host, or it started over an hour ago) and abort their multipart uploads."""
    kept = set(keep)
    removed = []
    for prefix in ("epoch", "step"):
        for name, complete in checkpoint_folders(out, prefix).items():
            if complete or name in kept:
                continue
            folder = out.join(name)
            try:
                record = json.loads(folder.join(SAVING_MARKER).read_bytes())
            except (CheckpointIOError, json.JSONDecodeError, UnicodeDecodeError):
                record = None
            if _dead(record if isinstance(record, dict) else None, _age(folder)):
                discard(folder)
                removed.append(name)
                logger.info("Removed %s, left incomplete by a save that died", folder.url)
    return removed


def _age(folder: Remote) -> float:
    """Seconds since the newest object of ``folder`` was written (0 when unknown)."""
    newest = 0.0
    for info in folder.walk_files().values():
        t = info.get("LastModified") or info.get("mtime") or info.get("updated")
        if hasattr(t, "timestamp"):
            newest = max(newest, t.timestamp())
        elif isinstance(t, (int, float)):
            newest = max(newest, float(t))
    return time.time() - newest if newest else 0.0

