"""Checkpoints in object storage (``s3://``, ``gs://``, any fsspec URL): headers by ranged reads, a
download cache, parallel multipart uploads from tensor memory, and the completion-marker rule.

Object stores have no atomic rename, so a checkpoint folder written here becomes visible through a
marker: the shards are uploaded first, then the index and side files, then ``.shardwise-complete``
(listing every file and its size) last. Readers (resume discovery, pruning, ``verify``) treat a
folder without it as incomplete. While a save runs, ``.shardwise-saving`` records its host and
process, so that a later save can remove what a dead one left (and abort its multipart uploads).

No torch import here: the headers-only commands use this module too.
"""

from __future__ import annotations

import bisect
import errno as _errno
import hashlib
import json
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import _core
from ..errors import CheckpointError, CheckpointIOError

__all__ = [
    "COMPLETE_MARKER",
    "SAVING_MARKER",
    "Remote",
    "cache_root",
    "checkpoint_folders",
    "download",
    "is_url",
    "read_headers",
    "remote",
]

logger = logging.getLogger("shardwise")

COMPLETE_MARKER = ".shardwise-complete"
SAVING_MARKER = ".shardwise-saving"
MARKER_SCHEMA = "shardwise.complete/1"

#: bytes per uploaded part / downloaded range (S3 needs at least 5 MiB for all parts but the last);
#: ``$SHARDWISE_REMOTE_PART_SIZE`` overrides it
PART_SIZE = 32 * 1024 * 1024
#: parts in flight at once, for uploads and downloads: peak extra memory is PART_SIZE * CONCURRENCY;
#: ``$SHARDWISE_REMOTE_CONCURRENCY`` overrides it
CONCURRENCY = 8
_MIN_PART = 5 * 1024 * 1024
#: a save whose progress record is this old is dead even when its host cannot be asked
STALE_SAVE_AGE = 3600.0

#: the names of checkpoint folders in an output_dir (the ones the marker rule applies to)
CHECKPOINT_NAME = re.compile(r"^(epoch|step)_\d+$")
_URL = re.compile(r"^(?P<proto>[A-Za-z][A-Za-z0-9+.\-]*)://")
_EXTRA = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs"}


def is_url(path: object) -> bool:
    """True for an fsspec URL other than a local one (``file://``)."""
    m = _URL.match(str(path)) if isinstance(path, str) else None
    return m is not None and m.group("proto").lower() not in ("file", "local")


