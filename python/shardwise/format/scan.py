"""Finding a checkpoint's weight files and index, and reading what their headers say (no tensor data).

Used by the ``shardwise`` command and the report functions (``report_*.py``, ``tunedir.py``).
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import _core
from ..constants import SAFETENSOR_INDEX_FNAME, TORCH_INDEX_FNAME
from ..errors import CheckpointError, CheckpointIOError
from ..store.local import safe_join
from ..store.location import locate

__all__ = [
    "FileInfo", "Index", "IndexTruth", "Scan", "TensorInfo", "index_truth", "not_a_folder", "read_files", "scan",
    "side_files", "structure_problems",
]

TORCH_SUFFIXES = (".bin", ".pt", ".pth")
#: files next to the weights that are not model shards
_NOT_SHARDS = ("training_args.bin", "optimizer.pt", "scheduler.pt", "recipe_state.pt")
_NOT_SHARD_PREFIXES = ("adapter_model", "rng_state", "shardwise-")


def is_weight_file(name: str) -> bool:
    """A model shard name (``*.safetensors``/``*.bin``/``*.pt``/``*.pth``), not an adapter or a trainer file."""
    if name.startswith(".") or name in _NOT_SHARDS or name.startswith(_NOT_SHARD_PREFIXES):
        return False
    return name.endswith(".safetensors") or name.endswith(TORCH_SUFFIXES)


#: the files next to the weights that integrity checks pin and ``compare`` compares: model config,
#: generation config, tokenizer and processor files
SIDE_FILE_NAMES = frozenset({
    "config.json", "generation_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "vocab.txt", "merges.txt", "spiece.model", "sentencepiece.bpe.model", "chat_template.json",
    "chat_template.jinja", "preprocessor_config.json", "processor_config.json",
})


def side_files(folder: Path) -> list[str]:
    """The side files present in ``folder`` (``SIDE_FILE_NAMES`` and ``tokenizer*``), sorted."""
    try:
        names = _listdir(folder)
    except OSError:
        return []
    wanted = [n for n in names if n in SIDE_FILE_NAMES or (n.startswith("tokenizer") and not n.endswith(".tmp"))]
    return sorted(n for n in wanted if (folder / n).is_file())


def _listdir(folder: Path) -> list[str]:
    """The names in ``folder`` (a location's listing: read once for a remote folder)."""
    return locate(folder).listdir()


def file_format(name: str) -> str:
    return "safetensors" if name.endswith(".safetensors") else "torch"


@dataclass
class Index:
    """An index file: raw bytes, parsed content, or the reason it could not be parsed."""

    name: str
    raw: bytes
    data: dict[str, Any] | None
    error: str | None = None

    @property
    def weight_map(self) -> dict[str, str]:
        wm = (self.data or {}).get("weight_map")
        return {str(k): str(v) for k, v in wm.items()} if isinstance(wm, dict) else {}

    @property
    def metadata(self) -> dict[str, Any]:
        md = (self.data or {}).get("metadata")
        return md if isinstance(md, dict) else {}


def parse_index(raw: bytes, name: str = "index") -> tuple[dict[str, Any] | None, str | None]:
    """``(data, None)`` for a well-formed HF index whose shard names stay in its folder (validated by
    the native core), else ``(None, problem)``. ``data`` is the whole JSON object, so that metadata
    and extra keys survive a rewrite."""
    try:
        _core.parse_index(raw, name)
    except CheckpointError as e:
        return None, str(e).removeprefix(f"{name}: ")
    return json.loads(raw), None


def _read_index(path: Path) -> Index:
    raw = path.read_bytes()
    data, problem = parse_index(raw, path.name)
    return Index(path.name, raw, data, problem)


@dataclass
class Scan:
    """What a path holds: the folder, its index (if any) and its shard names in numeric order."""

    root: Path
    single_file: bool
    index: Index | None
    shards: list[str]  # listed by the index or present, in numeric order
    listed: set[str] = field(default_factory=set)  # named by the index
    present: set[str] = field(default_factory=set)  # weight files that exist (of the index's format)

    def path(self, name: str) -> Path:
        return safe_join(self.root, name, "shard")

    @property
    def follows_index(self) -> bool:
        """A well-formed index that names shards: a load reads those, as transformers does."""
        return self.index is not None and self.index.error is None and bool(self.listed)

    @property
    def loadable(self) -> list[str]:
        """The shards a load reads: the index's (numeric order), else every weight file."""
        return [n for n in self.shards if n in self.listed] if self.follows_index else list(self.shards)

    @property
    def strays(self) -> list[str]:
        """Weight files the index does not list (e.g. an older save's shard that repeats some tensors)."""
        return [n for n in self.shards if n not in self.listed] if self.follows_index else []


def not_a_folder(p: Path) -> CheckpointIOError:
    """The error for a checkpoint folder argument that is missing or is a file."""
    if not p.exists():
        return CheckpointIOError(2, "no such file or directory", str(p))
    return CheckpointIOError(20, "not a folder", str(p))


def scan(path: str | os.PathLike[str]) -> Scan:
    """A checkpoint folder (or one weight file): index and shards. ``CheckpointIOError`` when missing.
    Local or remote alike (``shardwise.store.locate``): a remote folder is listed once and its headers
    are read by ranged reads."""
    root = locate(path)
    if root.is_dir():
        try:
            return scan_folder(root)
        except CheckpointError:
            if root.save_in_progress():  # no shard yet: an incomplete checkpoint for verify, not bad input
                return Scan(root, False, None, [])
            raise
    f = root.parent / root.name  # looked up in its folder's listing
    if not f.exists():
        raise CheckpointIOError(2, "no such file or directory", str(root))
    if f.is_file():
        if f.name.endswith(".index.json"):
            return scan_folder(f.parent, index_name=f.name)
        if not (f.name.endswith(".safetensors") or f.name.endswith(TORCH_SUFFIXES)):
            raise CheckpointError(f"{f}: not a checkpoint file (expected .safetensors, .bin, .pt or .pth)")
        return Scan(f.parent, True, None, [f.name], set(), {f.name})
    raise CheckpointError(f"{f}: neither a file nor a folder")


def scan_folder(folder: Path, index_name: str | None = None) -> Scan:
    """The index and weight files of one folder (local or remote)."""
    folder = locate(folder)
    try:
        names = _listdir(folder)
    except OSError as e:
        raise CheckpointIOError(e.errno or 5, e.strerror or str(e), str(folder)) from e
    if index_name is None:
        for candidate in (SAFETENSOR_INDEX_FNAME, TORCH_INDEX_FNAME, *sorted(names)):
            if candidate.endswith(".index.json") and (folder / candidate).is_file():
                index_name = candidate
                break
    index = _read_index(folder / index_name) if index_name else None
    weights = [n for n in names if is_weight_file(n) and (folder / n).is_file()]
    if index is not None:
        fmt = "torch" if ".bin." in index.name or ".pt." in index.name else "safetensors"
    else:
        fmt = "safetensors" if any(file_format(n) == "safetensors" for n in weights) else "torch"
    present = {n for n in weights if file_format(n) == fmt}
    listed = set(index.weight_map.values()) if index is not None else set()
    shards = _core.sort_shard_names(sorted(present | listed))
    if index is None and not shards:
        raise CheckpointError(f"{folder}: no checkpoint files (*.safetensors, *.bin, *.pt, *.pth) and no index")
    return Scan(folder, False, index, list(shards), listed, present)


@dataclass
class TensorInfo:
    name: str
    dtype: str  # safetensors dtype name (torch dtypes without one: their torch name)
    shape: list[int]
    offsets: tuple[int, int] | None  # (begin, end) relative to the data area; None for torch files
    nbytes: int


@dataclass
class FileInfo:
    """One weight file as its header (or pickle) describes it; ``error`` when it cannot be read."""

    name: str
    format: str
    size: int | None = None
    header: _core.SafetensorsHeader | None = None
    tensors: list[TensorInfo] = field(default_factory=list)
    error: str | None = None
    #: torch files: tensor bytes with each storage once (tied weights share one in the pickle)
    stored_bytes: int | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def metadata(self) -> dict[str, str] | None:
        return None if self.header is None else self.header.metadata

    @property
    def data_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def dtypes(self) -> dict[str, int]:
        return dict(sorted(Counter(t.dtype for t in self.tensors).items()))

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "format": self.format,
            "size": self.size,
            "tensors": len(self.tensors),
            "data_bytes": self.data_bytes,
            "dtypes": self.dtypes,
            "metadata": self.metadata,
            "error": self.error,
        }


