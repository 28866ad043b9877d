"""Row maps and byte segments: where each byte of a rank's chunk goes in the final HF file.

A torchtune q/k projection stores each head's rows interleaved; HF stores them rotate-half. Row ``r``
of the torchtune tensor is row ``P(r)`` of the HF one (the same ``P`` for both directions)::

    P(r) = hd·⌊r/hd⌋ + (hd/2)·(r mod 2) + ⌊(r mod hd)/2⌋

Since ``P`` depends only on the global row index, every rank computes the destinations of its own
rows with no communication, whatever the world size and wherever shard boundaries cut a head.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Dest", "chunk_segments", "rope_rows"]


def rope_rows(rows: np.ndarray, head_dim: int) -> np.ndarray:
    """``P(r)`` for every global row index in ``rows`` (int64)."""
    hd = head_dim
    within = rows % hd
    return hd * (rows // hd) + (hd // 2) * (rows % 2) + within // 2


@dataclass(frozen=True)
class Dest:
    """Where a source tensor's rows go: file ``file`` (relative name), whose tensor data for this HF
    key starts at byte ``start``; source row ``r`` lands at HF row ``dst_row + r`` (or
    ``dst_row + P(r)`` when ``head_dim``); ``row_bytes`` is the byte size of one row (equal in source
    and destination)."""

    file: str
    start: int
    dst_row: int
    row_bytes: int
    head_dim: int = 0
    hf_key: str = ""


def _inner_runs(
    global_shape: Sequence[int], offsets: Sequence[int], sizes: Sequence[int], itemsize: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """The byte runs one row of a chunk covers: (dst offsets within a global row, src offsets within a
    local row, run length). The chunk spans ``sizes[d]`` from ``offsets[d]`` on every dim after dim 0."""
    inner = list(global_shape[1:])
    off = list(offsets[1:])
    sz = list(sizes[1:])
    g_strides = [itemsize * math.prod(inner[d + 1 :]) for d in range(len(inner))]
    l_strides = [itemsize * math.prod(sz[d + 1 :]) for d in range(len(inner))]
    # dims k.. are spanned whole: with the first partial dim (k-1) they form one contiguous run
    k = len(inner)
    while k > 0 and off[k - 1] == 0 and sz[k - 1] == inner[k - 1]:
        k -= 1
    if k == 0:
        return np.zeros(1, np.int64), np.zeros(1, np.int64), itemsize * math.prod(inner)
    run = sz[k - 1] * g_strides[k - 1]
    dst = np.array([off[k - 1] * g_strides[k - 1]], np.int64)
    src = np.array([0], np.int64)
    for d in reversed(range(k - 1)):  # the dims before it enumerate the runs
        idx = np.arange(sz[d], dtype=np.int64)
        dst = ((off[d] + idx)[:, None] * g_strides[d] + dst[None, :]).reshape(-1)
        src = (idx[:, None] * l_strides[d] + src[None, :]).reshape(-1)
    return dst, src, run


def chunk_segments(
    dest: Dest,
    global_shape: Sequence[int],
    offsets: Sequence[int],
    sizes: Sequence[int],
    itemsize: int,
) -> np.ndarray:
    """(src, dst, len) int64 triples writing a C-contiguous local chunk (``sizes`` at ``offsets`` of a
    tensor of ``global_shape``) to its final bytes in ``dest.file``."""
    if not global_shape:  # a scalar: one element
        return np.array([[0, dest.start, itemsize]], np.int64)
    if any(s == 0 for s in sizes):
        return np.zeros((0, 3), np.int64)
    rows = np.arange(offsets[0], offsets[0] + sizes[0], dtype=np.int64)
    hf_rows = dest.dst_row + (rope_rows(rows, dest.head_dim) if dest.head_dim else rows)
    local_row_bytes = itemsize * math.prod(sizes[1:])
    dst_in, src_in, run = _inner_runs(global_shape, offsets, sizes, itemsize)
    dst = dest.start + hf_rows[:, None] * dest.row_bytes + dst_in[None, :]
    src = np.arange(sizes[0], dtype=np.int64)[:, None] * local_row_bytes + src_in[None, :]
    out = np.empty((dst.size, 3), np.int64)
    out[:, 0] = src.reshape(-1)
    out[:, 1] = dst.reshape(-1)
    out[:, 2] = run
    return out
