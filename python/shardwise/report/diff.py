"""Byte-level differences between two files: the first differing run of bytes, where it falls (header,
a tensor, past the end), then tensor by tensor; and between two folders' side files (JSON by key)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..format.scan import FileInfo, TensorInfo, file_format, read_files, side_files
from .base import CHUNK, Problem
from .progress import Progress

if TYPE_CHECKING:
    import numpy as np  # imported where used: inspect/verify/--version start without it

__all__ = ["compare_file", "compare_side_files", "first_difference", "json_changes", "mapped_bytes"]


def mapped_bytes(path: Path) -> np.ndarray:
    """The file's bytes as a read-only mapped array (empty array for an empty file)."""
    import numpy as np

    if path.stat().st_size == 0:
        return np.empty(0, dtype=np.uint8)
    return np.memmap(path, dtype=np.uint8, mode="r")



def first_difference(a: np.ndarray, b: np.ndarray, progress: Progress | None = None) -> tuple[int, int] | None:
    """``[begin, end)`` of the first run of differing bytes (a length difference counts), or None."""
    import numpy as np

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
    from ..format.shards import SourceFile, byte_view, load_source_tensors

    loaded = load_source_tensors(SourceFile(path))

    import numpy as np

    def torch_bytes(t: TensorInfo) -> np.ndarray:
        v = byte_view(loaded[t.name])
        return np.frombuffer(v, dtype=np.uint8) if isinstance(v, bytes) else np.asarray(v)

    return torch_bytes



def compare_file(
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
    ea, aa = mapped_bytes(ep), mapped_bytes(ap)
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



def json_changes(old: Any, new: Any, where: str = "") -> list[str]:
    """What differs between two JSON values, by key path: ``rms_norm_eps is 1e-06, was 1e-05``."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(old.keys() | new.keys(), key=str):
            path = f"{where}.{k}" if where else str(k)
            if k not in new:
                out.append(f"{path} is gone (was {json.dumps(old[k])})")
            elif k not in old:
                out.append(f"{path} is new ({json.dumps(new[k])})")
            else:
                out.extend(json_changes(old[k], new[k], path))
        return out
    if old == new and type(old) is type(new):
        return []
    return [f"{where or 'the document'} is {json.dumps(new)}, was {json.dumps(old)}"]



def compare_side_files(exp_root: Path, act_root: Path) -> tuple[list[dict[str, Any]], list[Problem]]:
    """Config, generation config and tokenizer files on both sides: missing, extra, identical or
    different (``.json`` files key by key, so a changed ``rms_norm_eps`` is named)."""
    exp, act = set(side_files(exp_root)), set(side_files(act_root))
    entries: list[dict[str, Any]] = []
    problems: list[Problem] = []
    for name in sorted(exp | act):
        entry: dict[str, Any] = {"name": name, "status": "identical", "changes": []}
        if name not in act:
            entry["status"] = "missing"
            problems.append(Problem("side-file", f"{name}: missing from the output", name))
        elif name not in exp:
            entry["status"] = "extra"
            problems.append(Problem("side-file", f"{name}: not in the original", name))
        else:
            a, b = (exp_root / name).read_bytes(), (act_root / name).read_bytes()
            if a != b:
                changes = ["the bytes differ"]
                if name.endswith(".json"):
                    try:
                        changes = json_changes(json.loads(a), json.loads(b))
                    except (json.JSONDecodeError, UnicodeDecodeError):
                        changes = ["the bytes differ (not valid JSON on one side)"]
                entry["status"] = "different" if changes else "equal-content"  # JSON formatting only
                entry["changes"] = changes
                problems.extend(Problem("side-file", f"{name}: {c}", name) for c in changes)
        entries.append(entry)
    return entries, problems
