"""Uploads straight from tensor memory: S3 multipart uploads whose parts of all files share the
workers (at most ``concurrency`` parts exist at once), streamed writers elsewhere, aborts on failure."""

from __future__ import annotations

import bisect
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from .._logging import get_logger
from ..errors import CheckpointError
from .fsspec import Remote, concurrency, fail, is_s3, part_size, run_all

__all__ = ["ShardBytes", "abort_uploads", "upload_files", "upload_tree"]

logger = get_logger()

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
    if not is_s3(folder):
        return sum(run_all([lambda r=r, lay=lay: _stream_upload(r, lay, step) for r, lay in layouts], workers))
    small = [(r, lay) for r, lay in layouts if lay.size <= step]
    big = [(r, lay) for r, lay in layouts if lay.size > step]
    uploads: list[tuple[Remote, _Layout, str]] = []
    try:
        for r, lay in big:
            bucket, key, _ = r.fs.split_path(r.path)
            resp = r.call("cannot start a multipart upload", r.fs.call_s3, "create_multipart_upload",
                           Bucket=bucket, Key=key)
            uploads.append((r, lay, resp["UploadId"]))
        jobs: list[Callable[[], Any]] = [lambda r=r, lay=lay: r.write_bytes(bytes(lay.read(0, lay.size)))
                                         for r, lay in small]
        etags: dict[tuple[int, int], str] = {}
        for u, (r, lay, upload_id) in enumerate(uploads):
            for k, start in enumerate(range(0, lay.size, step)):
                jobs.append(lambda u=u, k=k, start=start, r=r, lay=lay, uid=upload_id:
                            etags.__setitem__((u, k), _upload_part(r, lay, uid, k + 1, start, step)))
        run_all(jobs, workers)
        for u, (r, lay, upload_id) in list(enumerate(uploads)):
            bucket, key, _ = r.fs.split_path(r.path)
            n = len(range(0, lay.size, step))
            parts = [{"PartNumber": k + 1, "ETag": etags[(u, k)]} for k in range(n)]
            r.call("cannot complete the multipart upload", r.fs.call_s3, "complete_multipart_upload",
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
    resp = r.call(f"cannot upload part {number}", r.fs.call_s3, "upload_part", Bucket=bucket, Key=key,
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
        raise fail(r.url, "cannot upload", e) from e
    return lay.size


def abort_uploads(folder: Remote) -> int:
    """Abort every multipart upload still open under ``folder`` (what a dead save left); S3 only."""
    if not is_s3(folder):
        return 0
    bucket, key, _ = folder.fs.split_path(folder.path)
    prefix = key.rstrip("/") + "/"
    resp = folder.call("cannot list multipart uploads", folder.fs.call_s3, "list_multipart_uploads",
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
    run_all([lambda job=job: job[1].put_file(job[0]) for job in jobs], concurrency())
    folder.fs.invalidate_cache(folder.path)
    return out