def _fail(url: str, doing: str, e: BaseException) -> CheckpointIOError:
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

    def _call(self, doing: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - every backend has its own error types
            raise _fail(self.url, doing, e) from e

    def listing(self) -> dict[str, dict[str, Any]]:
        """Direct children: name → fsspec info (``type`` "file"/"directory", ``size``); {} when absent."""
        try:
            entries = self.fs.ls(self.path, detail=True, refresh=True)
        except FileNotFoundError:
            return {}
        except Exception as e:  # noqa: BLE001
            raise _fail(self.url, "cannot list the folder", e) from e
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
            raise _fail(self.url, "cannot list the folder", e) from e
        base = self.path.rstrip("/") + "/"
        return {k[len(base):]: v for k, v in found.items() if k.startswith(base) and v.get("type") != "directory"}

    def exists(self) -> bool:
        return bool(self._call("cannot check whether it exists", self.fs.exists, self.path))

    def read_bytes(self, start: int | None = None, end: int | None = None) -> bytes:
        return bytes(self._call("cannot read", self.fs.cat_file, self.path, start=start, end=end))

    def write_bytes(self, data: bytes) -> None:
        self._call("cannot write", self.fs.pipe_file, self.path, data)

    def put_file(self, local: Path) -> None:
        self._call(f"cannot upload {local}", self.fs.put_file, str(local), self.path)

    def remove(self, recursive: bool = False) -> None:
        """Delete (quietly nothing when absent)."""
        try:
            self.fs.rm(self.path, recursive=recursive)
        except FileNotFoundError:
            pass
        except Exception as e:  # noqa: BLE001
            raise _fail(self.url, "cannot delete", e) from e
        self.fs.invalidate_cache(self.path)


def remote(url: str, storage_options: Mapping[str, Any] | None = None) -> Remote:
    """The filesystem for ``url`` (fsspec). A clear error naming the ``shardwise[remote]`` extra when
    the backend (``s3fs``, ``gcsfs``) is not installed."""
    m = _URL.match(url)
    proto = m.group("proto").lower() if m else ""
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
    return max(_setting("SHARDWISE_REMOTE_PART_SIZE", PART_SIZE, given), _MIN_PART)


def concurrency(given: int | None = None) -> int:
    """Parts in flight (the argument, else ``$SHARDWISE_REMOTE_CONCURRENCY``, else ``CONCURRENCY``)."""
    return max(1, _setting("SHARDWISE_REMOTE_CONCURRENCY", CONCURRENCY, given))


def _run_all(jobs: Sequence[Callable[[], Any]], workers: int) -> list[Any]:
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


def _s3(r: Remote) -> bool:
    return hasattr(r.fs, "call_s3") and hasattr(r.fs, "split_path")


# ------------------------------------------------------------------------------------------ reading


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
    return _run_all([lambda rs=rs: read_header(*rs) for rs in files], concurrency(threads))


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
        raise _fail(r.url, "cannot read", e) from e
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ cache


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where remote checkpoints are cached: ``cache_dir``, else ``$SHARDWISE_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/shardwise`` (``~/.cache/shardwise``)."""
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get("SHARDWISE_CACHE_DIR"):
        return Path(os.environ["SHARDWISE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "shardwise"


def mirror_folder(r: Remote, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The local folder that mirrors remote folder ``r`` in the cache."""
    proto = r.fs.protocol if isinstance(r.fs.protocol, str) else r.fs.protocol[0]
    safe = [p for p in r.path.split("/") if p and p not in (".", "..")]
    return cache_root(cache_dir).joinpath(proto, *safe)


def _tag(info: Mapping[str, Any]) -> str:
    """What identifies one version of a remote file: size plus ETag / generation / mtime."""
    for key in ("ETag", "etag", "generation", "md5Hash", "LastModified", "mtime", "updated", "created"):
        if info.get(key) is not None:
            return f"{info.get('size')}:{key}={info[key]}"
    return f"{info.get('size')}"


def _stamp(local: Path) -> Path:
    return local.with_name(f".{local.name}.shardwise-src")


def _cached(local: Path, tag: str) -> bool:
    try:
        return _stamp(local).read_text() == tag and local.is_file()
    except OSError:
        return False


def download(
    files: Sequence[tuple[Remote, Mapping[str, Any], Path]],
    *,
    part_bytes: int | None = None,
    workers: int | None = None,
) -> int:
    """Download each ``(remote, info, local)`` unless the cache holds that version already: parallel
    ranged reads written in place into a pre-sized temp file, renamed when complete (a file that
    may be mapped is never rewritten in place). Returns the bytes transferred."""
    todo = [(r, info, local) for r, info, local in files if not _cached(local, _tag(info))]
    if not todo:
        return 0
    step, workers = part_size(part_bytes), concurrency(workers)
    jobs: list[tuple[int, int, int]] = []  # (file, start, end)
    fds: list[int] = []
    tmps: list[Path] = []
    try:
        for i, (_r, info, local) in enumerate(todo):
            local.parent.mkdir(parents=True, exist_ok=True)
            tmp = local.with_name(f".{local.name}.shardwise-tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            fds.append(fd)
            tmps.append(tmp)
            size = int(info.get("size") or 0)
            os.ftruncate(fd, size)
            jobs.extend((i, s, min(s + step, size)) for s in range(0, size, step))

        def fetch(job: tuple[int, int, int]) -> int:
            i, start, end = job
            data = todo[i][0].read_bytes(start, end)
            if len(data) != end - start:
                raise CheckpointIOError(_errno.EIO, f"short read at byte {start} (the file changed?)", todo[i][0].url)
            os.pwrite(fds[i], data, start)
            return len(data)

        total = sum(_run_all([lambda job=job: fetch(job) for job in jobs], workers))
        for i, (_r, info, local) in enumerate(todo):
            os.close(fds[i])
            fds[i] = -1
            os.replace(tmps[i], local)
            _stamp(local).write_text(_tag(info))
        return total
    finally:
        for fd in fds:
            if fd >= 0:
                os.close(fd)
        for tmp in tmps:
            tmp.unlink(missing_ok=True)


def _weight_like(name: str) -> bool:
    return name.endswith((".safetensors", ".bin", ".pt", ".pth"))


def mirror(
    r: Remote,
    weights: Iterable[str],
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    strict: bool = True,
    max_side_file: int = 100 * 1024 * 1024,
) -> Path:
    """Bring remote checkpoint folder ``r`` into the cache: its side files (config, tokenizer, index:
    everything that is not a weight file, up to ``max_side_file`` bytes) and the named ``weights``,
    each downloaded once (with ``strict``, a named file that is not there is an error). Returns the
    local folder, which is then read exactly like a local one."""
    found = r.walk_files()
    if not found:
        if not r.exists():
            raise CheckpointIOError(_errno.ENOENT, "no such checkpoint folder", r.url)
        raise CheckpointIOError(_errno.ENOENT, "the checkpoint folder is empty", r.url)
    local = mirror_folder(r, cache_dir)
    wanted = set(weights)
    for name in wanted:
        if strict and name not in found:
            raise CheckpointIOError(_errno.ENOENT, f"no file {name!r} in the checkpoint folder", r.url)
    jobs = []
    for name, info in found.items():
        base = name.rsplit("/", 1)[-1]
        if base.startswith(".") or any(p.startswith(".") for p in name.split("/")[:-1]):
            continue
        if name in wanted or (not _weight_like(name) and int(info.get("size") or 0) <= max_side_file):
            jobs.append((r.join(name), info, local.joinpath(*name.split("/"))))
    download(jobs)
    for root, dirs, names in os.walk(local):  # what the store no longer has must not be copied on
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for n in names:
            p = Path(root) / n
            if not n.startswith(".") and p.relative_to(local).as_posix() not in found:
                p.unlink(missing_ok=True)
                _stamp(p).unlink(missing_ok=True)
    return local


# ------------------------------------------------------------------------------------------ writing

#: one file to upload: (name, header bytes, [(offset in the data area, C-contiguous buffer)])
ShardBytes = tuple[str, bytes, Sequence[tuple[int, Any]]]


class _Layout:
    """The byte stream of one file (header, then every piece at its offset) as sorted segments."""

    def __init__(self, url: str, header: bytes, pieces: Sequence[tuple[int, Any]]) -> None:
        segs: list[tuple[int, memoryview]] = [(0, memoryview(header).cast("B"))]
        for off, buf in sorted(pieces, key=lambda p: p[0]):
            view = memoryview(buf).cast("B")
            if len(view):
                segs.append((len(header) + off, view))
        pos = 0
        for start, view in segs:
            if start != pos:
                raise CheckpointError(f"{url}: the pieces do not tile the file (gap or overlap at byte {pos})")
            pos = start + len(view)
        self.size = pos
        self.segs = segs
        self.starts = [s for s, _ in segs]

    def read(self, start: int, end: int) -> bytearray:
        """Bytes ``[start, end)`` (one part: the only copy an upload makes)."""
        out = bytearray(end - start)
        i = bisect.bisect_right(self.starts, start) - 1
        pos = start
        while pos < end:
            s, view = self.segs[i]
            take = min(end, s + len(view)) - pos
            out[pos - start : pos - start + take] = view[pos - s : pos - s + take]
            pos += take
            i += 1
        return out


def upload_files(
    folder: Remote,
    files: Sequence[ShardBytes],
    *,
    part_bytes: int | None = None,
    workers: int | None = None,
) -> int:
    """Upload every file into ``folder`` straight from the given buffers: S3 multipart uploads whose
    parts of all files share ``concurrency`` workers (at most that many parts exist at once); other
    stores get one streamed writer per file. Nothing partial stays: a failed file's multipart upload
    is aborted. Returns the bytes uploaded."""
    step, workers = part_size(part_bytes), concurrency(workers)
    layouts = [(folder.join(name), _Layout(folder.join(name).url, h, p)) for name, h, p in files]
    if not layouts:
        return 0
    if not _s3(folder):
        return sum(_run_all([lambda r=r, lay=lay: _stream_upload(r, lay, step) for r, lay in layouts], workers))
    small = [(r, lay) for r, lay in layouts if lay.size <= step]
    big = [(r, lay) for r, lay in layouts if lay.size > step]
    uploads: list[tuple[Remote, _Layout, str]] = []
    try:
        for r, lay in big:
            bucket, key, _ = r.fs.split_path(r.path)
            resp = r._call("cannot start a multipart upload", r.fs.call_s3, "create_multipart_upload",
                           Bucket=bucket, Key=key)
            uploads.append((r, lay, resp["UploadId"]))
        jobs: list[Callable[[], Any]] = [lambda r=r, lay=lay: r.write_bytes(bytes(lay.read(0, lay.size)))
                                         for r, lay in small]
        etags: dict[tuple[int, int], str] = {}
        for u, (r, lay, upload_id) in enumerate(uploads):
            for k, start in enumerate(range(0, lay.size, step)):
                jobs.append(lambda u=u, k=k, start=start, r=r, lay=lay, uid=upload_id:
                            etags.__setitem__((u, k), _upload_part(r, lay, uid, k + 1, start, step)))
        _run_all(jobs, workers)
        for u, (r, lay, upload_id) in list(enumerate(uploads)):
            bucket, key, _ = r.fs.split_path(r.path)
            n = len(range(0, lay.size, step))
            parts = [{"PartNumber": k + 1, "ETag": etags[(u, k)]} for k in range(n)]
            r._call("cannot complete the multipart upload", r.fs.call_s3, "complete_multipart_upload",
                    Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts})
            uploads[u] = (r, lay, "")  # complete: nothing to abort
        uploads = []
    finally:
        for r, _lay, upload_id in uploads:  # a failure: abort what was started (best effort)
            if upload_id:
                _abort(r, upload_id)
        folder.fs.invalidate_cache(folder.path)
    return sum(lay.size for _r, lay in layouts)


def _upload_part(r: Remote, lay: _Layout, upload_id: str, number: int, start: int, part_size: int) -> str:
    bucket, key, _ = r.fs.split_path(r.path)
    body = lay.read(start, min(start + part_size, lay.size))
    resp = r._call(f"cannot upload part {number}", r.fs.call_s3, "upload_part", Bucket=bucket, Key=key,
                   UploadId=upload_id, PartNumber=number, Body=body)
    return str(resp["ETag"])


def _abort(r: Remote, upload_id: str) -> None:
    bucket, key, _ = r.fs.split_path(r.path)
    try:
        r.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id)
    except Exception as e:  # noqa: BLE001 - a later save aborts what is left (abort_uploads)
        logger.warning("Could not abort the multipart upload of %s: %s", r.url, e)


