"""The download cache of remote checkpoints: each file version fetched once by parallel ranged reads
into a pre-sized temp file, then renamed (a file that may be mapped is never rewritten in place)."""

from __future__ import annotations

import errno as _errno
import os
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import CheckpointIOError
from .fsspec import Remote, concurrency, part_size, run_all

__all__ = ["cache_root", "download", "mirror", "mirror_folder"]


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

        total = sum(run_all([lambda job=job: fetch(job) for job in jobs], workers))
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

