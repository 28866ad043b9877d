"""``HFStorageWriter``: a ``torch.distributed.checkpoint`` StorageWriter that writes the final HF shards.

Every rank writes the bytes it owns straight into the final files at their final offsets: the
coordinator plans the whole layout in ``prepare_global_plan`` (from global shapes and dtypes) and
creates every file at full size in a staging folder; each rank then writes its chunks with one native
call (positional writes from tensor memory, GIL released) and fsyncs them; ``finish`` writes the index
and publishes the folder atomically. No gather, no per-rank files, no consolidation pass.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import shutil
import uuid
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItemType
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult
from torch.futures import Future

from .. import _core
from ..errors import CheckpointIOError, ConversionError
from ..format.shards import byte_view
from ..store.local import fsync_file, fsync_tree, remove_leftovers, staging_path
from ..store.url import local_folder
from ._rows import Dest, chunk_segments
from .plan import FixedFiles, Layout, SourceLayout, plan_layout

__all__ = ["HFStorageWriter"]

_TOKEN = ".shardwise-dcp-token"
#: host copies (of GPU or non-contiguous chunks) alive at once before they are written out
_MAX_PENDING_COPIES = 256 << 20


@dataclass
class _RankPlan:
    """What the coordinator tells each rank: the staging folder and where its tensors' rows go."""

    staging: str
    token: str
    dests: dict[str, list[Dest]] = field(default_factory=dict)