def _from_header(name: str, h: _core.SafetensorsHeader) -> FileInfo:
    tensors = [
        TensorInfo(n, dt, list(shape), (int(b), int(e)), int(e) - int(b))
        for n, dt, shape, (b, e) in zip(h.names, h.dtypes, h.shapes, h.offsets)
    ]
    return FileInfo(name, "safetensors", h.file_size, h, tensors)


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and not isinstance(e, CheckpointError) and e.strerror:
        return f"{e.filename}: {e.strerror}" if e.filename else str(e.strerror)
    return " ".join(str(e).split())


def read_files(root: Path, names: Sequence[str], *, strict: bool = False, threads: int = 0) -> list[FileInfo]:
    """Headers of every named file (safetensors in parallel, by the native core); torch files are opened
    with ``torch.load(mmap=True, weights_only=True)``. With ``strict`` the first error is raised;
    otherwise it is recorded in ``FileInfo.error``. Missing files get ``error="missing"``."""
    root = locate(root)
    read_many, read_one, torch_file = root.header_readers(threads)  # native reads, or ranged GETs
    out: dict[str, FileInfo] = {}
    st: list[tuple[str, Path]] = []
    for name in names:
        try:
            p = safe_join(root, name, "shard")
        except CheckpointError as e:
            if strict:
                raise
            out[name] = FileInfo(name, file_format(name), error=_one_line(e))
            continue
        if not p.is_file():
            if strict:
                raise CheckpointIOError(2, "no such file", str(p))
            out[name] = FileInfo(name, file_format(name), error="missing")
        elif file_format(name) == "safetensors":
            st.append((name, p))
        else:
            out[name] = _torch_info(name, torch_file(p), strict)
    if st:
        try:
            headers = read_many([p for _, p in st])
            out.update({n: _from_header(n, h) for (n, _), h in zip(st, headers)})
        except (CheckpointError, OSError):
            if strict:
                raise
            for n, p in st:  # find every bad file, not only the first
                try:
                    out[n] = _from_header(n, read_one(p))
                except (CheckpointError, OSError) as e:
                    out[n] = FileInfo(n, "safetensors", _size(p), error=_one_line(e))
    return [out[n] for n in names]


