"""Reading shard files: safetensors as zero-copy views of a private file mapping, ``.bin``/``.pt`` with
``torch.load(weights_only=True, mmap=True)``. Every failure names the file."""

from __future__ import annotations

import errno
import os
import pickle
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import _core
from ..errors import CheckpointError, CheckpointIOError, ConversionError, HeaderError

__all__ = [
    "DTYPE_FROM_ST",
    "DTYPE_TO_ST",
    "SourceFile",
    "StorageSlot",
    "byte_view",
    "check_sources_intact",
    "is_safetensors",
    "load_merged",
    "load_source_tensors",
    "with_file",
    "read_sources",
]

_PAIRS = [
    ("BOOL", torch.bool),
    ("U8", torch.uint8),
    ("I8", torch.int8),
    ("I16", torch.int16),
    ("I32", torch.int32),
    ("I64", torch.int64),
    ("F16", torch.float16),
    ("BF16", torch.bfloat16),
    ("F32", torch.float32),
    ("F64", torch.float64),
    ("C64", torch.complex64),
]
for _name, _attr in [
    ("U16", "uint16"),
    ("U32", "uint32"),
    ("U64", "uint64"),
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"),
    ("F8_E8M0", "float8_e8m0fnu"),
]:
    if hasattr(torch, _attr):
        _PAIRS.append((_name, getattr(torch, _attr)))

DTYPE_FROM_ST: dict[str, torch.dtype] = dict(_PAIRS)
DTYPE_TO_ST: dict[torch.dtype, str] = {v: k for k, v in _PAIRS}


def is_safetensors(path: str | os.PathLike[str]) -> bool:
    """The format is chosen by extension, as torchtune does (no content sniffing)."""
    return str(path).endswith(".safetensors")


@dataclass
class SourceFile:
    """One input shard as loaded: its path, its header (safetensors only) and its tensor metadata."""

    path: Path
    header: _core.SafetensorsHeader | None = None
    keys: list[str] = field(default_factory=list)  # in file order
    dtypes: dict[str, torch.dtype] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    #: torch files only: the zip record prefix (``pytorch_model/``: torch names records after the file
    #: it writes, ``archive/`` when it wrote into a file object) and how tensors shared storages
    archive: str | None = None
    storage: dict[str, StorageSlot] = field(default_factory=dict)
    storages: list[torch.UntypedStorage] = field(default_factory=list)
    #: (device, inode, size) of the file when it was mapped: the loaded tensors are views of it
    mapped: tuple[int, int, int] | None = None

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def is_safetensors(self) -> bool:
        return self.header is not None

    @property
    def metadata(self) -> dict[str, str] | None:
        return None if self.header is None else self.header.metadata


@dataclass(frozen=True)
class StorageSlot:
    """Where a tensor of a torch file lived: storage number (in ``SourceFile.storages``), offset in
    elements, strides, and the first key that was the very same tensor object (``sd[b] = sd[a]``).
    Tied weights share one storage in the pickle; a rewrite keeps that."""

    index: int
    offset: int
    stride: tuple[int, ...]
    same_as: str | None = None


