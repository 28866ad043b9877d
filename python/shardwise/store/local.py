"""The local backend: folders on a disk or a mounted filesystem. Files are written by the native core
(positional writes straight from tensor memory, GIL released), fsynced, and a folder is published
by one rename (``_core.publish_dir``); a folder that is not complete has a dot name."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from .. import _core
from ..errors import CheckpointError, CheckpointIOError
from .output import Output, ShardBytes

__all__ = [
    "STAGING_MARK",
    "LocalOutput",
    "carry_over",
    "fsync_file",
    "fsync_tree",
    "is_staging_name",
    "make_dir",
    "remove_leftovers",
    "safe_join",
    "staging_path",
]


#: in the name of every folder or file being written (or left by a crash); such names start with a dot
STAGING_MARK = ".shardwise-"


def _tag() -> str:
    import uuid

    return uuid.uuid4().hex[:8]


def _rmtree(path: str | os.PathLike[str], ignore_errors: bool = True) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=ignore_errors)


def _logger():  # noqa: ANN202 - the logging module is imported when a save first logs, not by inspect
    from .._logging import get_logger

    return get_logger()


def is_staging_name(name: str) -> bool:
    """Names of incomplete checkpoints (being written, or left by a crash) start with a dot."""
    return name.startswith(".") or STAGING_MARK in name


def staging_path(final: Path) -> Path:
    """A fresh dot-named sibling of ``final`` to assemble it in (this process's pid in the name, so
    that ``remove_leftovers`` can tell a dead save's folder from a live one)."""
    return final.with_name(f".{final.name}{STAGING_MARK}{os.getpid()}-{_tag()}")


def safe_join(folder: Path, name: str, what: str = "file") -> Path:
    """``folder / name`` for a name read from a checkpoint (index, header): it must stay inside ``folder``."""
    p = Path(name)
    if p.is_absolute() or ".." in p.parts or name in ("", "."):
        raise CheckpointError(f"{folder}: {what} name {name!r} would escape its folder")
    return folder / p


def make_dir(path: Path, what: str = "output folder") -> None:
    """``mkdir -p``; a failure (read-only filesystem, a file in the way, no permission) is a
    ``CheckpointIOError`` naming the folder."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointIOError(e.errno or 5, f"cannot create the {what}: {e.strerror or e}", str(path)) from e


def fsync_file(path: str | os.PathLike[str]) -> None:
    """fsync one file; ``CheckpointIOError`` naming it on failure."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise CheckpointIOError(e.errno or 5, e.strerror or str(e), str(path)) from e
    try:
        os.fsync(fd)
    except OSError as e:
        raise CheckpointIOError(e.errno or 5, e.strerror or str(e), str(path)) from e
    finally:
        os.close(fd)


def fsync_tree(folder: Path, synced: Callable[[Path], object] | None = None) -> None:
    """fsync every file below ``folder``, then each directory, so that a rename of it is durable."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            fsync_file(os.path.join(root, name))
            if synced is not None:  # progress (shardwise convert)
                synced(Path(root, name))
        _core.fsync_dir(root)


_LEFTOVER = re.compile(re.escape(STAGING_MARK) + r"(?:old-|tmp-)?(\d+)(?:-|$)")
#: a staging folder younger than this is never removed: another host sharing the folder may own it
LEFTOVER_AGE = 3600.0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def carry_over(old: Path, staging: Path, keep: Callable[[str], bool]) -> list[str]:
    """Hard-link (copy where links fail) the top-level entries of ``old`` that ``keep`` accepts, and
    everything under them, into ``staging``: a folder published over ``old`` then keeps the user's
    other files (a tokenizer, training args) while ``old`` stays intact until the exchange. Returns
    the names carried over."""
    import shutil

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    names = []
    try:
        entries = sorted(os.scandir(old), key=lambda e: e.name)
    except FileNotFoundError:
        return names
    for entry in entries:
        if not keep(entry.name) or (staging / entry.name).exists():
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.copytree(entry.path, staging / entry.name, symlinks=True, copy_function=link)
            elif entry.is_symlink():
                os.symlink(os.readlink(entry.path), staging / entry.name)
            else:
                link(entry.path, str(staging / entry.name))
        except OSError as e:
            raise CheckpointIOError(
                e.errno or 5, f"cannot keep {entry.name!r} of the existing folder: {e.strerror or e}", str(old)
            ) from e
        names.append(entry.name)
    return names


def remove_leftovers(folder: Path) -> None:
    """Delete temporary checkpoint folders/files a crashed save left in ``folder``: names with the
    staging mark whose process is gone and that are older than an hour (another host may share the
    folder, so a live save there must never lose its staging folder)."""
    now = time.time()
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return
    for entry in entries:
        m = _LEFTOVER.search(entry.name)
        if not m or not is_staging_name(entry.name) or int(m.group(1)) == os.getpid():
            continue
        try:
            if now - entry.stat(follow_symlinks=False).st_mtime < LEFTOVER_AGE or _pid_alive(int(m.group(1))):
                continue
            if entry.is_dir(follow_symlinks=False):
                _rmtree(entry.path, ignore_errors=True)
            else:
                os.unlink(entry.path)
        except OSError:
            continue


class LocalOutput(Output):
    """``output_dir`` on a local or mounted filesystem: staged in a dot-named sibling, fsynced, renamed."""

    collective = True

    def __init__(self, folder: Path, *, fsync: bool = True) -> None:
        self.folder = Path(folder)
        self.fsync = fsync
        self._final: Path | None = None
        self._staging: Path | None = None

    def where(self, name: str | None = None) -> str:
        return str(self.folder if name is None else self.folder / name)

    def begin(self, name: str) -> Path:
        make_dir(self.folder)
        remove_leftovers(self.folder)
        self._final = self.folder / name
        staging = staging_path(self._final)
        make_dir(staging, "staging folder")
        self._staging = staging
        return staging

    def write_files(self, groups: Iterable[Sequence[ShardBytes]]) -> None:
        staging = self._require()
        for files in groups:
            _core.write_files([(str(staging / name), header, pieces) for name, header, pieces in files], False)
            del files

    def publish(self) -> str:
        staging, final = self._require(), self._final
        assert final is not None
        if self.fsync:
            fsync_tree(staging)
        _core.publish_dir(str(staging), str(final))
        self._staging = None
        # publish_dir deletes a replaced folder best-effort; whatever it left (at the staging name, or
        # renamed aside where the exchange is unsupported) is ours to remove, and worth a warning
        for leftover in (staging, final.with_name(f"{final.name}{STAGING_MARK}old-{os.getpid()}")):
            if leftover.exists():
                _rmtree(leftover, ignore_errors=True)
                if leftover.exists():
                    _logger().warning("Could not remove the replaced checkpoint left at %s", leftover)
        return str(final)

    def discard(self) -> None:
        if self._staging is not None:
            _rmtree(self._staging, ignore_errors=True)
            self._staging = None

    def prune(self, prefix: str, keep: str, keep_n: int, paired: str | None, reads: Sequence[Path] = ()) -> None:
        """Each surplus folder is first renamed to a staging name, so a crash while deleting never
        leaves a partial folder that looks like a checkpoint."""
        rx = re.compile(rf"^{prefix}_(\d+)$")
        found = []
        for name in os.listdir(self.folder):
            m = rx.match(name)
            if m and name != keep and not is_staging_name(name) and (self.folder / name).is_dir():
                found.append((int(m.group(1)), name))
        found.sort()
        surplus = max(0, len(found) + 1 - keep_n)
        in_use = [Path(p).resolve() for p in reads]
        if paired is not None:
            in_use.append((self.folder / paired).resolve())
        for _, name in found[:surplus]:
            folder = (self.folder / name).resolve()
            if any(p == folder or folder in p.parents for p in in_use):
                _logger().info("Keeping old checkpoint %s: this run reads from it, or it goes with the recipe state",
                               name)
                continue
            doomed = self.folder / f".{name}{STAGING_MARK}old-{os.getpid()}-{_tag()}"
            try:
                os.rename(self.folder / name, doomed)
            except OSError as e:
                _logger().warning("Could not remove old checkpoint %s: %s", self.folder / name, e)
                continue
            _rmtree(doomed, ignore_errors=True)
            _logger().info("Removed old checkpoint %s (keep_last_n_checkpoints=%d)", name, keep_n)
        if surplus and self.fsync:
            _core.fsync_dir(str(self.folder))

    def _require(self) -> Path:
        if self._staging is None:
            raise RuntimeError("LocalOutput: begin() was not called (or the save was already published)")
        return self._staging