def _size(p: Path) -> int | None:
    try:
        return p.stat().st_size
    except OSError:
        return None


def _torch_info(name: str, p: Path, strict: bool) -> FileInfo:
    from .shards import DTYPE_TO_ST, SourceFile, load_source_tensors  # torch: only for .bin/.pt files

    try:
        sd = load_source_tensors(SourceFile(p))
    except (CheckpointError, OSError) as e:
        if strict:
            raise
        return FileInfo(name, "torch", _size(p), error=_one_line(e))
    tensors = [
        TensorInfo(k, DTYPE_TO_ST.get(t.dtype, str(t.dtype)), list(t.shape), None, t.numel() * t.element_size())
        for k, t in sd.items()
    ]
    storages = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in sd.values()}
    return FileInfo(name, "torch", _size(p), None, tensors, stored_bytes=sum(storages.values()))


@dataclass
class IndexTruth:
    """What an index over these shards should say: where each tensor is, the ``total_size`` values
    that are right (the tensor bytes; for torch files also with each shared storage counted once, as
    transformers and huggingface_hub count tied weights) and ``total_parameters``."""

    where: dict[str, str]
    total_sizes: set[int]
    total_parameters: int


def index_truth(s: Scan, files: Iterable[FileInfo]) -> IndexTruth | None:
    """The truth about the listed (or, without an index, all) shards; None if one is unreadable."""
    infos = [f for f in files if f.name in s.listed or not s.follows_index]
    if not all(f.ok for f in infos):
        return None
    where: dict[str, str] = {}
    nbytes = stored = params = 0
    for f in infos:
        fresh = [t for t in f.tensors if t.name not in where]
        for t in fresh:
            where[t.name] = f.name
            nbytes += t.nbytes
            params += math.prod(t.shape)
        stored += f.stored_bytes if f.stored_bytes is not None else sum(t.nbytes for t in fresh)
    return IndexTruth(where, {nbytes, stored}, params)


