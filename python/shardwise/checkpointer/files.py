"""The checkpointer's path rules (torchtune's): ``checkpoint_files`` resolution, resume discovery,
output-dir checks, side-file copying."""

from __future__ import annotations

import os
import re
import shutil
import string
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from .. import _core
from .._logging import get_logger
from ..constants import SUFFIXES_TO_NOT_COPY
from ..errors import CheckpointIOError
from ..store.local import is_staging_name, safe_join

__all__ = [
    "FormattedCheckpointFiles",
    "check_outdir_not_in_ckptdir",
    "checkpoint_file_names",
    "copy_files",
    "get_largest_iter_folder",
    "get_path",
    "user_path",
    "resolve_checkpoint_files",
]

logger = get_logger()

class FormattedCheckpointFiles:
    """``checkpoint_files`` given as ``{"filename_format": ..., "max_filename": ...}`` (torchtune's form)."""

    def __init__(self, filename_format: str, max_filename: str) -> None:
        self.filename_format = filename_format
        self.max_filename = max_filename
        self._validate()

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> FormattedCheckpointFiles:
        """Build from a config mapping; ``max_filename`` must be a string (YAML reads ``00025`` as int)."""
        if "filename_format" not in d or "max_filename" not in d:
            raise ValueError(
                "Must pass 'filename_format' and 'max_filename' keys to generate checkpoint filenames"
            )
        if not isinstance(d["max_filename"], str):
            raise ValueError(
                f"`max_filename` must be a string, but found {type(d['max_filename'])} instead."
            )
        return cls(str(d["filename_format"]), d["max_filename"])

    def _validate(self) -> None:
        fields = [f for _, f, _, _ in string.Formatter().parse(self.filename_format) if f is not None]
        if len(fields) != 2:
            raise ValueError(
                "Filename format string must have exactly two placeholders, "
                "e.g. 'file_{}_of_{}.pth'"
            )
        if any(f and not f.isdigit() for f in fields):
            raise ValueError(
                f"Filename format {self.filename_format!r} must use positional placeholders "
                "('{}' or '{0}'), since both are filled positionally, e.g. 'model-{}-of-{}.safetensors'"
            )
        if not self.max_filename.isdigit():
            raise ValueError(f"`max_filename` must be a string of digits, got {self.max_filename!r}")

    def build_checkpoint_filenames(self) -> list[str]:
        """``filename_format`` filled with ``1..max`` (zero-padded to ``len(max_filename)``) and the max."""
        n = int(self.max_filename)
        width = len(self.max_filename)
        return [self.filename_format.format(str(i).zfill(width), self.max_filename) for i in range(1, n + 1)]


def user_path(folder: Path, name: str | os.PathLike[str], what: str = "Checkpoint file") -> Path:
    """``folder / name`` for a path a user gave relative to ``folder`` (``checkpoint_files``,
    ``recipe_checkpoint``, ``adapter_checkpoint``): absolute is used as is (as in torchtune), a relative
    one must not climb out of ``folder`` with ``..``."""
    fn = Path(name)
    if not fn.is_absolute() and ".." in fn.parts:
        raise ValueError(f"{what} name {str(name)!r} escapes {folder}")
    return Path(folder) / fn


def get_path(input_dir: Path, filename: str | os.PathLike[str], missing_ok: bool = False) -> Path:
    """``input_dir / filename`` (an absolute filename is used as is, as in torchtune); must exist."""
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise ValueError(f"{input_dir} is not a valid directory.")
    path = user_path(input_dir, filename)
    if not missing_ok and not path.is_file():
        raise ValueError(f"No file with name: {filename} found in {input_dir}.")
    return path


def resolve_checkpoint_files(
    checkpoint_files: Sequence[str] | Mapping[str, str] | FormattedCheckpointFiles,
    folder: Path,
    *,
    inside: bool = False,
    torchtune_names: bool = False,
) -> list[Path]:
    """Expand the torchtune forms of ``checkpoint_files``, check each exists, sort numerically.

    A user's names may be absolute (as torchtune allows); names read from a checkpoint (an index, a
    manifest) are resolved with ``inside=True`` and must stay inside ``folder``. With
    ``torchtune_names`` (a checkpointer load of a folder shardwise saved), torchtune's output names
    are accepted too."""
    names = checkpoint_file_names(checkpoint_files)
    if inside:
        for n in names:
            safe_join(Path(folder), n, "shard")
    paths = [_get_or_alias(folder, n) if torchtune_names else get_path(folder, n) for n in names]
    if not paths:
        raise ValueError("checkpoint_files is empty: name at least one checkpoint file")
    if len({p.resolve() for p in paths}) != len(paths):
        raise ValueError(f"checkpoint_files names the same file twice: {[str(p) for p in paths]}")
    order = _core.sort_shard_names([str(p) for p in paths])
    return [Path(p) for p in order]


