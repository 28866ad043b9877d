"""``HFStorageReader``: ``dcp.load`` of an HF checkpoint into a sharded (DTensor) state dict.

It reads the index and the shard headers only (never stray ``*.safetensors`` in the folder), maps
the files, and each rank copies only its own rows out of the mapping: through the same row map as the
writer, so torchtune-keyed state dicts (q/k in torchtune's RoPE order) load straight from HF files.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from ..config import ModelConfig
from ..constants import SAFETENSOR_INDEX_FNAME
from ..convert.base import Converter
from ..errors import CheckpointError, ConversionError
from ..format.layout import read_index
from ..format.shards import load_merged, read_sources
from ..store.local import safe_join
from ..store.url import local_folder
from ._rows import rope_rows

__all__ = ["HFStorageReader", "hf_files"]


def hf_files(folder: Path) -> list[Path]:
    """The shard files of an HF folder: those its index names, else ``model.safetensors``."""
    found = read_index(folder, SAFETENSOR_INDEX_FNAME)
    if found is not None:
        from .. import _core

        names = _core.sort_shard_names(sorted(set(found[2]["weight_map"].values())))
        return [safe_join(folder, n, "shard") for n in names]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    found_files = [p for p in folder.glob("model*.safetensors") if p.is_file()]
    if len(found_files) == 1:
        return found_files
    raise CheckpointError(
        f"{folder}: no {SAFETENSOR_INDEX_FNAME} and no single model*.safetensors file: not an HF safetensors "
        "checkpoint this reader can take without guessing"
    )


class _Source:
    """Where one state-dict key's rows come from: an HF tensor (mapped), a first row, a RoPE head_dim."""

    __slots__ = ("head_dim", "hf", "row")

    def __init__(self, hf: torch.Tensor, row: int, head_dim: int) -> None:
        self.hf, self.row, self.head_dim = hf, row, head_dim

    def index(self, start: int, length: int) -> torch.Tensor:
        """The HF rows of tune rows ``[start, start + length)`` (RoPE order)."""
        rows = np.arange(start, start + length, dtype=np.int64)
        return torch.from_numpy(self.row + rope_rows(rows, self.head_dim))

    def rows(self, start: int, length: int) -> torch.Tensor:
        if not self.head_dim:
            return self.hf.narrow(0, self.row + start, length)
        return self.hf.index_select(0, self.index(start, length))


class HFStorageReader(StorageReader):
    """Read an HF safetensors checkpoint with ``dcp.load``, in HF keys or (with ``converter`` and
    ``config``) torchtune keys; each rank reads only the rows of its own shards."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        thread_count: int = 1,
        *,
        converter: Converter | None = None,
        config: ModelConfig | Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.path = local_folder(path, "shardwise.dcp.HFStorageReader")
        self.converter = converter
        if converter is not None and config is None:
            config = ModelConfig.from_file(self.path / "config.json")
        self.config = config if config is None or isinstance(config, ModelConfig) else ModelConfig(dict(config))
        self._sources: dict[str, _Source] = {}
        self._fallback: dict[str, torch.Tensor] | None = None
        self._hf: dict[str, torch.Tensor] = {}

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id is not None:
            self.path = local_folder(checkpoint_id, "shardwise.dcp.HFStorageReader")
        self._sources, self._fallback, self._hf = {}, None, {}

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return False

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        sources = read_sources(hf_files(self.path))
        per_source, _ = load_merged(sources)
        hf = {k: t for tensors in per_source for k, t in tensors.items()}
        self._hf = hf
        shapes: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        if self.converter is None:
            for k, t in hf.items():
                self._sources[k] = _Source(t, 0, 0)
                shapes[k] = (t.dtype, tuple(t.shape))
        else:
            assert self.config is not None
            meta = {k: torch.empty(t.shape, dtype=t.dtype, device="meta") for k, t in hf.items()}
            loaded = self.converter.hf_to_tune(meta, self.config)
            tune_meta = loaded.tune
            owner = {id(t): k for k, t in tune_meta.items()}
            ops = self.converter.tune_to_hf_ops(tune_meta, self.config, loaded.aside)
            for op in ops:
                for rs in op.rows or ():
                    fqn = owner.get(id(rs.tensor))
                    if fqn is not None and op.key in hf and fqn not in self._sources:
                        self._sources[fqn] = _Source(hf[op.key], rs.dst_row, rs.head_dim)
            for k, t in tune_meta.items():
                shapes[k] = (t.dtype, tuple(t.shape))
        md = {
            k: TensorStorageMetadata(
                properties=TensorProperties(dtype=dtype),
                size=torch.Size(shape),
                chunks=[ChunkStorageMetadata(offsets=torch.Size([0] * len(shape)), sizes=torch.Size(shape))],
            )
            for k, (dtype, shape) in shapes.items()
        }
        return Metadata(state_dict_metadata=md)

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        if not self._hf:  # read_metadata ran on another instance (e.g. metadata passed in)
            self.read_metadata()

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def _full_tune(self, fqn: str) -> torch.Tensor:
        """A key whose conversion is no row map: converted from the mapped HF tensors (once)."""
        if self._fallback is None:
            assert self.converter is not None and self.config is not None
            self._fallback = self.converter.hf_to_tune(self._hf, self.config).tune
        t = self._fallback.get(fqn)
        if t is None:
            raise ConversionError(f"{self.path}: the checkpoint has no tensor for {fqn!r}")
        return t

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        for item in plan.items:
            fqn = item.storage_index.fqn
            off, lengths = list(item.storage_offsets), list(item.lengths)
            src = self._sources.get(fqn)
            target = planner.resolve_tensor(item).detach()
            full_rows = src is not None and off and src.head_dim and list(off[1:]) == [0] * (len(off) - 1) \
                and tuple(lengths[1:]) == tuple(src.hf.shape[1:]) and target.is_contiguous() \
                and tuple(target.shape) == tuple(lengths) and target.dtype == src.hf.dtype
            if full_rows:  # permuted whole rows: gathered straight into the target, one copy
                assert src is not None
                torch.index_select(src.hf, 0, src.index(off[0], lengths[0]), out=target)
                planner.commit_tensor(item, target)
                continue
            if src is not None and off:
                data = src.rows(off[0], lengths[0])
                for d in range(1, len(off)):
                    data = data.narrow(d, off[d], lengths[d])
            else:
                data = self._full_tune(fqn) if src is None else src.hf
                for d in range(len(off)):
                    data = data.narrow(d, off[d], lengths[d])
            if tuple(target.shape) != tuple(data.shape):
                raise CheckpointError(
                    f"{self.path}: {fqn!r}: the checkpoint gives {tuple(data.shape)} where the state dict "
                    f"expects {tuple(target.shape)}"
                )
            target.copy_(data)
            planner.commit_tensor(item, target)
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

