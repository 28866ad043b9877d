"""Distributed save/load on 2 CPU ranks (gloo, FSDP2 ``fully_shard``): shardwise's collective save
against gather → rank-0 save, torch's ``HuggingFaceStorageWriter`` + consolidation, plain DCP
``FileSystemWriter`` (``.distcp``, not HF-loadable) and a parallel copy of the final files; loads
against ``HuggingFaceStorageReader`` and ``FileSystemReader``.

Variants run interleaved in one run, each after a barrier, a prefault of the model size and
``os.sync()``; reported as ratios of medians, with per-rank peak extra anonymous memory and bytes on
disk. Rerun: ``make bench-dcp`` (``SHARDWISE_BENCH_GB``, default 1; rounds with
``SHARDWISE_BENCH_ROUNDS``). Results: ``.benchmarks/dcp-<fs>.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import Peak, make_checkpoint, prefault

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from dist_helpers import run_ranks  # noqa: E402

ROUNDS = int(os.environ.get("SHARDWISE_BENCH_ROUNDS", "3"))
SAVES = ["shardwise", "gather_rank0", "torch_hf_consolidate", "dcp_distcp", "copy"]
LOADS = ["shardwise_load", "torch_hf_load", "dcp_distcp_load"]


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def bench_rank(rank: int, world: int, src: str, root: str, names: list[str], rounds: int, size: int) -> dict:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from dist_scenarios import _mesh, module_from_state_dict
    from torch.distributed.checkpoint import (
        FileSystemReader,
        FileSystemWriter,
        HuggingFaceStorageReader,
        HuggingFaceStorageWriter,
    )
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from shardwise import FullModelHFCheckpointer
    from shardwise import dcp as sdcp

    srcp, rootp = Path(src), Path(root)
    ck = FullModelHFCheckpointer(src, names, "LLAMA3", str(rootp / "sw"))
    tune = ck.load_checkpoint()["model"]
    model = module_from_state_dict({k: v.clone() for k, v in tune.items()})
    fully_shard(model, mesh=_mesh(world))
    del tune
    sd = model.state_dict()
    local_bytes = sum(v.to_local().nbytes for v in sd.values() if isinstance(v, DTensor))
    # torch's HF writer takes HF key names (it converts nothing; given here without the q/k permutation)
    metas = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in sd.items()}
    owner = {id(t): k for k, t in metas.items()}
    ops = ck._converter.tune_to_hf_ops(metas, ck._config, {})
    hf_sd = {op.key: sd[owner[id(op.rows[0].tensor)]] for op in ops if op.rows}
    index = json.loads((srcp / "model.safetensors.index.json").read_text())["weight_map"]
    mapping = {k: names.index(v) + 1 for k, v in index.items() if k in hf_sd}

    def reset(path: Path) -> None:
        if rank == 0:
            shutil.rmtree(path, ignore_errors=True)
            path.parent.mkdir(parents=True, exist_ok=True)
            prefault(size)
        os.sync()
        dist.barrier()

    def save_shardwise(i: int) -> Path:
        ck.save_checkpoint({"model": sd}, epoch=i)
        return rootp / "sw" / f"epoch_{i}"

    def save_gather(i: int) -> Path:
        full = {}
        for k, v in sd.items():  # what torchtune's gather_cpu_state_dict does: full_tensor + barrier per key
            t = v.full_tensor()
            if rank == 0:
                full[k] = t
            dist.barrier()
        if rank == 0:
            ck.save_checkpoint({"model": full}, epoch=100 + i)
        dist.barrier()
        return rootp / "sw" / f"epoch_{100 + i}"

    def save_torch_hf(i: int) -> Path:
        out = rootp / f"torchhf_{i}"
        dcp.save(hf_sd, storage_writer=HuggingFaceStorageWriter(str(out), fqn_to_index_mapping=mapping,
                                                                 save_distributed=True, enable_consolidation=True))
        return out

    def save_distcp(i: int) -> Path:
        out = rootp / f"distcp_{i}"
        dcp.save(sd, storage_writer=FileSystemWriter(str(out)))
        return out

    def save_copy(i: int) -> Path:
        out = rootp / f"copy_{i}"
        if rank == 0:
            out.mkdir(parents=True)
        dist.barrier()
        mine = [n for j, n in enumerate(names) if j % world == rank]
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda n: shutil.copyfile(srcp / n, out / n), mine))
        for n in mine:
            fd = os.open(out / n, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        return out

    savers = {"shardwise": save_shardwise, "gather_rank0": save_gather, "torch_hf_consolidate": save_torch_hf,
              "dcp_distcp": save_distcp, "copy": save_copy}
    times: dict[str, list[float]] = {k: [] for k in SAVES + LOADS}
    mem: dict[str, int] = {k: 0 for k in SAVES + LOADS}
    disk: dict[str, int] = {}
    last: dict[str, Path] = {}
    for i in range(rounds):
        for name in SAVES:
            reset(rootp / "x")
            with Peak() as pk:
                t0 = time.perf_counter()
                out = savers[name](i)
                dist.barrier()
                dt = time.perf_counter() - t0
            times[name].append(dt)
            mem[name] = max(mem[name], pk.extra)
            if rank == 0:
                disk[name] = _du(out)
                if name == "shardwise":  # exactness of what was timed: the input, byte for byte
                    for n in names:
                        assert (out / n).read_bytes() == (srcp / n).read_bytes()
                if name != "dcp_distcp":
                    shutil.rmtree(out, ignore_errors=True)
                elif name in last:
                    shutil.rmtree(last[name], ignore_errors=True)
            last[name] = out
            dist.barrier()
        template = model.state_dict()
        hf_template = {k: torch.zeros_like(v) for k, v in hf_sd.items()}
        loaders = {
            "shardwise_load": lambda t=template: sdcp.load(t, src, model_type="LLAMA3"),
            "torch_hf_load": lambda t=hf_template: dcp.load(t, storage_reader=HuggingFaceStorageReader(src)),
            "dcp_distcp_load": lambda t=template: dcp.load(
                t, storage_reader=FileSystemReader(str(last["dcp_distcp"]))
            ),
        }
        for name in LOADS:
            reset(rootp / "x")
            with Peak() as pk:
                t0 = time.perf_counter()
                loaders[name]()
                dist.barrier()
                dt = time.perf_counter() - t0
            times[name].append(dt)
            mem[name] = max(mem[name], pk.extra)
    return {"times": times, "mem": mem, "disk": disk, "local_bytes": local_bytes}


def test_distributed_save_load_ratios(checkpoint, request, tmp_path_factory):
    fs, tmp, names, _ = checkpoint
    disabled = request.config.getoption("benchmark_disable", False)
    if disabled and fs != "tmpfs":
        pytest.skip("the smoke pass runs the distributed bench on tmpfs only")
    rounds = 1 if disabled else ROUNDS
    if disabled:  # the smoke pass: the same code on a tiny checkpoint of its own
        tmp = tmp_path_factory.mktemp("dcp-smoke")
        names = make_checkpoint(tmp / "hf", 16 * 2**20, tiny=True)
    size = json.loads((tmp / "hf" / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    root = tmp / "dcp"
    res = run_ranks(bench_rank, 2, str(tmp / "hf"), str(root), names, rounds, size, timeout=3600)
    shutil.rmtree(root, ignore_errors=True)
    r0 = res[0]
    med = {k: statistics.median(v) for k, v in r0["times"].items()}
    report = {
        "fs": fs, "bytes": size, "rounds": rounds, "world": 2,
        "median_s": {k: round(v, 3) for k, v in med.items()},
        "all_s": {k: [round(x, 3) for x in v] for k, v in r0["times"].items()},
        "shardwise_vs_distcp": med["shardwise"] / med["dcp_distcp"],
        "torch_hf_vs_shardwise": med["torch_hf_consolidate"] / med["shardwise"],
        "gather_vs_shardwise": med["gather_rank0"] / med["shardwise"],
        "shardwise_vs_copy": med["shardwise"] / med["copy"],
        "torch_hf_load_vs_shardwise_load": med["torch_hf_load"] / med["shardwise_load"],
        "disk_over_model": {k: round(v / size, 3) for k, v in r0["disk"].items()},
        "peak_extra_mem_over_rank_shard": {
            k: round(max(res[r]["mem"][k] / res[r]["local_bytes"] for r in res), 4) for k in SAVES + LOADS
        },
    }
    print("\n" + json.dumps(report, indent=2))
    assert set(report["disk_over_model"]) == set(SAVES)
    if not disabled:
        Path(".benchmarks").mkdir(exist_ok=True)
        Path(f".benchmarks/dcp-{fs}.json").write_text(json.dumps(report, indent=2))
