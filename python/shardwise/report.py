"""Checks for regression suites and the ``shardwise`` command: ``verify``, ``compare``, ``roundtrip``,
``inspect_checkpoint``; each returns a :class:`Report` (``assert report.ok, report.summary()``).

The command line (``shardwise.cli``) is a thin layer over these functions; ``Report.to_dict()`` is its
``--json`` output (schema in the README, section "Command line").
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import mmap
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._progress import Progress, human_bytes
from ._scan import FileInfo, Scan, TensorInfo, file_format, not_a_folder, read_files, scan, structure_problems
from .errors import CheckpointError, CheckpointIOError

__all__ = [
    "SCHEMA_VERSION",
    "Problem",
    "Report",
    "compare",
    "compute_checksums",
    "inspect_checkpoint",
    "read_manifest",
    "roundtrip",
    "verify",
]

#: version of the ``--json`` / ``Report.to_dict()`` schema; bumped on any incompatible change
SCHEMA_VERSION = 1
MANIFEST_SCHEMA = "shardwise.manifest/1"

#: every ``Problem.kind``
PROBLEM_KINDS = (
    # structure (verify, inspect)
    "index", "missing-file", "unlisted-file", "unreadable", "missing-tensor", "unlisted-tensor",
    "wrong-shard", "duplicate-tensor", "total-size",
    # pinned checksums (verify --against)
    "size", "checksum",
    # comparisons (roundtrip, compare)
    "extra-file", "renamed-file", "extra-tensor", "dtype", "shape", "data", "metadata", "header",
)


@dataclass
class Problem:
    """One thing that is wrong or differs, with where: file, tensor and byte range when known.

    ``byte_range`` is ``[begin, end)`` in the file (for comparisons: in the file that was produced);
    ``tensor_range`` is the same range relative to the tensor's first byte.
    """

    kind: str
    message: str
    file: str | None = None
    tensor: str | None = None
    byte_range: tuple[int, int] | None = None
    tensor_range: tuple[int, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "message": self.message,
            "file": self.file,
            "tensor": self.tensor,
            "byte_range": list(self.byte_range) if self.byte_range else None,
            "tensor_range": list(self.tensor_range) if self.tensor_range else None,
        }

    def __str__(self) -> str:
        return f"[{self.kind}] {self.message}"


@dataclass
class Report:
    """The outcome of one check or command. ``ok`` is True when no problem was found.

    ``files`` has one entry (a dict) per file, ``stats`` the counts and timings, ``details`` the
    command's own top-level keys (see ``to_dict``).
    """

    command: str
    path: str
    problems: list[Problem] = field(default_factory=list)
    files: list[dict[str, Any]] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def exit_code(self) -> int:
        """The command's exit status: 0 when ok, 1 when a check failed."""
        return 0 if self.ok else 1

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` document: ``schema, command, path, ok, <details...>, files, problems, stats``."""
        return {
            "schema": SCHEMA_VERSION,
            "command": self.command,
            "path": self.path,
            "ok": self.ok,
            **self.details,
            "files": self.files,
            "problems": [p.to_dict() for p in self.problems],
            "stats": self.stats,
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def summary(self, max_problems: int = 40) -> str:
        """A human-readable account: what was checked, per-file status, the problems, a verdict."""
        render = _RENDERERS.get(self.command, _render_generic)
        lines = render(self)
        if self.problems:
            lines.append(f"{len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}:")
            for p in self.problems[:max_problems]:
                lines.append(f"  {p}")
            if len(self.problems) > max_problems:
                lines.append(f"  ... and {len(self.problems) - max_problems} more (see --json)")
        lines.append(_verdict(self))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


# ----------------------------------------------------------------------------------------------- inspect


def inspect_checkpoint(path: str | os.PathLike[str], *, tensors: bool = False) -> Report:
    """Describe a checkpoint file or folder from its headers only (no tensor data is read): shards in
    numeric order, tensor counts, dtypes, bytes, ``__metadata__`` and the index's consistency
    (problems are listed; ``ok`` is False when the index and shards disagree).

    Raises ``CheckpointError`` / ``OSError`` when a file cannot be read or a header is malformed.
    """
    t0 = time.perf_counter()
    s = scan(path)
    present = [n for n in s.shards if n in s.present]
    infos = read_files(s.root, present, strict=True)
    missing = [FileInfo(n, file_format(n), error="missing") for n in s.shards if n not in s.present]
    problems = _problems(structure_problems(s, [*infos, *missing]))
    index = None
    if s.index is not None:
        index = {
            "name": s.index.name,
            "entries": len(s.index.weight_map),
            "total_size": s.index.metadata.get("total_size"),
            "metadata": s.index.metadata if s.index.error is None else None,
            "consistent": not problems,
        }
    listing = None
    if tensors:
        listing = [
            {"name": t.name, "dtype": t.dtype, "shape": t.shape,
             "offsets": list(t.offsets) if t.offsets else None, "file": f.name}
            for f in infos for t in f.tensors
        ]
    files = [_file_entry(f) for f in [*infos, *missing]]
    order = {n: i for i, n in enumerate(s.shards)}
    files.sort(key=lambda e: order.get(e["name"], 0))
    return Report(
        "inspect",
        str(path),
        problems,
        files,
        _totals(infos, time.perf_counter() - t0),
        {"index": index, "tensors": listing},
    )


def _file_entry(f: FileInfo, sha256: str | None = None) -> dict[str, Any]:
    d = f.to_dict()
    d["sha256"] = sha256
    return d


def _totals(infos: Sequence[FileInfo], seconds: float) -> dict[str, Any]:
    return {
        "shards": len(infos),
        "tensors": sum(len(f.tensors) for f in infos),
        "bytes": sum(f.data_bytes for f in infos),
        "file_bytes": sum(f.size or 0 for f in infos),
        "seconds": round(seconds, 6),
    }


def _problems(items: Sequence[tuple[str, str, str | None, str | None]]) -> list[Problem]:
    return [Problem(kind, msg, file, tensor) for kind, msg, file, tensor in items]


# ------------------------------------------------------------------------------------------------ verify

_CHUNK = 16 * 1024 * 1024


def _sha256_file(path: Path, progress: Progress | None) -> str:
    """sha256 of a file read through a private mapping in 16 MiB chunks (hashlib drops the GIL)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return h.hexdigest()
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            view = memoryview(mm)
            try:
                for start in range(0, size, _CHUNK):
                    h.update(view[start : start + _CHUNK])
                    if progress is not None:
                        progress.update(min(_CHUNK, size - start))
            finally:
                view.release()
    return h.hexdigest()


def compute_checksums(
    root: Path, names: Sequence[str], *, progress: bool = False, threads: int = 0
) -> dict[str, str]:
    """sha256 of every named file, computed in parallel (a thread pool over mapped files)."""
    paths = [root / n for n in names]
    total = sum(p.stat().st_size for p in paths)
    workers = threads or min(len(paths), os.cpu_count() or 4, 8) or 1
    with Progress(total, "sha256", enabled=progress) as bar, ThreadPoolExecutor(workers) as pool:
        digests = list(pool.map(lambda p: _sha256_file(p, bar), paths))
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
    manifest; ``against`` compares with such a manifest (missing/extra files, sizes, hashes). Problems
    make ``ok`` False; a path that does not exist or an unreadable manifest raises.
    """
    t0 = time.perf_counter()
    pinned = read_manifest(against) if against is not None else None
    s = scan(path)
    infos = read_files(s.root, s.shards)
    problems = _problems(structure_problems(s, infos))
    want_sums = checksums or pinned is not None or write_manifest is not None
    sums: dict[str, str] = {}
    hashed = [f.name for f in infos if f.error != "missing"]
    if s.index is not None:
        hashed.append(s.index.name)
    if want_sums:
        sums = compute_checksums(s.root, hashed, progress=progress)
    if pinned is not None:
        problems.extend(_check_pinned(s, hashed, sums, pinned, str(against)))
    if write_manifest is not None:
        entries = {n: {"size": (s.root / n).stat().st_size, "sha256": sums[n]} for n in hashed}
        _write_json_atomic(Path(write_manifest), {"schema": MANIFEST_SCHEMA, "algorithm": "sha256", "files": entries})
    files = [_file_entry(f, sums.get(f.name)) for f in infos]
    stats = _totals([f for f in infos if f.ok], time.perf_counter() - t0)
    stats["checksummed"] = want_sums
    index = None
    if s.index is not None:
        index = {
            "name": s.index.name,
            "entries": len(s.index.weight_map),
            "total_size": s.index.metadata.get("total_size"),
            "sha256": sums.get(s.index.name),
        }
    details = {
        "index": index,
        "manifest": None if against is None else str(against),
        "wrote_manifest": None if write_manifest is None else str(write_manifest),
    }
    return Report("verify", str(path), problems, files, stats, details)


def _check_pinned(
    s: Scan, hashed: Sequence[str], sums: Mapping[str, str], pinned: Mapping[str, Mapping[str, Any]], where: str
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
            out.append(Problem("checksum", f"{name}: sha256 {sums[name][:16]}… differs from {where}", name))
    for name in hashed:
        if name not in pinned:
            out.append(Problem("extra-file", f"{name}: not pinned in {where}", name))
    return out


# ----------------------------------------------------------------------------------------------- compare


def _u8(path: Path) -> np.ndarray:
    """The file's bytes as a read-only mapped array (empty array for an empty file)."""
    if path.stat().st_size == 0:
        return np.empty(0, dtype=np.uint8)
    return np.memmap(path, dtype=np.uint8, mode="r")


def first_difference(a: np.ndarray, b: np.ndarray, progress: Progress | None = None) -> tuple[int, int] | None:
    """``[begin, end)`` of the first run of differing bytes (a length difference counts), or None."""
    n = min(len(a), len(b))
    for start in range(0, n, _CHUNK):
        end = min(start + _CHUNK, n)
        x, y = a[start:end], b[start:end]
        if progress is not None:
            progress.update(len(x))
        if np.array_equal(x, y):
            continue
        ne = np.flatnonzero(x != y)
        steps = np.flatnonzero(np.diff(ne) != 1)
        length = int(steps[0]) + 1 if len(steps) else len(ne)
        return start + int(ne[0]), start + int(ne[0]) + length
    if len(a) != len(b):
        return n, max(len(a), len(b))
    return None


def _locate(info: FileInfo | None, offset: int) -> dict[str, Any]:
    """Which part of a safetensors file a byte offset falls in: the header, a tensor, or past the end."""
    if info is None or info.header is None:
        return {"region": "unknown", "tensor": None}
    h = info.header
    if offset < h.data_start:
        return {"region": "header", "tensor": None}
    rel = offset - h.data_start
    for t in info.tensors:
        assert t.offsets is not None
        if t.offsets[0] <= rel < t.offsets[1]:
            return {"region": "tensor", "tensor": t.name}
    return {"region": "end", "tensor": None}


def _header_or_error(root: Path, name: str) -> FileInfo:
    return read_files(root, [name])[0]


def _tensor_bytes(info: FileInfo, path: Path, arr: np.ndarray) -> Callable[[TensorInfo], np.ndarray]:
    """A function giving a tensor's bytes: a slice of the mapped file (safetensors) or a view of the
    loaded tensor (torch files)."""
    if info.header is not None:
        base = info.header.data_start

        def st_bytes(t: TensorInfo) -> np.ndarray:
            assert t.offsets is not None
            return arr[base + t.offsets[0] : base + t.offsets[1]]

        return st_bytes
    from .shards import SourceFile, byte_view, load_source_tensors

    loaded = load_source_tensors(SourceFile(path))

    def torch_bytes(t: TensorInfo) -> np.ndarray:
        v = byte_view(loaded[t.name])
        return np.frombuffer(v, dtype=np.uint8) if isinstance(v, bytes) else np.asarray(v)

    return torch_bytes


def _compare_file(
    exp_root: Path, exp_name: str, act_root: Path, act_name: str, progress: Progress | None
) -> tuple[dict[str, Any], list[Problem]]:
    """Compare one expected file with the produced one: bytes first; if they differ, tensor by tensor."""
    ep, ap = exp_root / exp_name, act_root / act_name
    entry: dict[str, Any] = {
        "name": act_name,
        "expected": exp_name,
        "status": "identical",
        "size": ap.stat().st_size,
        "expected_size": ep.stat().st_size,
        "tensors": None,
        "first_difference": None,
    }
    ea, aa = _u8(ep), _u8(ap)
    same_format = file_format(exp_name) == file_format(act_name) == "safetensors"
    diff = first_difference(ea, aa, progress) if same_format else None
    if same_format and diff is None:
        info = _header_or_error(act_root, act_name)
        entry["tensors"] = len(info.tensors) if info.ok else None
        return entry, []
    if progress is not None and not same_format:
        progress.update(entry["expected_size"])
    ei, ai = _header_or_error(exp_root, exp_name), _header_or_error(act_root, act_name)
    entry["tensors"] = len(ai.tensors) if ai.ok else None
    if diff is not None:
        entry["first_difference"] = {"range": list(diff), **_locate(ei if ei.ok else None, diff[0])}
    problems: list[Problem] = []
    for side, info in (("expected", ei), ("produced", ai)):
        if not info.ok:
            problems.append(Problem("unreadable", f"{info.name} ({side}): {info.error}", act_name, None, diff))
    if problems:
        entry["status"] = "different"
        return entry, problems
    et = {t.name: t for t in ei.tensors}
    at = {t.name: t for t in ai.tensors}
    for name in et.keys() - at.keys():
        problems.append(Problem("missing-tensor", f"{act_name}: tensor {name} is missing", act_name, name))
    for name in at.keys() - et.keys():
        problems.append(Problem("extra-tensor", f"{act_name}: unexpected tensor {name}", act_name, name))
    e_bytes, a_bytes = _tensor_bytes(ei, ep, ea), _tensor_bytes(ai, ap, aa)
    a_start = ai.header.data_start if ai.header is not None else None
    for name in [t.name for t in ei.tensors if t.name in at]:
        te, ta = et[name], at[name]
        if te.dtype != ta.dtype:
            problems.append(Problem("dtype", f"{act_name}: {name}: dtype {te.dtype} became {ta.dtype}", act_name, name))
            continue
        if te.shape != ta.shape:
            problems.append(Problem("shape", f"{act_name}: {name}: shape {te.shape} became {ta.shape}", act_name, name))
            continue
        r = first_difference(e_bytes(te), a_bytes(ta))
        if r is None:
            continue
        absolute = None
        where = ""
        if a_start is not None and ta.offsets is not None:
            absolute = (a_start + ta.offsets[0] + r[0], a_start + ta.offsets[0] + r[1])
            where = f", file bytes {absolute[0]}..{absolute[1]}"
        problems.append(Problem(
            "data",
            f"{act_name}: {name}: bytes {r[0]}..{r[1]} of the tensor differ{where} ({te.dtype} {te.shape})",
            act_name, name, absolute, r,
        ))
    if ei.header is not None and ai.header is not None and ei.metadata != ai.metadata:
        problems.append(Problem(
            "metadata", f"{act_name}: __metadata__ {ei.metadata} became {ai.metadata}", act_name, None,
        ))
    if not problems and same_format:
        assert diff is not None
        problems.append(Problem(
            "header",
            f"{act_name}: same tensors and data, but the header bytes differ from byte {diff[0]} "
            "(tensor order, offsets, padding or JSON formatting)",
            act_name, None, diff,
        ))
    entry["status"] = "different" if problems else "equal-tensors"
    return entry, problems


def _compare_index(
    exp: Scan, act: Scan, rename: Callable[[str], str]
) -> tuple[dict[str, Any] | None, list[Problem]]:
    ei, ai = exp.index, act.index
    if ei is None and ai is None:
        return None, []
    if ei is None:
        assert ai is not None
        return {"name": ai.name, "expected": None, "status": "extra", "first_difference": None}, [
            Problem("index", f"{ai.name}: produced, but the original has no index", ai.name)
        ]
    if ai is None:
        return {"name": None, "expected": ei.name, "status": "missing", "first_difference": None}, [
            Problem("index", f"{ei.name}: missing from the output", ei.name)
        ]
    entry: dict[str, Any] = {"name": ai.name, "expected": ei.name, "status": "identical", "first_difference": None}
    if ei.raw == ai.raw:
        return entry, []
    r = first_difference(np.frombuffer(ei.raw, np.uint8), np.frombuffer(ai.raw, np.uint8))
    entry["first_difference"] = {"range": list(r) if r else None, "region": "index", "tensor": None}
    entry["status"] = "different"
    problems = []
    if ei.error or ai.error:
        for side, idx in (("expected", ei), ("produced", ai)):
            if idx.error:
                problems.append(Problem("index", f"{idx.name} ({side}): {idx.error}", ai.name, None, r))
        return entry, problems
    ew = {k: rename(v) for k, v in ei.weight_map.items()}
    aw = ai.weight_map
    for k in sorted(ew.keys() - aw.keys()):
        problems.append(Problem("index", f"{ai.name}: entry {k} ({ew[k]}) is missing", ai.name, k))
    for k in sorted(aw.keys() - ew.keys()):
        problems.append(Problem("index", f"{ai.name}: unexpected entry {k} ({aw[k]})", ai.name, k))
    for k in sorted(ew.keys() & aw.keys()):
        if ew[k] != aw[k]:
            problems.append(Problem("index", f"{ai.name}: {k} is in {aw[k]}, was in {ew[k]}", ai.name, k))
    em, am = ei.metadata, ai.metadata
    for k in sorted(em.keys() | am.keys()):
        if em.get(k) != am.get(k):
            problems.append(Problem("index", f"{ai.name}: metadata.{k} is {am.get(k)!r}, was {em.get(k)!r}", ai.name))
    if not problems:
        if ei.name != ai.name or ew != ei.weight_map:
            entry["status"] = "equal-content"  # a .bin index became a safetensors one: same content
            return entry, []
        problems.append(Problem(
            "index", f"{ai.name}: same JSON content, but the bytes differ from byte {r[0] if r else 0} (formatting)",
            ai.name, None, r,
        ))
    return entry, problems


_NUMBERED = re.compile(r"^(?P<stem>.+)-(?P<k>\d+)-of-(?P<n>\d+)(?P<ext>\.[A-Za-z]+)$")


def _renumbered(missing: Sequence[str], extra: Sequence[str]) -> dict[str, str]:
    """Pairs ``stem-k-of-n`` ↔ ``stem-k-of-m`` among missing and extra files (shards renumbered because
    one was added or removed), so that their contents can still be compared."""
    def key(name: str) -> tuple[str, int, str] | None:
        m = _NUMBERED.match(name)
        return (m.group("stem"), int(m.group("k")), m.group("ext")) if m else None

    by_key: dict[tuple[str, int, str], str] = {}
    for name in extra:
        k = key(name)
        if k is not None:
            by_key.setdefault(k, name)
    out = {}
    for name in missing:
        k = key(name)
        if k is not None and k in by_key:
            out[name] = by_key.pop(k)
    return out


def compare(
    expected: str | os.PathLike[str],
    actual: str | os.PathLike[str],
    *,
    rename: Callable[[str], str] | None = None,
    progress: bool = False,
) -> Report:
    """Compare two checkpoints (folders, or two files) shard by shard, tensor by tensor, byte range by
    byte range. ``ok`` when every weight file and the index are byte-identical (or, across a format
    change given by ``rename`` — expected name → produced name — hold identical tensors and content).

    Problems name the file, the tensor and the first differing byte range (``Problem.byte_range`` in
    the produced file, ``Problem.tensor_range`` relative to the tensor).
    """
    t0 = time.perf_counter()
    rn = rename or (lambda n: n)
    se, sa = scan(expected), scan(actual)
    if se.single_file != sa.single_file:
        raise CheckpointError(f"compare a folder with a folder and a file with a file ({expected}, {actual})")
    exp_names = [n for n in se.shards if n in se.present]
    act_names = set(sa.present)
    problems: list[Problem] = []
    files: list[dict[str, Any]] = []
    if se.single_file:
        pairs = [(exp_names[0], next(iter(act_names)))]
    else:
        pairs = [(n, rn(n)) for n in exp_names if rn(n) in act_names]
        renamed = _renumbered(
            [rn(n) for n in exp_names if rn(n) not in act_names],
            sorted(act_names - {a for _, a in pairs}),
        )
        if renamed:
            back = {rn(n): n for n in exp_names}
            for old, new in renamed.items():
                problems.append(Problem("renamed-file", f"{old} came back as {new}", new))
                pairs.append((back[old], new))
            plain = rn
            rn = lambda n: renamed.get(plain(n), plain(n))  # noqa: E731
    produced = {a for _, a in pairs}
    for n in exp_names:
        if not se.single_file and rn(n) not in act_names:
            problems.append(Problem("missing-file", f"{rn(n)}: missing from the output", rn(n)))
            files.append({"name": rn(n), "expected": n, "status": "missing", "size": None,
                          "expected_size": (se.root / n).stat().st_size, "tensors": None, "first_difference": None})
    total = sum((se.root / e).stat().st_size for e, _ in pairs)
    with Progress(total, "compare", enabled=progress) as bar:
        for e, a in pairs:
            entry, found = _compare_file(se.root, e, sa.root, a, bar)
            if entry["status"] == "identical" and rn(e) != e and e != a and file_format(e) == file_format(a):
                entry["status"] = "renamed"
            files.append(entry)
            problems.extend(found)
    for a in sa.shards:
        if a in act_names and a not in produced:
            problems.append(Problem("extra-file", f"{a}: not in the original", a))
            files.append({"name": a, "expected": None, "status": "extra", "size": (sa.root / a).stat().st_size,
                          "expected_size": None, "tensors": None, "first_difference": None})
    index, index_problems = (None, []) if se.single_file else _compare_index(se, sa, rn)
    problems.extend(index_problems)
    order = {rn(n): i for i, n in enumerate(se.shards)}
    files.sort(key=lambda f: (order.get(f["name"], len(order)), f["name"] or ""))
    stats = {
        "files": len(files),
        "identical": sum(f["status"] == "identical" for f in files),
        "different": sum(f["status"] == "different" for f in files),
        "bytes": total,
        "seconds": round(time.perf_counter() - t0, 6),
    }
    return Report("compare", str(expected), problems, files, stats, {"other": str(actual), "index": index})


# --------------------------------------------------------------------------------------------- roundtrip


def roundtrip(
    path: str | os.PathLike[str] | None = None,
    model_type: str | None = None,
    *,
    workdir: str | os.PathLike[str] | None = None,
    keep: str | os.PathLike[str] | None = None,
    tamper: Callable[[Path], None] | None = None,
    progress: bool = False,
) -> Report:
    """HF → torchtune → HF through ``shardwise convert`` in a temporary folder, then ``compare``.

    ``ok`` when every shard and the index come back byte for byte (for ``.bin``/``.pt`` inputs, which
    come back as safetensors: the same tensors and index content). With ``path=None`` it runs on the
    bundled sample (``shardwise.sample``, a tiny Llama-3-style checkpoint generated on the fly).

    ``workdir``: where the temporary folder goes (default: the system's); ``keep``: a folder to keep
    the intermediate results in (``keep/tune``, ``keep/hf``) instead; ``tamper``: called with the
    torchtune folder before converting back (fault injection for tests of the comparison).

    Raises ``CheckpointError``/``OSError`` for unreadable input, ``KeyError`` for an unknown model type
    and ``NotImplementedError`` for one without a converter.
    """
    from . import sample
    from .checkpointer import FullModelHFCheckpointer, _model_type
    from .layout import output_name
    from .tunedir import convert_checkpoint

    if path is None:
        mt = _model_type(model_type or sample.SAMPLE_MODEL_TYPE)
    elif model_type is None:
        raise ValueError("roundtrip needs a model_type for a checkpoint folder (e.g. LLAMA3)")
    else:
        mt = _model_type(model_type)
    from .convert import get_converter

    get_converter(mt)  # NotImplementedError before any work
    t0 = time.perf_counter()
    if keep is not None:
        work = Path(keep)
        if work.exists() and any(work.iterdir()):
            raise CheckpointError(f"{work}: the folder to keep the round trip in must be empty or new")
        work.mkdir(parents=True, exist_ok=True)
    else:
        work = Path(tempfile.mkdtemp(prefix="shardwise-roundtrip-", dir=workdir))
    try:
        timings: dict[str, float | None] = {"generate_seconds": None}
        if path is None:
            src = sample.write_sample(work / "sample")
            timings["generate_seconds"] = time.perf_counter() - t0
        else:
            src = Path(path)
            if not src.is_dir():
                raise not_a_folder(src)
        t = time.perf_counter()
        to_tune = convert_checkpoint(src, work / "tune", mt.name, to="tune", progress=progress)
        timings["to_tune_seconds"] = time.perf_counter() - t
        if tamper is not None:
            tamper(work / "tune")
        t = time.perf_counter()
        convert_checkpoint(work / "tune", work / "hf", mt.name, to="hf", progress=progress)
        timings["to_hf_seconds"] = time.perf_counter() - t
        s = scan(src)

        def rename(name: str) -> str:
            if s.index is not None and name == s.index.name:
                return "model.safetensors.index.json"
            return output_name(name, True) if file_format(name) == "torch" else name

        t = time.perf_counter()
        cmp = compare(src, work / "hf", rename=rename, progress=progress)
        timings["compare_seconds"] = time.perf_counter() - t
        # the path recipes take: FullModelHFCheckpointer load_checkpoint → save_checkpoint
        t = time.perf_counter()
        ck = FullModelHFCheckpointer(str(src), s.shards, mt.name, str(work / "checkpointer"), fsync=False)
        ck.save_checkpoint(ck.load_checkpoint(), epoch=0)
        timings["checkpointer_seconds"] = time.perf_counter() - t
        via_ck = compare(src, work / "checkpointer" / "epoch_0", rename=rename, progress=progress)
    finally:
        if keep is None:
            shutil.rmtree(work, ignore_errors=True)
    def identical(c: Report) -> bool:
        return c.ok and all(f["status"] == "identical" for f in c.files) and (
            c.details["index"] is None or c.details["index"]["status"] == "identical"
        )

    exact = identical(cmp) and identical(via_ck)
    seen = {(p.kind, p.file, p.tensor, p.byte_range) for p in cmp.problems}
    problems = list(cmp.problems) + [  # what only the checkpointer's path gets wrong
        dataclasses.replace(p, message=f"FullModelHFCheckpointer load → save: {p.message}")
        for p in via_ck.problems
        if (p.kind, p.file, p.tensor, p.byte_range) not in seen
    ]
    stats = {
        "shards": len([f for f in cmp.files if f["expected"] is not None]),
        "tensors": to_tune.stats["input_tensors"],
        "tune_tensors": to_tune.stats["tensors"],
        "aside": to_tune.stats["aside"],
        "bytes": to_tune.stats["bytes"],
        **{k: None if v is None else round(v, 6) for k, v in timings.items()},
        "seconds": round(time.perf_counter() - t0, 6),
    }
    details = {
        "model_type": mt.name,
        "sample": path is None,
        "byte_identical": exact,
        "kept": None if keep is None else str(keep),
        "index": cmp.details["index"],
    }
    return Report("roundtrip", "<sample>" if path is None else str(path), problems, cmp.files, stats, details)


# ------------------------------------------------------------------------------------------- rendering


def _verdict(r: Report) -> str:
    if r.command == "roundtrip":
        if r.ok:
            how = "yes" if r.details.get("byte_identical") else "no — same tensors and index content (format changed)"
            return f"byte-identical: {how}"
        return "byte-identical: NO"
    return "OK" if r.ok else "FAILED"


def _n(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def _render_generic(r: Report) -> list[str]:
    return [f"shardwise {r.command} {r.path}"]


def _fmt_dtypes(d: Mapping[str, int]) -> str:
    return ", ".join(f"{k}×{v}" for k, v in d.items()) or "-"


def _render_inspect(r: Report) -> list[str]:
    st = r.stats
    counts = f"{_n(st['shards'], 'shard')}, {_n(st['tensors'], 'tensor')}"
    lines = [f"{r.path}: {counts}, {human_bytes(st['bytes'])} of tensor data"]
    w = max([len(f["name"]) for f in r.files] + [5])
    lines.append(f"  {'file':<{w}}  {'tensors':>7}  {'bytes':>10}  dtypes")
    for f in r.files:
        if f["error"]:
            lines.append(f"  {f['name']:<{w}}  {'-':>7}  {'-':>10}  {f['error']}")
            continue
        size = human_bytes(f["data_bytes"])
        lines.append(f"  {f['name']:<{w}}  {f['tensors']:>7}  {size:>10}  {_fmt_dtypes(f['dtypes'])}")
    metas = {json.dumps(f["metadata"], sort_keys=True) for f in r.files if not f["error"]}
    if len(metas) == 1:
        lines.append(f"  __metadata__: {metas.pop()}")
    else:
        for f in r.files:
            if not f["error"]:
                lines.append(f"  __metadata__ of {f['name']}: {json.dumps(f['metadata'], sort_keys=True)}")
    idx = r.details.get("index")
    if idx is not None:
        state = "consistent with the shards" if idx["consistent"] else "INCONSISTENT (see problems)"
        lines.append(f"  index: {idx['name']}, {idx['entries']} entries, total_size {idx['total_size']}: {state}")
    elif len(r.files) > 1:
        lines.append("  index: none")
    listing = r.details.get("tensors")
    if listing:
        wn = max(len(t["name"]) for t in listing)
        lines.append(f"  {'tensor':<{wn}}  {'dtype':<7}  {'shape':<16}  {'offsets':<23}  file")
        for t in listing:
            off = f"{t['offsets'][0]}..{t['offsets'][1]}" if t["offsets"] else "-"
            shape = "[" + ", ".join(map(str, t["shape"])) + "]"
            lines.append(f"  {t['name']:<{wn}}  {t['dtype']:<7}  {shape:<16}  {off:<23}  {t['file']}")
    return lines


def _render_verify(r: Report) -> list[str]:
    st = r.stats
    lines = [f"{r.path}: {_n(st['shards'], 'shard')}, {_n(st['tensors'], 'tensor')}, {human_bytes(st['bytes'])}"]
    idx = r.details.get("index")
    if idx is not None:
        lines.append(f"  index: {idx['name']} ({idx['entries']} entries, total_size {idx['total_size']})")
    if st.get("checksummed"):
        for f in r.files:
            lines.append(f"  {f['sha256'] or '-':<64}  {f['name']}")
        if idx is not None and idx.get("sha256"):
            lines.append(f"  {idx['sha256']:<64}  {idx['name']}")
    if r.details.get("manifest"):
        lines.append(f"  checked against {r.details['manifest']}")
    if r.details.get("wrote_manifest"):
        lines.append(f"  wrote {r.details['wrote_manifest']}")
    lines.append(f"  checked in {st['seconds']:.3f} s")
    return lines


def _file_rows(r: Report) -> list[str]:
    rows = []
    names = [f["name"] or f["expected"] for f in r.files]
    idx = r.details.get("index")
    if idx is not None:
        names.append(idx["name"] or idx["expected"])
    w = max([len(n) for n in names] + [4])
    for f in r.files:
        size = f["size"] if f["size"] is not None else f["expected_size"]
        status = f["status"]
        fd = f.get("first_difference")
        if fd:
            where = fd["tensor"] or fd["region"]
            status += f" (first at byte {fd['range'][0]}, {where})"
        rows.append(f"  {f['name'] or f['expected']:<{w}}  {human_bytes(size or 0):>9}  {status}")
    if idx is not None:
        status = idx["status"]
        if status == "different" and idx.get("first_difference") and idx["first_difference"]["range"]:
            status += f" (first at byte {idx['first_difference']['range'][0]})"
        rows.append(f"  {idx['name'] or idx['expected']:<{w}}  {'':>9}  {status}")
    return rows


def _render_compare(r: Report) -> list[str]:
    return [f"compare {r.path} (expected) with {r.details['other']} (produced)", *_file_rows(r)]


def _render_roundtrip(r: Report) -> list[str]:
    st = r.stats
    what = r.path
    if r.details.get("sample"):
        ms = (st["generate_seconds"] or 0) * 1000
        what = f"bundled sample: a tiny Llama-3-style checkpoint, generated in {ms:.0f} ms"
    lines = [
        "shardwise roundtrip: Hugging Face → torchtune → Hugging Face, compared byte for byte",
        f"  checkpoint   {what}",
        f"  model type   {r.details['model_type']}",
        f"  contents     {_n(st['shards'], 'shard')}, {_n(st['tensors'], 'tensor')}, {human_bytes(st['bytes'])}"
        + (f", index {r.details['index']['expected']}" if r.details.get("index") else ""),
        f"  HF → tune    {st['to_tune_seconds'] * 1000:8.1f} ms   {st['tune_tensors']} torchtune tensors"
        + (f" + {st['aside']} kept aside" if st["aside"] else ""),
        f"  tune → HF    {st['to_hf_seconds'] * 1000:8.1f} ms",
        f"  compare      {st['compare_seconds'] * 1000:8.1f} ms",
        f"  checkpointer {st['checkpointer_seconds'] * 1000:8.1f} ms   FullModelHFCheckpointer load → save, compared",
        *_file_rows(r),
    ]
    if r.details.get("kept"):
        lines.append(f"  intermediate folders kept in {r.details['kept']} (tune/, hf/)")
    return lines


def _render_convert(r: Report) -> list[str]:
    st = r.stats
    arrow = "HF → torchtune" if r.details["direction"] == "hf-to-tune" else "torchtune → HF"
    lines = [
        f"converted {r.path} → {r.details['output']} ({arrow}, {r.details['model_type']})",
        f"  {_n(st['shards'], 'shard')}, {_n(st['tensors'], 'tensor')}, {human_bytes(st['bytes'])}"
        + (f", {st['aside']} kept aside" if st.get("aside") else "")
        + f" in {st['seconds']:.3f} s",
    ]
    w = max([len(f["name"]) for f in r.files] + [4])
    for f in r.files:
        tensors = "" if f["tensors"] is None else f"{f['tensors']} tensors"
        lines.append(f"  {f['name']:<{w}}  {human_bytes(f['size']):>9}  {f['role']:<6}  {tensors}".rstrip())
    return lines


_RENDERERS: dict[str, Callable[[Report], list[str]]] = {
    "inspect": _render_inspect,
    "verify": _render_verify,
    "compare": _render_compare,
    "roundtrip": _render_roundtrip,
    "convert": _render_convert,
}
