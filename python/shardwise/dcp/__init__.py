"""shardwise for ``torch.distributed.checkpoint``: every rank writes (and reads) its own bytes of the
final Hugging Face shard files — no gather onto rank 0, no per-rank files, no consolidation pass.

- ``HFStorageWriter`` / ``HFStorageReader``: a StorageWriter / StorageReader for ``dcp.save`` /
  ``dcp.load`` (drop-in for torch's ``HuggingFaceStorageWriter`` / ``HuggingFaceStorageReader``).
- ``save`` / ``load``: the same with cleanup on failure and clear errors; ``async_save`` writes in the
  background once the state is staged (a ``SaveFuture``).

All ranks must share the output filesystem (as torch's own consolidation requires).
"""

from __future__ import annotations

from ..staging import SaveFuture
from .api import async_save, is_sharded, load, save
from .plan import HF_PREFIX, FixedFiles, SourceLayout, plan_layout
from .reader import HFStorageReader
from .writer import HFStorageWriter

__all__ = [
    "HF_PREFIX",
    "FixedFiles",
    "HFStorageReader",
    "HFStorageWriter",
    "SaveFuture",
    "SourceLayout",
    "async_save",
    "is_sharded",
    "load",
    "plan_layout",
    "save",
]