def byte_view(t: torch.Tensor) -> object:
    """A zero-copy, C-contiguous ``uint8`` buffer over ``t``'s bytes (numpy array, buffer protocol)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if not t.is_contiguous():
        t = t.contiguous()
    if t.numel() == 0:
        return b""
    return t.reshape(-1).view(torch.uint8).numpy()


def _safetensors_views(src: SourceFile) -> dict[str, torch.Tensor]:
    h = src.header
    assert h is not None
    try:
        storage = torch.UntypedStorage.from_file(str(src.path), shared=False, nbytes=h.file_size)
    except (OSError, RuntimeError) as e:
        raise CheckpointIOError(getattr(e, "errno", None) or 5, f"cannot map file: {e}", str(src.path)) from e
    base = torch.empty(0, dtype=torch.uint8).set_(storage)
    out: dict[str, torch.Tensor] = {}
    for name, st_dtype, shape, (begin, end) in zip(h.names, h.dtypes, h.shapes, h.offsets):
        dtype = DTYPE_FROM_ST.get(st_dtype)
        if dtype is None:
            raise HeaderError(f"{src.path}: tensor '{name}' has dtype {st_dtype}, which torch cannot represent")
        start = h.data_start + begin
        raw = base[start : h.data_start + end]
        itemsize = dtype.itemsize
        if end == begin:
            t = torch.empty(tuple(shape), dtype=dtype)
        else:
            if start % itemsize:  # unaligned data (other writers): copy rather than fail
                raw = raw.clone()
            t = raw.view(dtype).view(tuple(shape))
        out[name] = t
    return out


def _archive_name(path: Path) -> str | None:
    """The record prefix of a zip-format torch file (None for the legacy format)."""
    try:
        with zipfile.ZipFile(path) as z:
            first = z.namelist()[:1]
    except (OSError, zipfile.BadZipFile):
        return None
    return first[0].split("/", 1)[0] if first and "/" in first[0] else None


def _storage_slots(sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, StorageSlot], list[torch.UntypedStorage]]:
    """Which keys share a storage (tied weights), at which offset and strides."""
    numbers: dict[int, int] = {}
    objects: dict[int, str] = {}
    storages: list[torch.UntypedStorage] = []
    slots: dict[str, StorageSlot] = {}
    for k, t in sd.items():
        st = t.untyped_storage()
        n = numbers.setdefault(st._cdata, len(storages))
        if n == len(storages):
            storages.append(st)
        first = objects.setdefault(id(t), k)
        slots[k] = StorageSlot(n, t.storage_offset(), tuple(t.stride()), None if first == k else first)
    return slots, storages


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    try:
        try:
            sd = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as e:
            if "mmap" not in str(e) and "zipfile" not in str(e):
                raise
            sd = torch.load(str(path), map_location="cpu", weights_only=True)  # legacy format
    except FileNotFoundError as e:
        raise CheckpointIOError(2, "no such file", str(path)) from e
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, ValueError) as e:
        raise CheckpointError(f"{path}: unable to load checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(sd).__name__}")
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(
                f"{path}: Expected all values in the state dict to be torch.Tensor. "
                f"Found {type(v).__name__} instead (key {k!r})."
            )
    return sd


def read_sources(paths: Sequence[Path], threads: int = 0) -> list[SourceFile]:
    """Headers of all safetensors files (parsed and validated in parallel by the native core)."""
    st = [p for p in paths if is_safetensors(p)]
    headers = dict(zip(st, _core.read_headers([str(p) for p in st], threads))) if st else {}
    out = []
    for p in paths:
        h = headers.get(p)
        src = SourceFile(Path(p), h)
        if h is not None:
            src.keys = list(h.names)
            for name, dt, shape in zip(h.names, h.dtypes, h.shapes):
                src.dtypes[name] = DTYPE_FROM_ST.get(dt, torch.uint8)
                src.shapes[name] = tuple(shape)
        out.append(src)
    return out


def _identity(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size


def check_sources_intact(sources: Sequence[SourceFile]) -> None:
    """``CheckpointIOError`` naming a mapped source file that shrank since it was loaded (someone
    truncated it in place): the tensors are views of it, and reading them would fail or crash. A file
    replaced by a new one (rename, delete + create) is fine: the mapping keeps the old one."""
    for src in sources:
        if src.mapped is None:
            continue
        now = _identity(src.path)
        if now is not None and now[:2] == src.mapped[:2] and now[2] < src.mapped[2]:
            raise CheckpointIOError(
                errno.EIO,
                f"was truncated from {src.mapped[2]} to {now[2]} bytes after it was loaded; the tensors "
                "load_checkpoint returned are views of this file, so it must not be truncated or rewritten "
                "while they are in use",
                str(src.path),
            )


def load_source_tensors(src: SourceFile) -> dict[str, torch.Tensor]:
    """All tensors of one source file; safetensors are zero-copy views (no data read until touched)."""
    src.mapped = _identity(src.path)
    if src.header is not None:
        return _safetensors_views(src)
    sd = _torch_load(src.path)
    src.archive = _archive_name(src.path)
    src.storage, src.storages = _storage_slots(sd)
    src.keys = list(sd)
    src.dtypes = {k: v.dtype for k, v in sd.items()}
    src.shapes = {k: tuple(v.shape) for k, v in sd.items()}
    return sd


def load_merged(sources: Sequence[SourceFile]) -> tuple[list[dict[str, torch.Tensor]], dict[str, SourceFile]]:
    """The tensors of every source (one dict per file, in order) and the file each key came from; a key
    found in two files is a broken checkpoint: ``CheckpointError`` naming both files."""
    per_source: list[dict[str, torch.Tensor]] = []
    key_source: dict[str, SourceFile] = {}
    for src in sources:
        tensors = load_source_tensors(src)
        for key in tensors:
            if key in key_source:
                raise CheckpointError(
                    f"{src.path}: tensor {key!r} is also in {key_source[key].path}; a key must be in exactly one shard"
                )
            key_source[key] = src
        per_source.append(tensors)
    return per_source, key_source


def with_file(e: ConversionError, key_files: Mapping[str, object], default: object = None) -> ConversionError:
    """The same error, prefixed with the file that holds the key it names (or ``default``)."""
    key = next((k for k in key_files if f'"{k}"' in str(e)), None)
    where = key_files[key] if key is not None else default
    return type(e)(f"{where}: {e}") if where is not None else e
