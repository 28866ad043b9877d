"""``shardwise compare``: two checkpoints shard by shard, tensor by tensor, byte range by byte range,
and its rendering (``file_rows`` is shared with ``roundtrip``)."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ._progress import Progress, human_bytes
from ._scan import FileInfo, IndexTruth, Scan, TensorInfo, file_format, read_files, scan
from .errors import CheckpointError
from .report_base import CHUNK, Problem, Report, register_renderer

__all__ = ["compare", "file_rows", "first_difference"]


def _u8(path: Path) -> np.ndarray:
    """The file's bytes as a read-only mapped array (empty array for an empty file)."""
    if path.stat().st_size == 0:
        return np.empty(0, dtype=np.uint8)
    return np.memmap(path, dtype=np.uint8, mode="r")


def first_difference(a: np.ndarray, b: np.ndarray, progress: Progress | None = None) -> tuple[int, int] | None:
    """``[begin, end)`` of the first run of differing bytes (a length difference counts), or None."""
    n = min(len(a), len(b))
    for start in range(0, n, CHUNK):
        end = min(start + CHUNK, n)
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
    exp: Scan, act: Scan, rename: Callable[[str], str], truth: IndexTruth | None = None
) -> tuple[dict[str, Any] | None, list[Problem], list[Problem]]:
    """The index entry, the differences, and (given the ``truth`` about the expected shards) the
    differences that are corrections: the expected index was wrong there and the produced one is right."""
    ei, ai = exp.index, act.index
    if ei is None and ai is None:
        return None, [], []
    if ei is None:
        assert ai is not None
        return {"name": ai.name, "expected": None, "status": "extra", "first_difference": None}, [
            Problem("index", f"{ai.name}: produced, but the original has no index", ai.name)
        ], []
    if ai is None:
        return {"name": None, "expected": ei.name, "status": "missing", "first_difference": None}, [
            Problem("index", f"{ei.name}: missing from the output", ei.name)
        ], []
    entry: dict[str, Any] = {"name": ai.name, "expected": ei.name, "status": "identical", "first_difference": None}
    if ei.raw == ai.raw:
        return entry, [], []
    r = first_difference(np.frombuffer(ei.raw, np.uint8), np.frombuffer(ai.raw, np.uint8))
    entry["first_difference"] = {"range": list(r) if r else None, "region": "index", "tensor": None}
    entry["status"] = "different"
    problems: list[Problem] = []
    fixed: list[Problem] = []
    if ei.error or ai.error:
        for side, idx in (("expected", ei), ("produced", ai)):
            if idx.error:
                problems.append(Problem("index", f"{idx.name} ({side}): {idx.error}", ai.name, None, r))
        return entry, problems, []

    def differs(message: str, tensor: str | None, corrected: bool) -> None:
        if corrected:
            fixed.append(Problem("input-inconsistent", f"input inconsistent, corrected in the output: {message}",
                                 ei.name, tensor))
        else:
            problems.append(Problem("index", message, ai.name, tensor))

    where = {k: rename(v) for k, v in truth.where.items()} if truth is not None else None
    ew = {k: rename(v) for k, v in ei.weight_map.items()}
    aw = ai.weight_map
    for k in sorted(ew.keys() - aw.keys()):
        differs(f"{ai.name}: entry {k} ({ew[k]}) is missing", k, where is not None and k not in where)
    for k in sorted(aw.keys() - ew.keys()):
        differs(f"{ai.name}: unexpected entry {k} ({aw[k]})", k, where is not None and where.get(k) == aw[k])
    for k in sorted(ew.keys() & aw.keys()):
        if ew[k] != aw[k]:
            differs(f"{ai.name}: {k} is in {aw[k]}, was in {ew[k]}", k, where is not None and where.get(k) == aw[k])
    right = {} if truth is None else {"total_size": truth.total_sizes, "total_parameters": {truth.total_parameters}}
    em, am = ei.metadata, ai.metadata
    for k in sorted(em.keys() | am.keys()):
        if em.get(k) != am.get(k):
            differs(f"{ai.name}: metadata.{k} is {am.get(k)!r}, was {em.get(k)!r}", None,
                    k in right and am.get(k) in right[k] and em.get(k) not in right[k])
    ed, ad = ei.data or {}, ai.data or {}
    for k in sorted((ed.keys() | ad.keys()) - {"metadata", "weight_map"}):
        if k not in ad:
            problems.append(Problem("index", f"{ai.name}: top-level key {k!r} is missing", ai.name))
        elif k not in ed:
            problems.append(Problem("index", f"{ai.name}: unexpected top-level key {k!r}", ai.name))
        elif ed[k] != ad[k]:
            problems.append(Problem("index", f"{ai.name}: {k} is {ad[k]!r}, was {ed[k]!r}", ai.name))
    if not problems:
        if fixed:
            entry["status"] = "corrected"
        elif ei.name != ai.name or ew != ei.weight_map:
            entry["status"] = "equal-content"  # a .bin index became a safetensors one: same content
        else:
            problems.append(Problem(
                "index",
                f"{ai.name}: same JSON content, but the bytes differ from byte {r[0] if r else 0} (formatting)",
                ai.name, None, r,
            ))
    return entry, problems, fixed


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
    ignore: Collection[str] = (),
    index_truth: IndexTruth | None = None,
    progress: bool = False,
) -> Report:
    """Compare two checkpoints (folders, or two files) shard by shard, tensor by tensor, byte range by
    byte range. ``ok`` when every weight file and the index are byte-identical (or, across a format
    change given by ``rename`` — expected name → produced name — hold identical tensors and content).

    Problems name the file, the tensor and the first differing byte range (``Problem.byte_range`` in
    the produced file, ``Problem.tensor_range`` relative to the tensor). ``ignore``: expected files a
    load does not read (shards the index does not list). ``index_truth``: what the expected index
    should say; where it was wrong and the produced one is right, the difference is a warning
    (``input-inconsistent``), not a problem.
    """
    t0 = time.perf_counter()
    rn = rename or (lambda n: n)
    se, sa = scan(expected), scan(actual)
    if se.single_file != sa.single_file:
        raise CheckpointError(f"compare a folder with a folder and a file with a file ({expected}, {actual})")
    exp_names = [n for n in se.shards if n in se.present and n not in ignore]
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
    index, index_problems, corrected = (None, [], []) if se.single_file else _compare_index(se, sa, rn, index_truth)
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
    details = {"other": str(actual), "index": index}
    return Report("compare", str(expected), problems, files, stats, details, corrected)


def file_rows(r: Report) -> list[str]:
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
    return [f"compare {r.path} (expected) with {r.details['other']} (produced)", *file_rows(r)]


register_renderer("compare", _render_compare)
