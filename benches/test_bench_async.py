"""Background saves: how long a save blocks training. ``FullModelHFCheckpointer.save_checkpoint`` with
``background=True`` against the synchronous save of the same state, in 1 process (plain tensors) and
on 2 gloo ranks (FSDP2 ``fully_shard``, the collective save), into a disk folder.

Per round, interleaved: the synchronous save; then the background save's blocking time (until the
call returns: the state is staged) and its total time (until ``result()``). The first background
save allocates the staging buffers; the reported medians are of the rounds after it (buffers reused),
the first one is listed too. Peak extra anonymous memory per rank, over the rank's share of the
model. Rerun: ``.venv/bin/python -m pytest benches/test_bench_async.py -s`` (``SHARDWISE_BENCH_GB``,
``SHARDWISE_BENCH_ROUNDS``). Results: ``.benchmarks/async-<world>.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import Peak, bench_bytes, make_checkpoint, prefault

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from dist_helpers import run_ranks  # noqa: E402

ROUNDS = int(os.environ.get("SHARDWISE_BENCH_ROUNDS", "3"))


def async_rank(rank: int, world: int, src: str, root: str, names: list[str], rounds: int, size: int) -> dict:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from shardwise import FullModelHFCheckpointer

    rootp = Path(root)
    ck = FullModelHFCheckpointer(src, names, "LLAMA3", str(rootp / "out"))
    tune = ck.load_checkpoint()["model"]
    if world > 1:
        from dist_scenarios import _mesh, module_from_state_dict
        from torch.distributed.fsdp import fully_shard

        model = module_from_state_dict({k: v.clone() for k, v in tune.items()})
        fully_shard(model, mesh=_mesh(world))
        sd = model.state_dict()
    else:
        sd = {k: v.clone() for k, v in tune.items()}  # in RAM, as a training process holds them
    del tune
    local = sum((v.to_local() if isinstance(v, DTensor) else v).nbytes for v in sd.values())

    def barrier() -> None:
        if world > 1:
            dist.barrier()

    def reset() -> None:
        if rank == 0:
            shutil.rmtree(rootp / "out", ignore_errors=True)
            prefault(size)
        os.sync()
        barrier()

    times: dict[str, list[float]] = {"sync": [], "background_blocking": [], "background_total": []}
    mem = {"sync": 0, "background": 0}
    for i in range(rounds + 1):  # round 0: the first background save allocates its buffers
        reset()
        with Peak() as pk:
            t0 = time.perf_counter()
            ck.save_checkpoint({"model": sd}, epoch=i)
            barrier()
            t_sync = time.perf_counter() - t0
        mem["sync"] = max(mem["sync"], pk.extra)
        reset()
        with Peak() as pk:
            t0 = time.perf_counter()
            future = ck.save_checkpoint({"model": sd}, epoch=100 + i, background=True)
            t_block = time.perf_counter() - t0
            future.result(timeout=600)
            barrier()
            t_total = time.perf_counter() - t0
        mem["background"] = max(mem["background"], pk.extra)
        times["sync"].append(t_sync)
        times["background_blocking"].append(t_block)
        times["background_total"].append(t_total)
    return {"times": times, "mem": mem, "local_bytes": local}


@pytest.mark.parametrize("world", [1, 2])
def test_background_save_blocking_ratio(world: int, request) -> None:
    disabled = request.config.getoption("benchmark_disable", False)
    rounds = 1 if disabled else ROUNDS
    base = Path(tempfile.mkdtemp(prefix="shardwise-bench-async-", dir="/dev/shm" if disabled else None))
    try:
        size = 16 * 2**20 if disabled else bench_bytes(request.config)
        names = make_checkpoint(base / "hf", size, tiny=disabled)
        total = json.loads((base / "hf" / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
        res = run_ranks(async_rank, world, str(base / "hf"), str(base / "run"), names, rounds, total, timeout=3600)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    r0 = res[0]
    steady = {k: v[1:] for k, v in r0["times"].items()}
    med = {k: statistics.median(v) for k, v in steady.items()}
    report = {
        "world": world, "bytes": total, "rounds": rounds, "fs": "tmpfs" if disabled else "disk",
        "median_s": {k: round(v, 3) for k, v in med.items()},
        "first_background_blocking_s": round(r0["times"]["background_blocking"][0], 3),
        "all_s": {k: [round(x, 3) for x in v] for k, v in r0["times"].items()},
        "blocking_vs_sync": round(med["background_blocking"] / med["sync"], 3),
        "background_total_vs_sync": round(med["background_total"] / med["sync"], 3),
        "peak_extra_mem_over_rank_share": {
            k: round(max(res[r]["mem"][k] / res[r]["local_bytes"] for r in res), 3) for k in ("sync", "background")
        },
    }
    print("\n" + json.dumps(report, indent=2))
    assert report["median_s"]["sync"] > 0
    if not disabled:
        Path(".benchmarks").mkdir(exist_ok=True)
        Path(f".benchmarks/async-{world}.json").write_text(json.dumps(report, indent=2))
