"""``save`` / ``load``: ``dcp.save`` / ``dcp.load`` with shardwise's HF storage, cleanup and clear errors."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException

from ..config import ModelConfig
from ..convert.base import Converter
from ..errors import CheckpointError, CheckpointIOError
from ..staging import SaveFuture, Stager, submit, wait_for_previous
from ..store.url import local_folder
from .plan import FixedFiles, SourceLayout
from .reader import HFStorageReader
from .writer import HFStorageWriter

__all__ = ["async_save", "is_sharded", "load", "save", "save_group", "unwrap"]


def is_sharded(tensors: Mapping[str, Any]) -> bool:
    """True when any value is a ``DTensor`` (a sharded state dict, saved collectively)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(v, DTensor) for v in tensors.values())


def unwrap(e: CheckpointException, what: str) -> CheckpointError:
    """One clear shardwise error for DCP's per-rank failure report (which is a ``BaseException``)."""
    failures = e.failures
    ranks = sorted(failures)
    first = failures[ranks[0]][0] if ranks else e
    msg = f"distributed {what} failed on rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}: {first}"
    if isinstance(first, OSError):
        err: CheckpointError = CheckpointIOError(first.errno or 5, msg, getattr(first, "filename", None))
    else:
        err = CheckpointError(msg)
    err.failures = failures  # type: ignore[attr-defined]
    return err


@contextlib.contextmanager
def _one_process_quiet() -> Iterator[None]:
    """Without a process group DCP warns that it "assumes" a single process: that is what we asked for."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def save(
    state_dict: Mapping[str, Any],
    path: str | os.PathLike[str],
    *,
    source: SourceLayout | None = None,
    fqn_to_index_mapping: Mapping[str, int] | None = None,
    max_shard_size: int | None = None,
    process_group: dist.ProcessGroup | None = None,
    fsync: bool = True,
    publish: bool = True,
    side_files: Callable[[Path], None] | None = None,
    fixed: FixedFiles | None = None,
) -> HFStorageWriter:
    """Collectively write ``state_dict`` (DTensors and/or plain tensors) as the HF folder ``path``;
    call on every rank. A failure on any rank fails every rank and publishes nothing. Returns the
    writer (its ``staging`` is the unpublished folder when ``publish=False``)."""
    writer = HFStorageWriter(
        path, fqn_to_index_mapping, source=source, max_shard_size=max_shard_size,
        fsync=fsync, publish=publish, side_files=side_files, fixed=fixed,
    )
    try:
        with _one_process_quiet():
            dcp.save(dict(state_dict), storage_writer=writer, process_group=process_group)
    except CheckpointException as e:
        writer.abort()
        raise unwrap(e, "save") from None
    except BaseException:
        writer.abort()
        raise
    return writer


_stager = Stager()
_groups: dict[int, dist.ProcessGroup] = {}


def save_group(process_group: dist.ProcessGroup | None) -> dist.ProcessGroup:
    """A gloo group of the same ranks, made once (collectively) for the background thread: the save's
    collectives and the training loop's never share a group (not safe from two threads)."""
    key = 0 if process_group is None else id(process_group)
    if key not in _groups:
        ranks = None if process_group is None else dist.get_process_group_ranks(process_group)
        _groups[key] = dist.new_group(ranks=ranks, backend="gloo")
    return _groups[key]


def async_save(
    state_dict: Mapping[str, Any],
    path: str | os.PathLike[str],
    *,
    process_group: dist.ProcessGroup | None = None,
    **writer_args: Any,
) -> SaveFuture:
    """``save`` in the background; call on every rank. Returns once this rank's state is copied into
    staging buffers (reused from save to save; pinned host memory for CUDA tensors), so the tensors
    may change right away. The folder is published only when every rank has written its bytes. At
    most one save is in flight: a second call first waits for the previous one (and raises its
    error if its ``result()`` was never called). ``writer_args`` are ``save``'s."""
    target = local_folder(path, "shardwise.dcp.async_save")
    wait_for_previous()
    staged = _stager.stage(dict(state_dict))
    group = save_group(process_group) if dist.is_available() and dist.is_initialized() else None
    return submit(lambda: save(staged, target, process_group=group, **writer_args), str(target))


def load(
    state_dict: dict[str, Any],
    path: str | os.PathLike[str],
    *,
    converter: Converter | None = None,
    model_type: str | None = None,
    config: ModelConfig | Mapping[str, Any] | None = None,
    process_group: dist.ProcessGroup | None = None,
) -> dict[str, Any]:
    """Load the HF folder ``path`` into ``state_dict`` in place (DTensors get their own rows only);
    keys are HF keys, or torchtune keys with ``model_type`` (or a ``converter``). Call on every rank."""
    if converter is None and model_type is not None:
        from ..convert import get_converter
        from ..model_types import parse_model_type

        converter = get_converter(parse_model_type(model_type))
    reader = HFStorageReader(path, converter=converter, config=config)
    try:
        with _one_process_quiet():
            dcp.load(state_dict, storage_reader=reader, process_group=process_group)
    except CheckpointException as e:
        raise unwrap(e, "load") from None
    return state_dict