def structure_problems(s: Scan, files: Iterable[FileInfo]) -> list[tuple[str, str, str | None, str | None]]:
    """Consistency of index and shards: ``(kind, message, file, tensor)`` for every problem found.

    Checks: the index parses; every file it names exists and is readable; every entry is in the shard
    it names; no tensor is in two shards; no tensor or shard is outside the index; ``total_size`` is
    the sum of the tensor bytes; several shards come with an index.
    """
    problems: list[tuple[str, str, str | None, str | None]] = []
    infos = {f.name: f for f in files}
    index = s.index
    if index is not None and index.error is not None:
        problems.append(("index", f"{index.name}: {index.error}", index.name, None))
    for f in infos.values():
        if f.error == "missing":
            by = f"named by {index.name}" if index is not None else "expected"
            problems.append(("missing-file", f"{f.name}: {by} but does not exist", f.name, None))
        elif f.error is not None:
            problems.append(("unreadable", f"{f.name}: {f.error}", f.name, None))
    where: dict[str, list[str]] = {}
    for f in infos.values():
        for t in f.tensors:
            where.setdefault(t.name, []).append(f.name)
    for key, found in where.items():
        if len(found) > 1:
            problems.append(("duplicate-tensor", f"{key}: in {len(found)} shards ({', '.join(found)})", found[1], key))
    if index is None:
        if not s.single_file and len(s.shards) > 1:
            problems.append(("index", f"{len(s.shards)} shards but no index file", None, None))
        return problems
    if index.error is not None:
        return problems
    wm = index.weight_map
    for key, fname in wm.items():
        f = infos.get(fname)
        if f is None or not f.ok:
            continue
        if key not in {t.name for t in f.tensors}:
            found = where.get(key)
            if found:
                msg = f"{key}: {index.name} says {fname}, but it is in {found[0]}"
                problems.append(("wrong-shard", msg, fname, key))
            else:
                msg = f"{key}: listed in {index.name} for {fname}, not in that shard"
                problems.append(("missing-tensor", msg, fname, key))
    for f in infos.values():
        if f.name not in s.listed:
            problems.append(("unlisted-file", f"{f.name}: a shard that {index.name} does not list", f.name, None))
            continue
        for t in f.tensors:
            if t.name not in wm:
                problems.append(("unlisted-tensor", f"{t.name}: in {f.name} but not in {index.name}", f.name, t.name))
    truth = index_truth(s, infos.values())
    if truth is not None:
        for field_name, right in (("total_size", truth.total_sizes), ("total_parameters", {truth.total_parameters})):
            declared = index.metadata.get(field_name)
            if declared is None:
                continue
            if not isinstance(declared, int) or isinstance(declared, bool) or declared not in right:
                what = "bytes of tensors" if field_name == "total_size" else "tensor elements"
                problems.append((
                    "total-size",
                    f"{index.name}: metadata.{field_name} is {declared!r}, the shards hold {min(right)} {what}",
                    index.name, None,
                ))
    return problems