def _stream_upload(r: Remote, lay: _Layout, part_size: int) -> int:
    try:
        with r.fs.open(r.path, "wb", block_size=part_size) as f:
            for start in range(0, lay.size, part_size):
                f.write(lay.read(start, min(start + part_size, lay.size)))
    except Exception as e:  # noqa: BLE001
        try:
            r.fs.rm(r.path)
        except Exception:  # noqa: BLE001 - it may not exist at all
            pass
        raise _fail(r.url, "cannot upload", e) from e
    return lay.size


def abort_uploads(folder: Remote) -> int:
    """Abort every multipart upload still open under ``folder`` (what a dead save left); S3 only."""
    if not _s3(folder):
        return 0
    bucket, key, _ = folder.fs.split_path(folder.path)
    prefix = key.rstrip("/") + "/"
    resp = folder._call("cannot list multipart uploads", folder.fs.call_s3, "list_multipart_uploads",
                        Bucket=bucket, Prefix=prefix)
    n = 0
    for up in resp.get("Uploads", []) or []:
        _abort(Remote(folder.fs, f"{bucket}/{up['Key']}"), up["UploadId"])
        n += 1
    return n


def upload_tree(local: Path, folder: Remote, skip: Iterable[str] = ()) -> dict[str, int]:
    """Upload every file below ``local`` into ``folder`` (small files: index, side files, adapters);
    returns relative name → size."""
    skipped = set(skip)
    out: dict[str, int] = {}
    jobs = []
    for root, dirs, names in os.walk(local):
        dirs.sort()
        for name in sorted(names):
            p = Path(root) / name
            rel = p.relative_to(local).as_posix()
            if rel in skipped:
                continue
            out[rel] = p.stat().st_size
            jobs.append((p, folder.join(rel)))
    _run_all([lambda job=job: job[1].put_file(job[0]) for job in jobs], concurrency())
    folder.fs.invalidate_cache(folder.path)
    return out


# ------------------------------------------------------------------------------------------ the marker rule


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
