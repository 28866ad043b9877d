"""``shardwise compare``: two checkpoints shard by shard, tensor by tensor, byte range by byte range,
and its rendering (``file_rows`` is shared with ``roundtrip``)."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError
from ..format.scan import (
    FileInfo,
    Index,
    IndexTruth,
    Scan,
    TensorInfo,
    file_format,
    read_files,
    scan,
    structure_problems,
)
from .base import Problem, Report, register_renderer
from .diff import compare_file, compare_side_files, first_difference, mapped_bytes
from .progress import Progress, human_bytes

if TYPE_CHECKING:
    import numpy as np  # imported where used: inspect/verify/--version start without it

__all__ = ["compare", "file_rows"]


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
    import numpy as np

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
        if em.get(k) == am.get(k):
            continue
        if k in right and am.get(k) in right[k] and em.get(k) in right[k]:
            continue  # both right: a .bin index counts tied storages once, a safetensors one cannot
        differs(f"{ai.name}: metadata.{k} is {am.get(k)!r}, was {em.get(k)!r}", None,
                k in right and am.get(k) in right[k])
    problems.extend(_top_level_differences(ei, ai))
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


def _top_level_differences(ei: Index, ai: Index) -> list[Problem]:
    """Index keys besides ``metadata`` and ``weight_map`` (they must survive a save unchanged)."""
    ed, ad = ei.data or {}, ai.data or {}
    problems = []
    for k in sorted((ed.keys() | ad.keys()) - {"metadata", "weight_map"}):
        if k not in ad:
            problems.append(Problem("index", f"{ai.name}: top-level key {k!r} is missing", ai.name))
        elif k not in ed:
            problems.append(Problem("index", f"{ai.name}: unexpected top-level key {k!r}", ai.name))
        elif ed[k] != ad[k]:
            problems.append(Problem("index", f"{ai.name}: {k} is {ad[k]!r}, was {ed[k]!r}", ai.name))
    return problems


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
    strict_layout: bool = False,
    progress: bool = False,
) -> Report:
    """Compare two checkpoints (folders, or two files) shard by shard, tensor by tensor, byte range by
    byte range. ``ok`` when every weight file and the index are byte-identical (or, across a format
    change given by ``rename`` — expected name → produced name — hold identical tensors and content).

    Two safetensors folders holding the same tensors in different shards (e.g. after
    ``--max-shard-size``) are paired tensor by tensor by name: ``details["layout"]`` is
    ``"different"`` and ``ok`` stays True unless ``strict_layout``. Problems name the file, the tensor
    and the first differing byte range (``Problem.byte_range`` in the produced file,
    ``Problem.tensor_range`` relative to the tensor). ``ignore``: expected files a load does not read
    (shards the index does not list). ``index_truth``: what the expected index should say; where it
    was wrong and the produced one is right, the difference is a warning (``input-inconsistent``),
    not a problem.
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
    if not se.single_file and _resharded(se, sa, exp_names, pairs, produced):
        return _compare_by_tensor_name(se, sa, expected, actual, strict_layout, progress, t0, ignore)
    for n in exp_names:
        if not se.single_file and rn(n) not in act_names:
            problems.append(Problem("missing-file", f"{rn(n)}: missing from the output", rn(n)))
            files.append({"name": rn(n), "expected": n, "status": "missing", "size": None,
                          "expected_size": (se.root / n).stat().st_size, "tensors": None, "first_difference": None})
    total = sum((se.root / e).stat().st_size for e, _ in pairs)
    with Progress(total, "compare", enabled=progress) as bar:
        for e, a in pairs:
            bar.set_label(f"compare {a}")
            entry, found = compare_file(se.root, e, sa.root, a, bar)
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
    sides, side_problems = (None, []) if se.single_file else compare_side_files(se.root, sa.root)
    problems.extend(side_problems)
    details = {"other": str(actual), "index": index, "layout": "same", "layout_note": None, "side_files": sides}
    return Report("compare", str(expected), problems, files, stats, details, corrected)


