"""Run a function on N spawned CPU ranks (gloo over 127.0.0.1), every wait bounded.

``run_ranks(fn, world, *args)`` starts ``world`` processes, each initialises a gloo process group and
calls ``fn(rank, world, *args)``; it returns the per-rank results, or raises ``RankFailed`` naming the
rank that raised, died or did not finish in time (the others are killed, so a stuck rank fails the
test instead of hanging CI). ``fn`` must be importable (module level) for the spawn start method.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import queue
import socket
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

#: a collective that waits longer than this raises inside the rank
PG_TIMEOUT_S = 60.0


class RankFailed(AssertionError):
    def __init__(self, msg: str, results: dict[int, Any]) -> None:
        super().__init__(msg)
        self.results = results


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn: Callable[..., Any], rank: int, world: int, port: int, args: tuple[Any, ...], q: Any) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
            timeout=timedelta(seconds=PG_TIMEOUT_S),
        )
        try:
            out = fn(rank, world, *args)
        finally:
            try:
                dist.destroy_process_group()
            except Exception:
                pass
        # tensors would travel as shared-memory handles that die with this process: send bytes
        buf = io.BytesIO()
        torch.save(out, buf)
        q.put((rank, "ok", buf.getvalue()))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        q.put((rank, "error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


def _decode(raw: bytes) -> Any:
    import torch

    return torch.load(io.BytesIO(raw), weights_only=False)


def run_ranks(
    fn: Callable[..., Any], world: int, *args: Any, timeout: float = 180.0, allow_errors: bool = False
) -> dict[int, Any]:
    """Results by rank (with ``allow_errors``, failures come back as ``("error", text)`` / ``("died", code)``)."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world, port, args, q), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    import time

    deadline = time.monotonic() + timeout
    try:
        while len(results) < world:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                rank, status, out = q.get(timeout=min(left, 1.0))
            except queue.Empty:
                for r, p in enumerate(procs):
                    if r not in results and not p.is_alive() and p.exitcode not in (0, None):
                        results[r] = ("died", p.exitcode)
                continue
            results[rank] = _decode(out) if status == "ok" else ("error", out)
    finally:
        for p in procs:
            p.join(timeout=max(0.1, min(10.0, deadline - time.monotonic())))
            if p.is_alive():
                p.kill()
                p.join(5)
    missing = [r for r in range(world) if r not in results]
    if missing:
        raise RankFailed(f"ranks {missing} did not finish within {timeout:.0f} s; got {results}", results)
    bad = {r: v for r, v in results.items() if isinstance(v, tuple) and v and v[0] in ("error", "died")}
    if bad and not allow_errors:
        raise RankFailed("; ".join(f"rank {r}: {v[1]}" for r, v in sorted(bad.items())), results)
    return results
