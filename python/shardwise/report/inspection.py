"""``shardwise inspect``: what a checkpoint's headers say (no tensor data is read), and its rendering."""

from __future__ import annotations

import json
import os
import time

from ..format.scan import FileInfo, file_format, read_files, scan, structure_problems
from .base import Report, file_entry, fmt_dtypes, index_entry, n_of, problems_from, register_renderer, totals
from .progress import human_bytes

__all__ = ["inspect_checkpoint"]


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
    problems = problems_from(structure_problems(s, [*infos, *missing]))
    index = None if s.index is None else index_entry(
        s, metadata=s.index.metadata if s.index.error is None else None, consistent=not problems)
    listing = None
    if tensors:
        listing = [
            {"name": t.name, "dtype": t.dtype, "shape": t.shape,
             "offsets": list(t.offsets) if t.offsets else None, "file": f.name}
            for f in infos for t in f.tensors
        ]
    files = [file_entry(f) for f in [*infos, *missing]]
    order = {n: i for i, n in enumerate(s.shards)}
    files.sort(key=lambda e: order.get(e["name"], 0))
    return Report(
        "inspect",
        str(path),
        problems,
        files,
        totals(infos, time.perf_counter() - t0),
        {"index": index, "tensors": listing},
    )


def _render_inspect(r: Report) -> list[str]:
    st = r.stats
    counts = f"{n_of(st['shards'], 'shard')}, {n_of(st['tensors'], 'tensor')}"
    lines = [f"{r.path}: {counts}, {human_bytes(st['bytes'])} of tensor data"]
    w = max([len(f["name"]) for f in r.files] + [5])
    lines.append(f"  {'file':<{w}}  {'tensors':>7}  {'bytes':>10}  dtypes")
    for f in r.files:
        if f["error"]:
            lines.append(f"  {f['name']:<{w}}  {'-':>7}  {'-':>10}  {f['error']}")
            continue
        size = human_bytes(f["data_bytes"])
        lines.append(f"  {f['name']:<{w}}  {f['tensors']:>7}  {size:>10}  {fmt_dtypes(f['dtypes'])}")
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


register_renderer("inspect", _render_inspect)
