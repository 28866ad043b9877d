"""The bridge to the native writer: which key goes to which output shard, at which offset.

A shard whose keys, dtypes and shapes equal what was loaded keeps its original header bytes and
offsets ("preserve the original layout"), so unchanged weights reproduce the file byte for byte,
whichever library wrote it. Any other shard gets the layout the ``safetensors`` library itself would
write ("fresh canonical layout"), keeping the original ``__metadata__``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import _core
from .._logging import get_logger
from ..constants import SAFETENSOR_INDEX_FNAME, TORCH_INDEX_FNAME
from ..convert.base import Op
from ..errors import ConversionError
from .scan import parse_index
from .shards import DTYPE_TO_ST, SourceFile, StorageSlot, byte_view
from .torchfile import default_archive_name, save_torch_file

__all__ = [
    "OutputShard",
    "SavePlan",
    "index_bytes",
    "op_nbytes",
    "output_name",
    "plan_shards",
    "shard_bytes",
    "shard_header",
    "torch_shard_tensors",
    "write_safetensors_shards",
    "write_torch_shards",
    "write_tensors",
]

logger = get_logger()

DEFAULT_METADATA = {"format": "pt"}
_HF_SHARD = re.compile(r"^(?P<stem>.+)-(?P<idx>\d+)-of-(?P<n>\d+)$")


def _split_ext(name: str) -> tuple[str, str]:
    stem, dot, ext = name.rpartition(".")
    return (stem, ext) if dot else (name, "")


def output_name(src_name: str, safe: bool) -> str:
    """The output file name of an input shard: the same name when the format is kept; on a format
    change the extension follows (and HF's ``pytorch_model`` ⇄ ``model`` stem prefix)."""
    stem, ext = _split_ext(src_name)
    if safe:
        if ext == "safetensors":
            return src_name
        if stem.startswith("pytorch_model"):
            stem = "model" + stem[len("pytorch_model") :]
        return f"{stem}.safetensors"
    if ext in ("bin", "pt", "pth"):  # torch formats: the format is kept
        return src_name
    if ext == "safetensors" and stem.startswith("model"):
        stem = "pytorch_model" + stem[len("model") :]
    return f"{stem}.bin"


@dataclass
class OutputShard:
    """One file to write: its name, its ops in the order they come, and its source (if any)."""

    name: str
    ops: list[Op] = field(default_factory=list)
    source: SourceFile | None = None

    @property
    def nbytes(self) -> int:
        return sum(op_nbytes(op) for op in self.ops)


def op_numel(op: Op) -> int:
    """Elements of the tensor ``op`` will produce (from its announced shape; nothing is run)."""
    return math.prod(op.shape)


def op_nbytes(op: Op) -> int:
    """Bytes of the tensor ``op`` will produce."""
    return op_numel(op) * op.dtype.itemsize


@dataclass
class SavePlan:
    shards: list[OutputShard]
    write_index: bool

    @property
    def weight_map(self) -> dict[str, str]:
        return {op.key: s.name for s in self.shards for op in s.ops}

    @property
    def total_size(self) -> int:
        return sum(s.nbytes for s in self.shards)


def _split_new(ops: list[Op], max_shard_size: int | None) -> list[list[Op]]:
    """Greedy split of new keys into shards under ``max_shard_size`` (one oversized tensor alone)."""
    if not ops:
        return []
    if not max_shard_size:
        return [ops]
    groups: list[list[Op]] = [[]]
    size = 0
    for op in ops:
        n = op_nbytes(op)
        if groups[-1] and size + n > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(op)
        size += n
    return groups


def plan_shards(
    ops: Sequence[Op],
    sources: Sequence[SourceFile],
    key_source: dict[str, SourceFile],
    *,
    safe: bool,
    had_index: bool,
    max_shard_size: int | None = None,
) -> SavePlan:
    """Partition ``ops`` by the shard their key was loaded from; keys that were never loaded go into
    new shard(s), and the shard names are renumbered consistently when HF ``-NNNNN-of-NNNNN`` naming
    (or a single file) makes that possible."""
    seen: set[str] = set()
    by_source: dict[int, OutputShard] = {}
    for src in sources:
        by_source[id(src)] = OutputShard(output_name(src.name, safe), source=src)
    new_ops: list[Op] = []
    for op in ops:
        if op.key in seen:
            raise ConversionError(f'the converted state dict produces key "{op.key}" twice')
        seen.add(op.key)
        src = key_source.get(op.key)
        if src is None:
            new_ops.append(op)
        else:
            by_source[id(src)].ops.append(op)
    kept = [by_source[id(s)] for s in sources if by_source[id(s)].ops]
    groups = _split_new(new_ops, max_shard_size)
    if groups:
        ext = "safetensors" if safe else "bin"
        total = len(kept) + len(groups)
        parsed = [_HF_SHARD.match(_split_ext(s.name)[0]) for s in kept]
        if kept and all(parsed):
            stem = parsed[0].group("stem")  # type: ignore[union-attr]
            width = max(len(m.group("idx")) for m in parsed if m)
            for i, s in enumerate(kept, 1):
                s.name = f"{stem}-{i:0{width}d}-of-{total:0{width}d}.{ext}"
            new_names = [f"{stem}-{i:0{width}d}-of-{total:0{width}d}.{ext}" for i in range(len(kept) + 1, total + 1)]
        elif len(kept) <= 1:
            stem = _split_ext(kept[0].name)[0] if kept else ("model" if safe else "pytorch_model")
            for s in kept:
                s.name = f"{stem}-{1:05d}-of-{total:05d}.{ext}"
            new_names = [f"{stem}-{i:05d}-of-{total:05d}.{ext}" for i in range(len(kept) + 1, total + 1)]
        else:
            base = "model" if safe else "pytorch_model"
            new_names = [f"{base}-extra-{i:05d}-of-{len(groups):05d}.{ext}" for i in range(1, len(groups) + 1)]
        kept.extend(OutputShard(n, g) for n, g in zip(new_names, groups))
    names = [s.name for s in kept]
    if len(set(names)) != len(names):
        raise ConversionError(f"two input shards map to the same output file name: {sorted(names)}")
    return SavePlan(kept, write_index=had_index or len(kept) > 1)


def shard_header(shard: OutputShard) -> tuple[bytes, list[tuple[int, int]]]:
    """Header bytes and per-op (begin, end) offsets: the original ones when the shard's keys, dtypes and
    shapes are unchanged, otherwise the layout the safetensors library writes."""
    src = shard.source
    if src is not None and src.header is not None:
        h = src.header
        if len(h.names) == len(shard.ops):
            pos = {n: i for i, n in enumerate(h.names)}
            offsets = []
            for op in shard.ops:
                i = pos.get(op.key)
                if i is None or DTYPE_TO_ST.get(op.dtype) != h.dtypes[i] or list(op.shape) != list(h.shapes[i]):
                    break
                offsets.append(tuple(h.offsets[i]))
            else:
                return bytes(h.raw), offsets  # type: ignore[return-value]
    metadata = DEFAULT_METADATA
    if src is not None and src.header is not None and src.header.metadata is not None:
        metadata = src.header.metadata
    return fresh_header([(op.key, op.dtype, op.shape) for op in shard.ops], metadata)


def fresh_header(
    tensors: Sequence[tuple[str, torch.dtype, Sequence[int]]], metadata: Mapping[str, str] | None
) -> tuple[bytes, list[tuple[int, int]]]:
    """The header and offsets the safetensors library writes for these (name, dtype, shape)."""
    dtypes = []
    for key, dtype, _ in tensors:
        st = DTYPE_TO_ST.get(dtype)
        if st is None:
            raise ConversionError(f'"{key}": dtype {dtype} cannot be stored in safetensors')
        dtypes.append(st)
    return _core.fresh_layout([k for k, _, _ in tensors], dtypes, [list(s) for _, _, s in tensors], metadata)


def made(op: Op) -> torch.Tensor:
    """Run ``op`` and check that it produced the dtype and shape it announced (the header's)."""
    t = op.make()
    if t.is_meta:
        raise ConversionError(f'"{op.key}": a meta tensor has no data to save')
    if t.dtype != op.dtype or tuple(t.shape) != op.shape:
        raise ConversionError(
            f'"{op.key}": conversion produced {t.dtype} {tuple(t.shape)}, expected {op.dtype} {op.shape}'
        )
    return t


#: shards written at once: the kernel serializes buffered writes to one file, so parallelism comes
#: from writing several files; a constant (not one per CPU) keeps peak memory O(1) in model size,
#: since a group's transformed tensors and host copies (GPU, non-contiguous) are alive together
CONCURRENT_FILES = 2


def write_safetensors_shards(plan: SavePlan, folder: Path, concurrent_files: int = CONCURRENT_FILES) -> None:
    """Write every shard of ``plan`` into ``folder`` (no index, no fsync), ``concurrent_files`` shards at
    a time in one native call with the GIL released; only that group's transformed tensors (e.g.
    re-permuted q/k, host copies of GPU tensors) are alive at once."""
    for files in shard_bytes(plan, concurrent_files):
        _core.write_files([(str(folder / name), header, pieces) for name, header, pieces in files], False)
        del files


def shard_bytes(
    plan: SavePlan, concurrent_files: int = CONCURRENT_FILES
) -> Iterator[list[tuple[str, bytes, list[tuple[int, object]]]]]:
    """The shards of ``plan`` in groups of ``concurrent_files``: per shard its name, header bytes and
    ``(data offset, byte view)`` pieces. Ops run group by group, so only one group's transformed
    tensors are alive at once (the byte views keep their tensors alive). Local and remote writers
    both take their bytes from here."""
    group = max(1, concurrent_files)
    shards = plan.shards
    for start in range(0, len(shards), group):
        files = []
        for shard in shards[start : start + group]:
            header, offsets = shard_header(shard)
            pieces = [(begin, byte_view(made(op))) for (begin, _), op in zip(offsets, shard.ops)]
            files.append((shard.name, header, pieces))
        yield files
        del files


def write_tensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> None:
    """One safetensors file with the safetensors library's layout, written by the native core."""
    header, offsets = fresh_header([(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()], metadata)
    pieces = [(begin, byte_view(t)) for (begin, _), t in zip(offsets, tensors.values())]
    _core.write_file(str(path), header, pieces, False)


def _flat_bytes(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu().contiguous()
    return t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)


def _shared_views(
    storage: torch.UntypedStorage, items: Sequence[tuple[str, StorageSlot, torch.Tensor]]
) -> dict[str, torch.Tensor] | None:
    """The tensors as views of one new storage laid out like ``storage`` (bytes no tensor covers are
    copied from it), or None when the values no longer allow sharing (tied weights that diverged)."""
    buf = torch.empty(storage.nbytes(), dtype=torch.uint8)
    buf.untyped_storage().copy_(storage)
    views: dict[str, torch.Tensor] = {}
    try:
        for key, slot, t in items:
            if slot.same_as in views:  # one tensor under two keys in the source pickle: again one object
                v = views[slot.same_as]
                if v.dtype != t.dtype or v.shape != t.shape:
                    return None
            else:
                v = torch.empty(0, dtype=t.dtype).set_(buf.untyped_storage(), slot.offset, t.shape, slot.stride)
            v.copy_(t.detach())
            views[key] = v
    except RuntimeError:  # e.g. a self-overlapping (expanded) view cannot be written into
        return None
    if all(torch.equal(_flat_bytes(views[k]), _flat_bytes(t)) for k, _, t in items):
        return views
    return None


def torch_shard_tensors(shard: OutputShard) -> dict[str, torch.Tensor]:
    """The tensors of a ``.bin``/``.pt`` shard, ready for ``torch.save``: in the source file's key order
    (new keys last), and, where the source pickled several tensors into one storage (tied weights, views
    of a larger storage), again views of one storage with the same offsets and strides, as long as
    their current values agree; otherwise each tensor alone. Unchanged weights so pickle identically."""
    tensors = {op.key: made(op) for op in shard.ops}
    src = shard.source
    if src is None or not src.storage:
        return {k: torch_ready(t) for k, t in tensors.items()}
    order = {k: i for i, k in enumerate(src.keys)}
    keys = sorted(tensors, key=lambda k: order.get(k, len(order)))
    users: dict[int, int] = {}
    for slot in src.storage.values():
        users[slot.index] = users.get(slot.index, 0) + 1
    groups: dict[int, list[tuple[str, StorageSlot, torch.Tensor]]] = {}
    for k in keys:
        slot, t = src.storage.get(k), tensors[k]
        if slot is None or src.dtypes.get(k) != t.dtype or src.shapes.get(k) != tuple(t.shape):
            continue
        storage = src.storages[slot.index]
        alone = (
            users[slot.index] == 1 and slot.offset == 0 and storage.nbytes() == t.nbytes
            and (t.numel() <= 1 or slot.stride == torch.empty(t.shape).stride())
        )
        if not alone:
            groups.setdefault(slot.index, []).append((k, slot, t))
    rebuilt: dict[str, torch.Tensor] = {}
    for index, items in groups.items():
        views = _shared_views(src.storages[index], items)
        if views is None:
            logger.debug("%s: %s no longer share values; saved separately", shard.name, [k for k, _, _ in items])
        else:
            rebuilt.update(views)
    return {k: rebuilt[k] if k in rebuilt else torch_ready(tensors[k]) for k in keys}


def stored_bytes(tensors: Mapping[str, torch.Tensor]) -> int:
    """Bytes of tensor data a torch file holds: each storage once (tied weights share one)."""
    sizes = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in tensors.values()}
    return sum(sizes.values())


def write_torch_shards(plan: SavePlan, folder: Path) -> int:
    """Write every shard of ``plan`` into ``folder`` with ``torch.save`` (records named as in the source
    file, else after the output file); one shard's tensors in memory at a time. Returns the bytes of
    tensor data written (each storage once), the index's ``total_size``."""
    total = 0
    for shard in plan.shards:
        tensors = torch_shard_tensors(shard)
        total += stored_bytes(tensors)
        src = shard.source
        # records named after the file follow a renamed shard; any other prefix (archive/) is kept
        archive = src.archive if src is not None and src.archive != default_archive_name(src.path) else None
        save_torch_file(tensors, folder / shard.name, archive)
        del tensors
    return total


def index_name(safe: bool) -> str:
    return SAFETENSOR_INDEX_FNAME if safe else TORCH_INDEX_FNAME


def index_bytes(
    plan: SavePlan, original: tuple[bytes, dict[str, Any]] | None, n_params: int, total_size: int | None = None
) -> bytes:
    """The index file: the original bytes when its content is unchanged; otherwise HF's format
    (``indent=2, sort_keys=True`` and a newline) with everything else the original had kept (unknown
    top-level keys, unknown metadata fields) and the derived fields updated (``total_size``: the tensor
    bytes written, by default the plan's; ``total_parameters`` when it had one)."""
    weight_map = plan.weight_map
    content: dict[str, Any] = {}
    meta: dict[str, Any] = {}
    if original is not None:
        content.update({k: v for k, v in original[1].items() if k not in ("metadata", "weight_map")})
        orig_meta = original[1].get("metadata")
        if isinstance(orig_meta, dict):
            meta.update(orig_meta)
    meta["total_size"] = plan.total_size if total_size is None else total_size
    if "total_parameters" in meta:
        meta["total_parameters"] = n_params
    content.update(metadata=meta, weight_map=weight_map)
    if original is not None and original[1] == content:
        return original[0]
    return (json.dumps(content, indent=2, sort_keys=True) + "\n").encode()


def count_params(ops: Iterable[Op]) -> int:
    """Total elements of all ops (the index's ``total_parameters``)."""
    return sum(op_numel(op) for op in ops)


def torch_ready(t: torch.Tensor) -> torch.Tensor:
    """A tensor safe to ``torch.save`` alone: views of a larger storage (e.g. a mapped file) are cloned."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.storage_offset() != 0 or t.untyped_storage().nbytes() != t.nbytes or not t.is_contiguous():
        t = t.clone(memory_format=torch.contiguous_format)
    return t


def read_index(folder: Path, name: str) -> tuple[Path, bytes, dict[str, Any]] | None:
    """The index ``folder/name`` if it exists and is well formed. Loading never needs it (the files come
    from ``checkpoint_files``), so a malformed one is reported and then ignored."""
    p = folder / name
    if not p.is_file():
        return None
    raw = p.read_bytes()
    data, problem = parse_index(raw, str(p))
    if data is None:
        logger.warning("%s: ignoring the index: %s", p, problem)
        return None
    return p, raw, data