def _host_contiguous(t: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``t`` on the CPU and C-contiguous; True when that took a copy."""
    t = t.detach()
    copied = False
    if t.device.type != "cpu":
        t, copied = t.cpu(), True
    if not t.is_contiguous():
        t, copied = t.contiguous(), True
    return t, copied


class HFStorageWriter(StorageWriter):
    """Write a (sharded) state dict as Hugging Face safetensors shards with ``dcp.save``.

    Takes the arguments of torch's ``HuggingFaceStorageWriter`` (``save_distributed`` and
    ``enable_consolidation`` are accepted and have no effect: the output is always the final,
    consolidated HF folder). ``source`` (from ``FullModelHFCheckpointer``) carries the key conversion
    and the layout read on load, so an unchanged round trip is byte-identical to the input; without
    it the keys are written as they are, with the ``safetensors`` library's layout.
    ``thread_count`` > 1 sets the native writer's threads (default: this node's CPUs shared by its
    ranks, from ``LOCAL_WORLD_SIZE``).
    All ranks must see ``path``'s parent folder (one shared filesystem).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        fqn_to_index_mapping: Mapping[str, int] | None = None,
        thread_count: int = 1,
        save_distributed: bool = False,
        enable_consolidation: bool = False,
        thread_count_consolidation: int = 1,
        *,
        source: SourceLayout | None = None,
        max_shard_size: int | None = None,
        fsync: bool = True,
        publish: bool = True,
        side_files: Callable[[Path], None] | None = None,
        fixed: FixedFiles | None = None,
    ) -> None:
        super().__init__()
        self.path = local_folder(path, "shardwise.dcp.HFStorageWriter")
        self.fqn_to_index_mapping = dict(fqn_to_index_mapping) if fqn_to_index_mapping else None
        # torch's default (1) leaves the choice to us: the CPUs of this node shared by its ranks
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
        self.threads = thread_count if thread_count > 1 else max(1, (os.cpu_count() or 1) // max(1, local_world))
        self.source = source
        self.max_shard_size = max_shard_size
        self.fsync = fsync
        self.publish = publish
        self.side_files = side_files
        self.fixed = fixed
        self.is_coordinator = False
        self.rank = 0
        #: the staging folder of the last save (coordinator only); removed by ``abort``
        self.staging: Path | None = None
        self.layout: Layout | None = None

    # ------------------------------------------------------------------ StorageWriter
    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id is not None:
            self.path = local_folder(checkpoint_id, "shardwise.dcp.HFStorageWriter")
        self.staging = None
        self.layout = None

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator
        self.rank = int(kwargs.get("rank", 0))

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return False  # never picked automatically: HF output is asked for by name

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=str(self.path), save_id=None)

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        for item in plan.items:
            if item.type == WriteItemType.BYTE_IO or item.tensor_data is None:
                raise ConversionError(
                    f'"{item.index.fqn}": HF safetensors files hold tensors only; save non-tensor '
                    "state separately (e.g. with torch.distributed.checkpoint's FileSystemWriter)"
                )
        # the state dict's key order, which DCP's dedup of replicated tensors does not keep: the layout
        # (and a max_shard_size split) follows it, as in the single-process save
        order = list(dict.fromkeys(item.index.fqn for item in plan.items))
        return dataclasses.replace(plan, storage_data=order)

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        found: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        for plan in plans:
            for item in plan.items:
                td = item.tensor_data
                if td is None:
                    raise ConversionError(f'"{item.index.fqn}": not a tensor')
                meta = (td.properties.dtype, tuple(td.size))
                if found.setdefault(item.index.fqn, meta) != meta:
                    raise ConversionError(
                        f'"{item.index.fqn}": the ranks disagree on its dtype/shape ({found[item.index.fqn]} vs {meta})'
                    )
        order = list(dict.fromkeys(k for plan in plans for k in (plan.storage_data or ())))
        tensors = {k: found[k] for k in order if k in found}
        tensors.update((k, v) for k, v in found.items() if k not in tensors)
        layout = plan_layout(
            tensors, self.source, fqn_to_index_mapping=self.fqn_to_index_mapping, max_shard_size=self.max_shard_size,
            fixed=self.fixed,
        )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        remove_leftovers(self.path.parent)  # what failed saves of dead processes left (over an hour old)
        staging = staging_path(self.path)
        staging.mkdir()
        self.staging = staging
        self.layout = layout
        token = uuid.uuid4().hex
        (staging / _TOKEN).write_text(token)
        _core.create_files([(str(staging / name), header, size) for name, header, size in layout.files], self.fsync)
        out = []
        for plan in plans:
            fqns = {item.index.fqn for item in plan.items}
            dests = {k: v for k, v in layout.dests.items() if k in fqns}
            out.append(SavePlan(plan.items, storage_data=_RankPlan(str(staging), token, dests),
                                planner_data=plan.planner_data, usable=plan.usable))
        return out

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        rp: _RankPlan = plan.storage_data
        staging = self._check_staging(rp)
        pending: dict[str, list[tuple[object, np.ndarray]]] = defaultdict(list)
        copies = 0
        results = []

        def flush() -> None:
            nonlocal copies
            if pending:
                _core.write_regions([(str(staging / f), regs) for f, regs in pending.items()], False, self.threads)
                pending.clear()
            copies = 0

        for item in plan.items:
            td = item.tensor_data
            assert td is not None
            data = planner.resolve_data(item)
            assert isinstance(data, torch.Tensor)
            t, copied = _host_contiguous(data)
            if tuple(t.shape) != tuple(td.chunk.sizes):
                raise ConversionError(
                    f'"{item.index.fqn}": the local chunk is {tuple(t.shape)} where DCP planned {tuple(td.chunk.sizes)}'
                )
            view = byte_view(t)
            for dest in rp.dests.get(item.index.fqn, ()):
                chunk = td.chunk
                segs = chunk_segments(dest, tuple(td.size), tuple(chunk.offsets), tuple(chunk.sizes), t.element_size())
                if len(segs):
                    pending[dest.file].append((view, segs))
            results.append(WriteResult(index=item.index, size_in_bytes=t.nbytes, storage_data=None))
            copies += t.nbytes if copied else 0
            if copies > _MAX_PENDING_COPIES:
                flush()
        if self.is_coordinator and self.layout is not None:
            for tensor, dest in self.layout.local:
                t, _ = _host_contiguous(tensor)
                segs = chunk_segments(dest, tuple(t.shape), (0,) * t.dim(), tuple(t.shape), t.element_size())
                if len(segs):
                    pending[dest.file].append((byte_view(t), segs))
        flush()
        if self.fsync:
            self._fsync_files(staging, rp)
        fut: Future[list[WriteResult]] = Future()
        fut.set_result(results)
        return fut

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        assert self.staging is not None and self.layout is not None
        staging = self.staging
        (staging / _TOKEN).unlink(missing_ok=True)
        if self.layout.index is not None:
            from ..format.layout import index_name

            (staging / index_name(True)).write_bytes(self.layout.index)
        if self.side_files is not None:
            self.side_files(staging)
        if self.fsync:  # the index and side files written here (the shards' ranks fsynced theirs)
            fsync_tree(staging)
        if self.publish:
            _core.publish_dir(str(staging), str(self.path))
            self.staging = None

    # ------------------------------------------------------------------ helpers
    def abort(self) -> None:
        """Remove the staging folder of a save that failed (coordinator; a no-op elsewhere)."""
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging = None

    def _check_staging(self, rp: _RankPlan) -> Path:
        staging = self._rank_view(Path(rp.staging))
        try:
            seen = (staging / _TOKEN).read_text()
        except OSError:
            seen = None
        if seen != rp.token:
            raise CheckpointIOError(
                errno.ENOENT,
                f"rank {self.rank} cannot see the staging folder the coordinator created: every rank must "
                "write to one shared filesystem (the same output folder on every node)",
                str(staging),
            )
        return staging

    def _rank_view(self, staging: Path) -> Path:
        """The staging folder as this rank sees it (a hook for tests of unshared filesystems)."""
        return staging

    def _fsync_files(self, staging: Path, rp: _RankPlan) -> None:
        names = {d.file for ds in rp.dests.values() for d in ds}
        if self.is_coordinator and self.layout is not None:
            names |= {d.file for _, d in self.layout.local}
        for name in sorted(names):
            fsync_file(staging / name)