def checkpoint_file_names(
    checkpoint_files: Sequence[str] | Mapping[str, str] | FormattedCheckpointFiles | str | os.PathLike[str],
) -> list[str]:
    """The file names the torchtune forms of ``checkpoint_files`` stand for (nothing is checked)."""
    if isinstance(checkpoint_files, FormattedCheckpointFiles):
        names: Iterable[str] = checkpoint_files.build_checkpoint_filenames()
    elif isinstance(checkpoint_files, Mapping):
        names = FormattedCheckpointFiles.from_dict(checkpoint_files).build_checkpoint_filenames()
    elif isinstance(checkpoint_files, (str, os.PathLike)):
        names = [str(checkpoint_files)]
    else:
        names = [str(n) for n in checkpoint_files]
    return list(names)


_TORCHTUNE_SHARD = re.compile(r"^model-(\d+)-of-(\d+)\.(safetensors|bin)$")


def torchtune_alias(folder: Path, name: str) -> Path | None:
    """torchtune 0.6.1 renames every output shard ``model-0000k-of-0000n.*``; shardwise keeps the input
    names. A resume config written for torchtune names the k-th of n shards: that is the k-th weight
    file of the folder in numeric order, when the folder holds exactly n of them."""
    p = Path(name)
    m = _TORCHTUNE_SHARD.match(p.name)
    if not m:
        return None
    k, n, ext = int(m.group(1)), int(m.group(2)), m.group(3)
    parent = folder / p.parent
    if not parent.is_dir():
        return None
    found = _core.sort_shard_names(
        [e.name for e in parent.iterdir() if e.is_file() and e.name.endswith("." + ext) and not e.name.startswith(".")
         and not e.name.startswith("adapter_model")]
    )
    if len(found) != n or not 1 <= k <= n:
        return None
    return parent / found[k - 1]


def _get_or_alias(folder: Path, name: str) -> Path:
    try:
        return get_path(folder, name)
    except ValueError:
        alias = torchtune_alias(Path(folder), name)
        if alias is None:
            raise
        logger.info(
            "checkpoint_files names %s, which is not in %s: loading %s, the file torchtune would have named so "
            "(shardwise keeps the input file names)",
            name, Path(folder), alias,
        )
        return alias


def check_outdir_not_in_ckptdir(ckpt_dir: Path, out_dir: Path) -> bool:
    """``out_dir`` may be a sibling of or contain ``ckpt_dir``, but not equal it or sit inside it."""
    ckpt = Path(ckpt_dir).resolve()
    out = Path(out_dir).resolve()
    if out == ckpt or ckpt in out.parents:
        raise ValueError(
            "The output directory cannot be the same as or a subdirectory of the checkpoint directory. "
            f"Found ckpt_dir={ckpt_dir} and out_dir={out_dir}."
        )
    return True


def get_largest_iter_folder(
    dir: str | os.PathLike[str], pattern: str = r"^epoch_(\d+)$", *, skip_empty: bool = False
) -> str | None:
    """Name of the complete checkpoint folder with the largest number (``epoch_10`` after ``epoch_9``);
    files, temporary folders and names like ``epoch_7.txt`` or ``epoch_3_old`` are ignored, and empty
    folders too with ``skip_empty``."""
    d = Path(dir)
    if not d.is_dir():
        return None
    rx = re.compile(pattern)
    best: tuple[int, str] | None = None
    for entry in sorted(os.listdir(d)):
        m = rx.match(entry)
        if not m or is_staging_name(entry) or not (d / entry).is_dir():
            continue
        if m.end() != len(entry):
            continue
        if skip_empty:
            with os.scandir(d / entry) as it:
                if next(it, None) is None:
                    continue
        n = int(m.group(1))
        if best is None or n > best[0]:
            best = (n, entry)
    return None if best is None else best[1]


_ADAPTER_SIDE = re.compile(r"^adapter_(config|model)\b")


def copy_files(
    input_dir: Path,
    output_dir: Path,
    *,
    ignore_suffixes: Sequence[str] = SUFFIXES_TO_NOT_COPY,
    max_file_size_mb: int = 100,
) -> list[Path]:
    """Copy the side files (config, tokenizer, ...) of ``input_dir`` into ``output_dir``, as torchtune does:
    recursive, skipping dot-names, weight/index files and files over ``max_file_size_mb``; never
    overwriting. Unlike torchtune it never copies an input ``adapter_config.json``/``adapter_model.*``
    (a stale adapter would make the folder look like a PEFT adapter)."""
    copied = []
    limit = max_file_size_mb * 1024 * 1024
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if not input_dir.is_dir():
        raise CheckpointIOError(2, "checkpoint_dir is gone: cannot copy config.json and the tokenizer", str(input_dir))
    for root, dirs, files in os.walk(input_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel = Path(root).relative_to(input_dir)
        dest_dir = output_dir / rel
        dest_dir.mkdir(parents=True, exist_ok=True)
        for name in sorted(files):
            if name.startswith(".") or any(name.endswith(s) for s in ignore_suffixes):
                continue
            if rel == Path(".") and _ADAPTER_SIDE.match(name):
                continue
            src = Path(root) / name
            if src.stat().st_size > limit:
                logger.warning(
                    "Skipping copying %s to %s as it exceeds the size limit of %d MiB.",
                    src, output_dir, max_file_size_mb,
                )
                continue
            dest = dest_dir / name
            if dest.exists():
                continue
            shutil.copy2(src, dest)
            copied.append(dest)
    return copied
