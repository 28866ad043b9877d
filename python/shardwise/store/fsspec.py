"""Object storage through fsspec (no torch): a ``Remote`` file or folder, the filesystem for a URL,
errors naming the URL, the transfer settings, and headers by ranged reads validated by the native core."""

from __future__ import annotations

import errno as _errno
import hashlib
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import _core
from .._logging import get_logger
from ..errors import CheckpointError, CheckpointIOError
from .url import protocol

__all__ = ["CONCURRENCY", "PART_SIZE", "Remote", "concurrency", "fail", "is_s3", "part_size", "read_header",
           "read_headers", "remote", "run_all", "sha256"]

logger = get_logger()

#: bytes per uploaded part / downloaded range (S3 needs at least 5 MiB for all parts but the last);
#: ``$SHARDWISE_REMOTE_PART_SIZE`` overrides it
PART_SIZE = 32 * 1024 * 1024
#: parts in flight at once, for uploads and downloads: peak extra memory is PART_SIZE * CONCURRENCY;
#: ``$SHARDWISE_REMOTE_CONCURRENCY`` overrides it
CONCURRENCY = 8
MIN_PART = 5 * 1024 * 1024

_EXTRA = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs"}


def fail(url: str, doing: str, e: BaseException) -> CheckpointIOError:
    """A ``CheckpointIOError`` naming ``url``, for whatever the filesystem raised (a 403, a missing
    bucket, no credentials, a dropped connection)."""
    if isinstance(e, CheckpointIOError):
        return e
    if isinstance(e, PermissionError):
        code = _errno.EACCES
    elif isinstance(e, FileNotFoundError):
        code = _errno.ENOENT
    elif isinstance(e, OSError) and e.errno:
        code = e.errno
    else:
        code = _errno.EIO
    text = " ".join(str(e).split()) or type(e).__name__
    err = CheckpointIOError(code, f"{doing}: {type(e).__name__}: {text}", url)
    err.__cause__ = e
    return err


