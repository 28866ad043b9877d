"""``shardwise verify``: a folder's integrity, checksums and manifests, and its rendering."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, CheckpointIOError
from ..format.scan import Scan, read_files, scan, side_files, structure_problems
from ..store.location import Location, locate
from .base import Problem, Report, file_entry, index_entry, n_of, problems_from, register_renderer, totals
from .progress import Progress, human_bytes

__all__ = ["MANIFEST_SCHEMA", "compute_checksums", "read_manifest", "verify"]

MANIFEST_SCHEMA = "shardwise.manifest/1"


def _sha256_file(path: Location, progress: Progress | None, stop: threading.Event | None = None) -> str:
    """sha256 of a file (a private mapping hashed in chunks locally, streamed remotely); gives up
    between chunks once ``stop`` is set."""
    if progress is not None:
        progress.set_label(f"sha256 {path.name}")
    return path.sha256(progress.update if progress is not None else None,
                       stop.is_set if stop is not None else None)


def compute_checksums(
    root: Path, names: Sequence[str], *, progress: bool = False, threads: int = 0
) -> dict[str, str]:
    """sha256 of every named file, computed in parallel (a thread pool over mapped files). An
    interruption (Ctrl-C) stops the threads at their next chunk instead of letting them finish."""
    base = locate(root)
    paths = [base / n for n in names]
    total = sum(p.stat().st_size for p in paths)
    workers = threads or min(len(paths), os.cpu_count() or 4, 8) or 1
    stop = threading.Event()
    with Progress(total, "sha256", enabled=progress) as bar, ThreadPoolExecutor(workers) as pool:
        try:
            digests = list(pool.map(lambda p: _sha256_file(p, bar, stop), paths))
        except BaseException:
            stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return dict(zip(names, digests))


def read_manifest(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """The ``files`` of a checksum manifest written by ``verify(..., write_manifest=...)``."""
    p = Path(path)
    try:
        data = json.loads(p.read_bytes())
    except FileNotFoundError as e:
        raise CheckpointIOError(2, "no such file", str(p)) from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{p}: not a shardwise manifest (not valid JSON: {e})") from e
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(data, dict) or data.get("schema") != MANIFEST_SCHEMA or not isinstance(files, dict):
        raise CheckpointError(f"{p}: not a shardwise manifest (expected schema {MANIFEST_SCHEMA!r} and 'files')")
    for name, entry in files.items():
        valid = isinstance(entry, dict) and isinstance(entry.get("size"), int)
        if not valid or not isinstance(entry.get("sha256"), str):
            raise CheckpointError(f"{p}: entry {name!r} needs an integer 'size' and a 'sha256' string")
    return files


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def verify(
    path: str | os.PathLike[str],
    *,
    checksums: bool = False,
    against: str | os.PathLike[str] | None = None,
    write_manifest: str | os.PathLike[str] | None = None,
    progress: bool = False,
) -> Report:
    """Check a checkpoint folder's integrity (or one file's): every index entry is in the shard it
    names, no tensor is in two shards, no shard or tensor is outside the index, every header is valid
    and its file has exactly the size the header implies, and ``total_size`` is right.

    ``checksums`` adds per-file sha256 (computed in parallel); ``write_manifest`` writes them to a JSON
    manifest, pinning the side files too (``config.json``, ``generation_config.json``, tokenizer
    files); ``against`` compares with such a manifest (missing/extra files, sizes, hashes). Problems
    make ``ok`` False; a path that does not exist or an unreadable manifest raises.
    """
    t0 = time.perf_counter()
    pinned = read_manifest(against) if against is not None else None
    s = scan(path)
    infos = read_files(s.root, s.shards)
    problems = problems_from(structure_problems(s, infos))
    # object storage: a folder without its completion marker is not a complete checkpoint
    problems.extend(problems_from(s.root.completeness_problems(s.single_file)))
    want_sums = checksums or pinned is not None or write_manifest is not None
    sums: dict[str, str] = {}
    hashed = [f.name for f in infos if f.error != "missing"]
    if s.index is not None:
        hashed.append(s.index.name)
    sides = [] if s.single_file else side_files(s.root)
    hashed.extend(sides)
    if want_sums:
        sums = compute_checksums(s.root, hashed, progress=progress)
    if pinned is not None:
        problems.extend(_check_pinned(s, hashed, sums, pinned, str(against), set(sides)))
    if write_manifest is not None:
        entries = {n: {"size": (s.root / n).stat().st_size, "sha256": sums[n]} for n in hashed}
        _write_json_atomic(Path(write_manifest), {"schema": MANIFEST_SCHEMA, "algorithm": "sha256", "files": entries})
    files = [file_entry(f, sums.get(f.name)) for f in infos]
    stats = totals([f for f in infos if f.ok], time.perf_counter() - t0)
    stats["checksummed"] = want_sums
    index = None if s.index is None else index_entry(s, sha256=sums.get(s.index.name))
    side = [{"name": n, "size": (s.root / n).stat().st_size, "sha256": sums.get(n)} for n in sides]
    details = {
        "index": index,
        "side_files": side,
        "manifest": None if against is None else str(against),
        "wrote_manifest": None if write_manifest is None else str(write_manifest),
    }
    return Report("verify", str(path), problems, files, stats, details)


def _check_pinned(
    s: Scan, hashed: Sequence[str], sums: Mapping[str, str], pinned: Mapping[str, Mapping[str, Any]], where: str,
    sides: set[str],
) -> list[Problem]:
    out = []
    for name, entry in pinned.items():
        if name not in sums:
            out.append(Problem("missing-file", f"{name}: pinned in {where} but not found", name))
            continue
        size = (s.root / name).stat().st_size
        if size != entry["size"]:
            out.append(Problem("size", f"{name}: {size} bytes, {where} pins {entry['size']}", name))
        elif sums[name] != entry["sha256"]:
            what = "side file " if name in sides else ""
            out.append(Problem("checksum", f"{what}{name}: sha256 {sums[name][:16]}… differs from {where}", name))
    for name in hashed:
        if name not in pinned and name not in sides:  # side files a manifest does not pin are not checked
            out.append(Problem("extra-file", f"{name}: not pinned in {where}", name))
    return out


def _render_verify(r: Report) -> list[str]:
    st = r.stats
    lines = [f"{r.path}: {n_of(st['shards'], 'shard')}, {n_of(st['tensors'], 'tensor')}, {human_bytes(st['bytes'])}"]
    idx = r.details.get("index")
    if idx is not None:
        lines.append(f"  index: {idx['name']} ({idx['entries']} entries, total_size {idx['total_size']})")
    if st.get("checksummed"):
        for f in r.files:
            lines.append(f"  {f['sha256'] or '-':<64}  {f['name']}")
        if idx is not None and idx.get("sha256"):
            lines.append(f"  {idx['sha256']:<64}  {idx['name']}")
        for f in r.details.get("side_files") or []:
            lines.append(f"  {f['sha256'] or '-':<64}  {f['name']}")
    if r.details.get("manifest"):
        lines.append(f"  checked against {r.details['manifest']}")
    if r.details.get("wrote_manifest"):
        lines.append(f"  wrote {r.details['wrote_manifest']}")
    lines.append(f"  checked in {st['seconds']:.3f} s")
    return lines


register_renderer("verify", _render_verify)
