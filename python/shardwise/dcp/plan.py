"""The final layout of a distributed save, planned from global shapes and dtypes only.

The coordinator knows every tensor's global shape and dtype from the ranks' DCP write items. That is
enough to run the family converter on *meta* tensors (no data, no collective), plan the output
shards exactly as the single-process save does (``layout.plan_shards`` / ``layout.shard_header``, so
an unchanged round trip reuses the original header bytes), and turn every op's row map into the
destination of each source tensor's rows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .._logging import get_logger
from ..config import ModelConfig
from ..convert.base import Converter, Op, identity_op
from ..errors import ConversionError
from ..format.layout import OutputShard, SavePlan, count_params, index_bytes, plan_shards, shard_header
from ..format.shards import SourceFile
from ._rows import Dest

__all__ = ["HF_PREFIX", "FixedFiles", "Layout", "SourceLayout", "plan_layout"]

logger = get_logger()

#: a state-dict key with this prefix already holds the HF tensor of the rest of the key (written as is)
HF_PREFIX = "shardwise.hf::"


@dataclass
class SourceLayout:
    """What a ``FullModelHFCheckpointer`` read on load: the conversion and the source files' layout,
    so that a collective save writes the same bytes as the single-process one."""

    converter: Converter | None = None
    config: ModelConfig | None = None
    aside: Mapping[str, torch.Tensor] = field(default_factory=dict)
    sources: Sequence[SourceFile] = ()
    key_source: Mapping[str, SourceFile] = field(default_factory=dict)
    original_index: tuple[bytes, dict[str, Any]] | None = None
    had_index: bool = False


@dataclass
class FixedFiles:
    """Files decided before the save (``shardwise.hf``: transformers' split): the keys of each file by
    file name, in file order, and the index bytes (None: a single file, no index)."""

    files: Mapping[str, Sequence[str]]
    index: bytes | None


def _fixed_files(ops: list[Op], fixed: FixedFiles) -> SavePlan:
    by_key = {op.key: op for op in ops}
    shards = [OutputShard(name, [by_key.pop(k) for k in keys if k in by_key]) for name, keys in fixed.files.items()]
    if by_key:
        raise ConversionError(f"the planned files name no file for {sorted(by_key)[:5]} ({len(by_key)} keys)")
    return SavePlan([s for s in shards if s.ops], write_index=fixed.index is not None)


@dataclass
class Layout:
    """Every output file (name, header bytes, size), where each DCP tensor's rows go, the tensors the
    coordinator writes itself (kept-aside HF tensors), and the index bytes (None: no index)."""

    files: list[tuple[str, bytes, int]]
    dests: dict[str, list[Dest]]
    local: list[tuple[torch.Tensor, Dest]]
    index: bytes | None
    plan: SavePlan


def _row_bytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    return dtype.itemsize * math.prod(shape[1:]) if shape else dtype.itemsize


def _fixed_shards(ops: list[Op], mapping: Mapping[str, int]) -> SavePlan:
    """torch's ``fqn_to_index_mapping``: HF key → file index 1..N, files ``model-0000i-of-0000N``."""
    missing = [op.key for op in ops if op.key not in mapping]
    if missing:
        raise ConversionError(f"fqn_to_index_mapping has no file index for {missing[:5]} ({len(missing)} keys)")
    n = max(mapping.values(), default=0)  # as torch's writer: N counts every file the mapping names
    shards = [OutputShard(f"model-{i:05d}-of-{n:05d}.safetensors") for i in range(1, n + 1)]
    for op in ops:
        i = mapping[op.key]
        if i < 1:
            raise ConversionError(f'fqn_to_index_mapping: file index {i} of "{op.key}" must be at least 1')
        shards[i - 1].ops.append(op)
    kept = [s for s in shards if s.ops]
    return SavePlan(kept, write_index=True)


def plan_layout(
    tensors: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
    source: SourceLayout | None = None,
    *,
    fqn_to_index_mapping: Mapping[str, int] | None = None,
    max_shard_size: int | None = None,
    fixed: FixedFiles | None = None,
) -> Layout:
    """Plan every file of the save from the global ``(dtype, shape)`` of each state-dict key."""
    source = source or SourceLayout()
    meta = {k: torch.empty(shape, dtype=dtype, device="meta") for k, (dtype, shape) in tensors.items()}
    owner = {id(t): k for k, t in meta.items()}
    direct = {k: t for k, t in meta.items() if k.startswith(HF_PREFIX)}
    model = {k: t for k, t in meta.items() if k not in direct}
    if source.converter is not None:
        assert source.config is not None
        ops = source.converter.tune_to_hf_ops(model, source.config, source.aside)
    else:
        ops = [identity_op(k, t) for k, t in model.items()]
    # already-converted HF tensors take the place of the op that would have made them
    given = {k[len(HF_PREFIX) :]: identity_op(k[len(HF_PREFIX) :], t) for k, t in direct.items()}
    ops = [given.pop(op.key, op) for op in ops] + list(given.values())

    if fixed is not None:
        plan = _fixed_files(ops, fixed)
    elif fqn_to_index_mapping is not None and not source.sources:
        plan = _fixed_shards(ops, fqn_to_index_mapping)
    else:
        if fqn_to_index_mapping is not None:
            logger.warning("fqn_to_index_mapping is ignored: the shards follow the layout of the loaded checkpoint")
        plan = plan_shards(
            ops, source.sources, source.key_source,
            safe=True, had_index=source.had_index, max_shard_size=max_shard_size,
        )

    files: list[tuple[str, bytes, int]] = []
    dests: dict[str, list[Dest]] = {}
    local: list[tuple[torch.Tensor, Dest]] = []
    for shard in plan.shards:
        header, offsets = shard_header(shard)
        data_len = max((end for _, end in offsets), default=0)
        files.append((shard.name, header, len(header) + data_len))
        for op, (begin, _) in zip(shard.ops, offsets):
            rows = _checked_rows(op)
            row_bytes = _row_bytes(op.shape, op.dtype)
            for rs in rows:
                dest = Dest(shard.name, len(header) + begin, rs.dst_row, row_bytes, rs.head_dim, op.key)
                fqn = owner.get(id(rs.tensor))
                if fqn is None:  # a real tensor (kept aside at load time): the coordinator writes it
                    local.append((rs.tensor, dest))
                else:
                    dests.setdefault(fqn, []).append(dest)
    index = None
    if fixed is not None:
        index = fixed.index
    elif plan.shards and (plan.write_index or not source.sources):  # fresh layouts always get one (as torch's)
        index = index_bytes(plan, source.original_index, count_params(ops))
    return Layout(files, dests, local, index, plan)


def _checked_rows(op: Op) -> tuple[Any, ...]:
    """The op's row sources, checked to tile its output exactly (same dtype, same row bytes)."""
    if op.rows is None:
        raise ConversionError(
            f'"{op.key}": its conversion is not a row map, so it cannot be written collectively; '
            "gather the tensors it is made from first (shardwise.dcp.materialize_non_row_ops)"
        )
    total = 0
    want = _row_bytes(op.shape, op.dtype)
    for rs in op.rows:
        t = rs.tensor
        if t.dtype != op.dtype or _row_bytes(tuple(t.shape), t.dtype) != want or rs.dst_row != total:
            raise ConversionError(
                f'"{op.key}": row source {t.dtype} {tuple(t.shape)} at row {rs.dst_row} does not fit '
                f"{op.dtype} {op.shape}"
            )
        if rs.head_dim and (rs.head_dim % 2 or not t.shape or t.shape[0] != rs.heads * rs.head_dim):
            raise ConversionError(
                f'"{op.key}": shape {tuple(t.shape)} does not fit {rs.heads} heads of head_dim {rs.head_dim}'
            )
        total += t.shape[0] if t.dim() else 1
    if total != (op.shape[0] if op.shape else 1):
        raise ConversionError(f'"{op.key}": its row sources cover {total} of {op.shape[0]} rows')
    return op.rows