@dataclass(frozen=True)
class Remote:
    """A file or folder in object storage: its filesystem and its path there (no protocol)."""

    fs: Any
    path: str

    @property
    def url(self) -> str:
        return self.fs.unstrip_protocol(self.path)

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    def join(self, *names: str) -> Remote:
        parts = [self.path.rstrip("/")]
        for n in names:
            if not n or n.startswith("/") or ".." in n.split("/"):
                raise CheckpointError(f"{self.url}: name {n!r} would escape its folder")
            parts.append(n.strip("/"))
        return Remote(self.fs, "/".join(parts))

    def call(self, doing: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - every backend has its own error types
            raise fail(self.url, doing, e) from e

    def listing(self) -> dict[str, dict[str, Any]]:
        """Direct children: name → fsspec info (``type`` "file"/"directory", ``size``); {} when absent."""
        try:
            entries = self.fs.ls(self.path, detail=True, refresh=True)
        except FileNotFoundError:
            return {}
        except Exception as e:  # noqa: BLE001
            raise fail(self.url, "cannot list the folder", e) from e
        out = {}
        base = self.path.rstrip("/")
        for info in entries:
            name = info["name"].rstrip("/")
            if name == base:
                continue
            out[name.rsplit("/", 1)[-1]] = info
        return out

    def walk_files(self) -> dict[str, dict[str, Any]]:
        """Every file below this folder: relative name → info."""
        try:
            found = self.fs.find(self.path, detail=True)
        except FileNotFoundError:
            return {}
        except Exception as e:  # noqa: BLE001
            raise fail(self.url, "cannot list the folder", e) from e
        base = self.path.rstrip("/") + "/"
        return {k[len(base):]: v for k, v in found.items() if k.startswith(base) and v.get("type") != "directory"}

    def exists(self) -> bool:
        return bool(self.call("cannot check whether it exists", self.fs.exists, self.path))

    def read_bytes(self, start: int | None = None, end: int | None = None) -> bytes:
        return bytes(self.call("cannot read", self.fs.cat_file, self.path, start=start, end=end))

    def write_bytes(self, data: bytes) -> None:
        self.call("cannot write", self.fs.pipe_file, self.path, data)

    def put_file(self, local: Path) -> None:
        self.call(f"cannot upload {local}", self.fs.put_file, str(local), self.path)

    def remove(self, recursive: bool = False) -> None:
        """Delete (quietly nothing when absent)."""
        try:
            self.fs.rm(self.path, recursive=recursive)
        except FileNotFoundError:
            pass
        except Exception as e:  # noqa: BLE001
            raise fail(self.url, "cannot delete", e) from e
        self.fs.invalidate_cache(self.path)


def remote(url: str, storage_options: Mapping[str, Any] | None = None) -> Remote:
    """The filesystem for ``url`` (fsspec). A clear error naming the ``shardwise[remote]`` extra when
    the backend (``s3fs``, ``gcsfs``) is not installed."""
    proto = protocol(url)
    try:
        import fsspec
    except ImportError as e:
        raise CheckpointIOError(
            _errno.ENOSYS, "remote checkpoints need fsspec: pip install 'shardwise[remote]'", url
        ) from e
    options = dict(storage_options or {})
    options.setdefault("use_listings_cache", False)  # other writers (another host, a dead save) change it
    try:
        fs, path = fsspec.core.url_to_fs(url, **options)
    except ImportError as e:
        pkg = _EXTRA.get(proto, f"the fsspec backend for {proto}://")
        raise CheckpointIOError(
            _errno.ENOSYS, f"{proto}:// URLs need {pkg}: pip install 'shardwise[remote]' ({e})", url
        ) from e
    except ValueError as e:  # unknown protocol
        raise CheckpointIOError(_errno.EINVAL, f"not a URL fsspec knows: {e}", url) from e
    return Remote(fs, path.rstrip("/"))


def _setting(name: str, default: int, given: int | None) -> int:
    if given is not None:
        return given
    value = os.environ.get(name)
    try:
        return int(value) if value else default
    except ValueError as e:
        raise ValueError(f"${name} must be a whole number of bytes or workers, got {value!r}") from e


def part_size(given: int | None = None) -> int:
    """The part size in force (the argument, else ``$SHARDWISE_REMOTE_PART_SIZE``, else ``PART_SIZE``)."""
    return max(_setting("SHARDWISE_REMOTE_PART_SIZE", PART_SIZE, given), MIN_PART)


def concurrency(given: int | None = None) -> int:
    """Parts in flight (the argument, else ``$SHARDWISE_REMOTE_CONCURRENCY``, else ``CONCURRENCY``)."""
    return max(1, _setting("SHARDWISE_REMOTE_CONCURRENCY", CONCURRENCY, given))


def run_all(jobs: Sequence[Callable[[], Any]], workers: int) -> list[Any]:
    """Run ``jobs`` on ``workers`` threads; on the first failure the jobs not started are cancelled
    (a failed upload does not go on sending the rest) and the error is raised."""
    if not jobs:
        return []
    with ThreadPoolExecutor(max(1, min(workers, len(jobs)))) as pool:
        futures = [pool.submit(job) for job in jobs]
        try:
            return [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            raise


def is_s3(r: Remote) -> bool:
    return hasattr(r.fs, "call_s3") and hasattr(r.fs, "split_path")


def read_header(r: Remote, size: int) -> _core.SafetensorsHeader:
    """One safetensors header by two ranged reads (the 8-byte length, then exactly the header),
    validated by the native core; the data is never transferred."""
    if size < 8:
        return _core.parse_header(r.read_bytes(0, size) if size else b"", size, r.url)
    prefix = r.read_bytes(0, 8)
    n = int.from_bytes(prefix[:8], "little")
    if len(prefix) < 8 or n > _core.MAX_HEADER_SIZE or n > size - 8:
        return _core.parse_header(prefix, size, r.url)  # the native core words the error
    return _core.parse_header(prefix + r.read_bytes(8, 8 + n), size, r.url)


def read_headers(files: Sequence[tuple[Remote, int]], threads: int | None = None) -> list[_core.SafetensorsHeader]:
    """``read_header`` for many files in parallel; results in input order, the first error raised."""
    return run_all([lambda rs=rs: read_header(*rs) for rs in files], concurrency(threads))


def sha256(r: Remote, progress: Callable[[int], object] | None = None) -> str:
    """sha256 of a remote file, streamed in ``PART_SIZE`` chunks."""
    h = hashlib.sha256()
    try:
        step = part_size()
        with r.fs.open(r.path, "rb", block_size=step) as f:
            while chunk := f.read(step):
                h.update(chunk)
                if progress is not None:
                    progress(len(chunk))
    except Exception as e:  # noqa: BLE001
        raise fail(r.url, "cannot read", e) from e
    return h.hexdigest()