def _resharded(se: Scan, sa: Scan, exp_names: Sequence[str], pairs: Sequence[tuple[str, str]],
               produced: set[str]) -> bool:
    """Whether two folders are best compared tensor by tensor by name: both are consistent
    safetensors checkpoints and their files do not pair up (or pair up holding other tensors)."""
    act_names = [a for a in sa.shards if a in sa.present]
    if not exp_names or not act_names:
        return False
    if any(file_format(n) != "safetensors" for n in [*exp_names, *act_names]):
        return False
    unpaired = len(pairs) != len(exp_names) or set(act_names) != produced
    ei, ai = read_files(se.root, exp_names), read_files(sa.root, act_names)
    if not all(f.ok for f in [*ei, *ai]) or structure_problems(sa, ai) or structure_problems(se, ei):
        return False  # a broken side: file by file says more (missing, extra, unreadable)
    if unpaired:
        return True
    exp_files = {e: a for e, a in pairs}
    exp_place = {t.name: exp_files[f.name] for f in ei for t in f.tensors}
    act_place = {t.name: f.name for f in ai for t in f.tensors}
    return exp_place.keys() == act_place.keys() and exp_place != act_place


def _compare_by_tensor_name(
    se: Scan, sa: Scan, expected: str | os.PathLike[str], actual: str | os.PathLike[str], strict_layout: bool,
    progress: bool, t0: float, ignore: Collection[str] = (),
) -> Report:
    """Same tensors in other shards: pair tensors by name; report real differences tensor by tensor."""
    ei = read_files(se.root, [n for n in se.shards if n in se.present and n not in ignore])
    ai = read_files(sa.root, [n for n in sa.shards if n in sa.present])
    et = {t.name: (f, t) for f in ei for t in f.tensors}
    at = {t.name: (f, t) for f in ai for t in f.tensors}
    problems: list[Problem] = []
    for name in sorted(et.keys() - at.keys()):
        problems.append(Problem("missing-tensor", f"tensor {name} ({et[name][0].name}) is missing", None, name))
    for name in sorted(at.keys() - et.keys()):
        f = at[name][0].name
        problems.append(Problem("extra-tensor", f"{f}: unexpected tensor {name}", f, name))
    maps: dict[tuple[str, str], np.ndarray] = {}

    def data(root: Path, f: FileInfo, t: TensorInfo) -> np.ndarray:
        key = (str(root), f.name)
        if key not in maps:
            maps[key] = mapped_bytes(root / f.name)
        assert f.header is not None and t.offsets is not None
        base = f.header.data_start
        return maps[key][base + t.offsets[0] : base + t.offsets[1]]

    common = [n for n in et if n in at]
    total = sum(et[n][1].nbytes for n in common)
    with Progress(total, "compare", enabled=progress) as bar:
        for name in common:
            (fe, te), (fa, ta) = et[name], at[name]
            bar.set_label(f"compare {fa.name}")
            if te.dtype != ta.dtype or te.shape != ta.shape:
                kind, was, now = ("dtype", te.dtype, ta.dtype) if te.dtype != ta.dtype else (
                    "shape", te.shape, ta.shape)
                problems.append(Problem(kind, f"{fa.name}: {name}: {kind} {was} became {now}", fa.name, name))
                bar.update(te.nbytes)
                continue
            r = first_difference(data(se.root, fe, te), data(sa.root, fa, ta), bar)
            if r is not None:
                assert fa.header is not None and ta.offsets is not None
                start = fa.header.data_start + ta.offsets[0]
                problems.append(Problem(
                    "data", f"{fa.name}: {name}: bytes {r[0]}..{r[1]} of the tensor differ "
                    f"(was in {fe.name}) ({te.dtype} {te.shape})",
                    fa.name, name, (start + r[0], start + r[1]), r,
                ))
    metas = {json.dumps(f.metadata, sort_keys=True) for f in ei}, {json.dumps(f.metadata, sort_keys=True) for f in ai}
    if metas[0] != metas[1]:
        problems.append(Problem("metadata", f"__metadata__ {sorted(metas[0])} became {sorted(metas[1])}"))
    index, index_problems = _compare_index_content(se, sa)
    problems.extend(index_problems)
    moved = sum(fe.name != at[n][0].name for n, (fe, _) in et.items() if n in at)
    layout = (f"the same tensors in other shards: {len(ei)} file(s) became {len(ai)}, "
              f"{moved} of {len(common)} tensors in a file of another name")
    if strict_layout:
        problems.append(Problem("layout", f"different layout (--strict-layout): {layout}"))
    sides, side_problems = compare_side_files(se.root, sa.root)
    problems.extend(side_problems)
    bad = {p.file for p in problems if p.file}
    files = [
        {"name": None, "expected": f.name, "status": "resharded", "size": None, "expected_size": f.size,
         "tensors": len(f.tensors), "first_difference": None} for f in ei if f.name not in {g.name for g in ai}
    ] + [
        {"name": f.name, "expected": None, "status": "different" if f.name in bad else "resharded", "size": f.size,
         "expected_size": None, "tensors": len(f.tensors), "first_difference": None} for f in ai
    ]
    stats = {
        "files": len(files),
        "identical": 0,
        "different": sum(f["status"] == "different" for f in files),
        "bytes": total,
        "seconds": round(time.perf_counter() - t0, 6),
    }
    details = {"other": str(actual), "index": index, "layout": "different", "layout_note": layout,
               "side_files": sides}
    return Report("compare", str(expected), problems, files, stats, details)


