"""Typed stubs of the native core (``rust/``): safetensors headers, shard sorting, fresh layouts, writes.

Every function raises ``shardwise.errors.HeaderError`` (a ``ValueError``) for malformed input, naming
the file and the problem, and ``shardwise.errors.CheckpointIOError`` (an ``OSError`` with ``errno`` and
``filename``) for I/O failures. Bulk I/O runs with the GIL released.
"""

from collections.abc import Buffer, Mapping, Sequence

MAX_HEADER_SIZE: int  # 100_000_000, as in the safetensors format

class SafetensorsHeader:
    """One parsed and validated safetensors header; tensor lists are in data-offset order."""

    path: str
    header_size: int  # N, the little-endian u64 at the start of the file
    data_start: int  # 8 + N
    file_size: int
    raw: bytes  # the first 8 + N bytes of the file, exactly as they are on disk
    metadata: dict[str, str] | None  # the "__metadata__" object, None when absent
    names: list[str]
    dtypes: list[str]  # safetensors dtype names: "BF16", "F16", "F32", "I64", "BOOL", ...
    shapes: list[list[int]]
    offsets: list[tuple[int, int]]  # (begin, end) relative to data_start

    def __len__(self) -> int: ...

def read_header(path: str) -> SafetensorsHeader:
    """Parse and fully validate one file's header (data bytes are never read)."""

def read_headers(paths: Sequence[str], threads: int = 0) -> list[SafetensorsHeader]:
    """``read_header`` for many files in parallel (GIL released); results in input order."""

def parse_header(raw: bytes, file_size: int, path: str) -> SafetensorsHeader:
    """Validate header bytes obtained elsewhere (ranged reads of a remote file): ``raw`` is the 8-byte
    prefix and the header, ``file_size`` the whole file's size; errors name ``path``."""

def sort_shard_names(names: Sequence[str]) -> list[str]:
    """Numeric-aware sort: ``model-2-of-10`` before ``model-10-of-10``; padding does not matter."""

def parse_index(raw: bytes, path: str) -> tuple[dict[str, str], list[str], int | None]:
    """Validate a ``model.safetensors.index.json``/``pytorch_model.bin.index.json``: its
    ``weight_map``, the shard names it lists in numeric order, and ``metadata.total_size``.
    HeaderError naming ``path`` when malformed or when a shard name would escape the folder."""

def dtype_size(dtype: str) -> int:
    """Bytes per element of a safetensors dtype name; HeaderError for unknown names."""

def fresh_layout(
    names: Sequence[str],
    dtypes: Sequence[str],
    shapes: Sequence[Sequence[int]],
    metadata: Mapping[str, str] | None,
) -> tuple[bytes, list[tuple[int, int]]]:
    """Header bytes (8-byte prefix included) and per-input (begin, end) data offsets, byte-identical
    to what the ``safetensors`` library writes for the same tensors and metadata."""

def write_file(
    path: str,
    header: bytes,
    pieces: Sequence[tuple[int, Buffer]],
    fsync: bool = True,
    threads: int = 0,
) -> int:
    """Write ``header`` then every C-contiguous buffer at ``len(header) + offset`` into a pre-sized
    temp file next to ``path``, in parallel with the GIL released; rename it into place. The pieces
    must tile the data area exactly. Returns the bytes written. On failure no file is left behind."""

def write_files(
    files: Sequence[tuple[str, bytes, Sequence[tuple[int, Buffer]]]],
    fsync: bool = True,
    threads: int = 0,
) -> int:
    """``write_file`` for several files sharing one thread pool; all-or-nothing per file."""

def create_files(files: Sequence[tuple[str, Buffer, int]], fsync: bool = True) -> None:
    """Create every file (it must not exist) at its final size with its header written at offset 0;
    the header's data area must end exactly at the size. All-or-nothing (the distributed save's
    coordinator pre-creates the final files this way)."""

def write_regions(
    files: Sequence[tuple[str, Sequence[tuple[Buffer, Buffer]]]],
    fsync: bool = True,
    threads: int = 0,
) -> int:
    """Write byte ranges into existing files: per file, (buffer, segments) pairs where segments is a
    C-contiguous int64 array of (src offset in the buffer, dst offset in the file, length) triples.
    Runs contiguous in the file go out as one ``pwritev``; everything is validated (bounds, no two
    segments overlapping in a file) before the first write; GIL released. Returns the bytes written."""

def fsync_dir(path: str) -> None:
    """fsync a directory so that renames inside it are durable."""

def publish_dir(staging: str, final: str) -> None:
    """Atomically make directory ``staging`` visible as ``final``; an existing ``final`` is swapped
    out in one step (``renameat2(RENAME_EXCHANGE)``) and then removed (best effort: once the new
    contents are live, a leftover old tree under its temporary name is not an error)."""
