"""Background saves: the state is copied into staging buffers kept from save to save (pinned host
memory when the tensors are on CUDA), then written by one background thread while training goes on.

At most one save is in flight per process: the next one waits for it first (and raises its error
if nobody has seen it yet), so the buffers are never overwritten while a write still reads them and
memory stays bounded to one copy of what this rank holds.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from .errors import CheckpointError

__all__ = ["SaveFuture", "Stager", "submit", "wait_for_previous"]


class SaveFuture:
    """The handle of a background save: ``result()`` waits for it and raises its error, ``done()``
    tells whether it has finished. The checkpoint is published only when the save completes."""

    def __init__(self, future: Future[Any], where: str) -> None:
        self._future = future
        self.where = where
        self._seen = False

    def done(self) -> bool:
        """True once the background write has finished (published, or failed)."""
        return self._future.done()

    def result(self, timeout: float | None = None) -> None:
        """Wait for the save (at most ``timeout`` seconds: ``TimeoutError``); raises its error."""
        try:
            self._future.result(timeout)
        except TimeoutError:
            raise
        except BaseException:
            self._seen = True
            raise
        self._seen = True

    def add_done_callback(self, fn: Callable[[SaveFuture], Any]) -> None:
        """Call ``fn(self)`` when the save has finished (at once if it has), as ``Future`` does."""
        self._future.add_done_callback(lambda _: fn(self))

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The save's error (None when it succeeded), waiting at most ``timeout`` seconds."""
        e = self._future.exception(timeout)
        self._seen = True
        return e

    def _raise_unseen(self) -> None:
        """Wait; an error nobody has seen through ``result()`` is raised here (by the next save)."""
        try:
            self._future.result()
        except BaseException as e:
            if not self._seen:
                self._seen = True
                raise CheckpointError(f"the previous background save to {self.where} failed: {e}") from e


_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None
_in_flight: SaveFuture | None = None


def wait_for_previous() -> None:
    """Block until this process's background save (if any) has finished; raise its unseen error."""
    with _lock:
        previous = _in_flight
    if previous is not None:
        previous._raise_unseen()


def submit(fn: Callable[[], Any], where: str) -> SaveFuture:
    """Run ``fn`` (the write of staged state) on the background thread; call after ``wait_for_previous``."""
    global _executor, _in_flight
    with _lock:
        if _executor is None:  # not a daemon: an interpreter exiting waits for the save to publish
            _executor = ThreadPoolExecutor(1, thread_name_prefix="shardwise-save")
        future = SaveFuture(_executor.submit(fn), where)
        _in_flight = future
    return future


class Stager:
    """Copies of a state dict into buffers reused from save to save: the same key with the same shape,
    dtype and layout gets the same buffer again, anything else a new one (the old one is dropped).
    DTensors are staged as their local shard, wrapped again with their mesh and placements; values
    that are not tensors are deep-copied."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}
        self._used: set[str] = set()
        self._copies: list[tuple[torch.Tensor, torch.Tensor]] = []

    def stage(self, state: Any) -> Any:
        """A copy of ``state`` that later changes to ``state`` do not reach (tensors in host memory)."""
        self._used = set()
        cuda = False

        def visit(obj: Any, path: str) -> Any:
            nonlocal cuda
            if isinstance(obj, torch.Tensor):
                cuda = cuda or obj.device.type == "cuda"
                return self._tensor(obj, path)
            if isinstance(obj, Mapping):
                out = type(obj)() if isinstance(obj, dict) else {}  # keeps OrderedDict
                for k, v in obj.items():
                    out[k] = visit(v, f"{path}/{k}")
                return out
            if isinstance(obj, (list, tuple)):
                items = [visit(v, f"{path}/{i}") for i, v in enumerate(obj)]
                return type(obj)(items) if not hasattr(obj, "_fields") else type(obj)(*items)
            return copy.deepcopy(obj)

        self._copies = []
        out = visit(state, "")
        _copy_all(self._copies)
        self._copies = []
        if cuda:
            torch.cuda.synchronize()  # the pinned copies are complete before the caller goes on
        for stale in set(self._buffers) - self._used:
            del self._buffers[stale]
        return out

    def _buffer(self, like: torch.Tensor, path: str) -> torch.Tensor:
        buf = self._buffers.get(path)
        if buf is None or buf.shape != like.shape or buf.dtype != like.dtype:
            pin = like.device.type == "cuda"
            buf = torch.empty(like.shape, dtype=like.dtype, device="cpu", pin_memory=pin)
            self._buffers[path] = buf
        self._used.add(path)
        return buf

    def _tensor(self, t: torch.Tensor, path: str) -> torch.Tensor:
        import sys

        if "torch.distributed.tensor" in sys.modules:
            from torch.distributed.tensor import DTensor

            if isinstance(t, DTensor):
                local = t.to_local()
                buf = self._buffer(local, path)
                self._copies.append((buf, local.detach()))
                return DTensor.from_local(buf, t.device_mesh, t.placements, run_check=False,
                                          shape=t.shape, stride=t.stride())
        if t.is_meta or t.layout != torch.strided:
            return t  # nothing to copy (the save itself reports it)
        buf = self._buffer(t, path)
        self._copies.append((buf, t.detach()))
        return buf


#: host copies run in slices of this size on a few threads (``copy_`` releases the GIL): one thread
#: copies at about a third of what two reach on this project's VM
_SLICE = 32 * 2**20


def _copy_all(copies: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """``dst.copy_(src)`` for every pair; contiguous host tensors in slices on a small thread pool."""
    import os

    jobs: list[tuple[torch.Tensor, torch.Tensor]] = []
    for dst, src in copies:
        if src.device.type == "cuda":
            dst.copy_(src, non_blocking=True)  # pinned: asynchronous, synchronized by the caller
        elif src.is_contiguous() and dst.is_contiguous() and src.numel() > 0:
            d, s = dst.view(-1).view(torch.uint8), src.view(-1).view(torch.uint8)
            jobs += [(d[i : i + _SLICE], s[i : i + _SLICE]) for i in range(0, d.numel(), _SLICE)]
        else:
            dst.copy_(src)
    workers = min(4, os.cpu_count() or 1, len(jobs))
    if workers <= 1:
        for d, s in jobs:
            d.copy_(s)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="shardwise-stage") as pool:
        list(pool.map(lambda job: job[0].copy_(job[1]), jobs))