def _compare_index_content(exp: Scan, act: Scan) -> tuple[dict[str, Any] | None, list[Problem]]:
    """The index across re-sharding: the same entries and metadata apart from sizes and file names."""
    ei, ai = exp.index, act.index
    if ei is None or ai is None:  # e.g. re-sharded into one file: an index is a matter of layout
        if ei is None and ai is None:
            return None, []
        status = "extra" if ei is None else "missing"
        return {"name": ai.name if ai else None, "expected": ei.name if ei else None, "status": status,
                "first_difference": None}, []
    entry: dict[str, Any] = {"name": ai.name, "expected": ei.name, "status": "resharded", "first_difference": None}
    problems = []
    for k in sorted(ei.weight_map.keys() - ai.weight_map.keys()):
        problems.append(Problem("index", f"{ai.name}: entry {k} is missing", ai.name, k))
    for k in sorted(ai.weight_map.keys() - ei.weight_map.keys()):
        problems.append(Problem("index", f"{ai.name}: unexpected entry {k}", ai.name, k))
    em, am = ei.metadata, ai.metadata
    for k in sorted(em.keys() | am.keys()):
        if em.get(k) != am.get(k):
            problems.append(Problem("index", f"{ai.name}: metadata.{k} is {am.get(k)!r}, was {em.get(k)!r}", ai.name))
    problems.extend(_top_level_differences(ei, ai))
    if problems:
        entry["status"] = "different"
    return entry, problems


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
    lines = [f"compare {r.path} (expected) with {r.details['other']} (produced)", *file_rows(r)]
    for f in r.details.get("side_files") or []:
        if f["status"] != "identical":
            lines.append(f"  {f['name']}  {f['status']}" + "".join(f"\n    {c}" for c in f["changes"]))
    if r.details.get("layout_note"):
        lines.append(f"  layout: {r.details['layout_note']} (tensors paired by name)")
    return lines


def _verdict_compare(r: Report) -> str:
    if r.ok and r.details.get("layout") == "different":
        return "OK: same tensors, different layout"
    return "OK" if r.ok else "FAILED"


register_renderer("compare", _render_compare, _verdict_compare)
