"""Sizes as users write them (``max_shard_size="5GB"``) and as logs print them."""

from __future__ import annotations

import re

__all__ = ["gib", "parse_size"]

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str | None) -> int | None:
    """``5_000_000_000``, ``"5GB"`` or ``"500MiB"`` → bytes (HF's convention: GB = 10**9)."""
    if size is None or isinstance(size, int):
        if isinstance(size, int) and size <= 0:
            raise ValueError(f"max_shard_size must be positive, got {size}")
        return size
    m = _SIZE.match(str(size))
    if not m:
        raise ValueError(f"max_shard_size {size!r} is not a size like 5GB or 500MiB")
    n = int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])
    if n <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return n


def gib(n: int) -> str:
    """Bytes in GiB with two decimals, as torchtune logs checkpoint sizes."""
    return f"{n / 1024**3:.2f} GiB"
