"""Rank functions for the multi-process tests (importable for the spawn start method)."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor


def _mesh(world: int):
    return init_device_mesh("cpu", (world,))


def shard_dict(full: dict[str, torch.Tensor], world: int, placements: dict[str, str] | None = None) -> dict[str, Any]:
    """Each tensor as a DTensor (``Shard(0)`` by default; ``"1"`` → ``Shard(1)``, ``"r"`` → replicated,
    ``"plain"`` → an ordinary tensor on every rank)."""
    mesh = _mesh(world)
    out: dict[str, Any] = {}
    for k, t in full.items():
        how = (placements or {}).get(k, "0")
        if how == "plain" or t.dim() == 0:
            out[k] = t.clone()
        elif how == "r":
            out[k] = distribute_tensor(t, mesh, [Replicate()])
        else:
            out[k] = distribute_tensor(t, mesh, [Shard(int(how))])
    return out


def save_raw(rank: int, world: int, full: dict[str, torch.Tensor], out: str, placements: dict[str, str] | None,
             mapping: dict[str, int] | None = None) -> bool:
    """HF-keyed tensors through ``shardwise.dcp.save`` (no conversion, fresh layout)."""
    from shardwise import dcp as sdcp

    sd = shard_dict(full, world, placements)
    sdcp.save(sd, out, fqn_to_index_mapping=mapping)
    return True


def save_checkpointer(rank: int, world: int, ckpt_dir: str, out_dir: str, model_type: str, files: list[str],
                      placements: dict[str, str] | None = None, epoch: int = 0,
                      change: dict[str, float] | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every rank: load with FullModelHFCheckpointer, shard the torchtune state dict, save collectively."""
    from shardwise import FullModelHFCheckpointer

    ck = FullModelHFCheckpointer(ckpt_dir, files, model_type, out_dir)
    tune = ck.load_checkpoint()["model"]
    full = {k: v.clone() for k, v in tune.items()}
    for k, delta in (change or {}).items():
        full[k] = full[k] + delta
    sd = shard_dict(full, world, placements)
    state = {"model": sd, **(extra or {})}
    ck.save_checkpoint(state, epoch=epoch)
    if change is not None and epoch == 1:  # also the unchanged weights, as epoch 0, in the same run
        ck.save_checkpoint({"model": shard_dict(dict(tune), world, placements)}, epoch=0)
    return {"keys": sorted(full)}


def load_sharded(rank: int, world: int, path: str, model_type: str | None, full: dict[str, torch.Tensor],
                 placements: dict[str, str] | None = None) -> bool:
    """``shardwise.dcp.load`` into DTensors; each rank checks its local rows against ``full``."""
    from shardwise import dcp as sdcp

    template = shard_dict({k: torch.zeros_like(v) for k, v in full.items()}, world, placements)
    sdcp.load(template, path, model_type=model_type)
    check_loaded(rank, template, full)
    return True


def check_loaded(rank: int, state: dict[str, Any], expect: dict[str, torch.Tensor]) -> None:
    """Every value equals ``expect`` as a whole, and every DTensor holds exactly its own shard of it."""
    for k, v in state.items():
        got = v.full_tensor() if isinstance(v, DTensor) else v
        if not torch.equal(got, expect[k]):
            raise AssertionError(f"rank {rank}: {k} differs after load")
        if isinstance(v, DTensor):
            mine = distribute_tensor(expect[k], v.device_mesh, v.placements).to_local()
            if not torch.equal(v.to_local(), mine):
                raise AssertionError(f"rank {rank}: local shard of {k} differs")


def fail_one_rank(rank: int, world: int, full: dict[str, torch.Tensor], out: str, how: str, bad_rank: int) -> str:
    """One rank raises (or dies) inside ``write_data``; the others must get an error, not hang."""
    from shardwise import dcp as sdcp
    from shardwise.dcp.writer import HFStorageWriter

    orig = HFStorageWriter.write_data

    def write_data(self, plan, planner):  # type: ignore[no-untyped-def]
        if rank == bad_rank:
            if how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise OSError(28, "No space left on device (injected)")
        return orig(self, plan, planner)

    sd = shard_dict(full, world)
    sdcp.save(sd, out)  # the previous checkpoint, which must survive
    HFStorageWriter.write_data = write_data  # type: ignore[method-assign]
    sd = shard_dict({k: v + 1 for k, v in full.items()}, world)
    try:
        sdcp.save(sd, out)
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    return "saved"


def unshared_filesystem(rank: int, world: int, full: dict[str, torch.Tensor], out: str, other_root: str) -> str:
    """Rank 1 sees another filesystem: the save must fail clearly on every rank."""
    from shardwise import dcp as sdcp
    from shardwise.dcp.writer import HFStorageWriter

    if rank == 1:
        HFStorageWriter._rank_view = lambda self, p: Path(other_root) / p.name  # type: ignore[method-assign]
    sd = shard_dict(full, world)
    try:
        sdcp.save(sd, out)
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    return "saved"


def barrier_ok(rank: int, world: int) -> int:
    dist.barrier()
    return rank


def module_from_state_dict(sd: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A module tree whose state-dict keys are exactly ``sd``'s (floating tensors as parameters,
    integer/bool ones as buffers), for FSDP2 ``fully_shard`` tests with torchtune- or HF-style keys."""
    root = torch.nn.Module()
    for k, v in sd.items():
        *path, name = k.split(".")
        m = root
        for p in path:
            if p not in m._modules:
                m.add_module(p, torch.nn.Module())
            m = m._modules[p]
        if v.is_floating_point():
            m.register_parameter(name, torch.nn.Parameter(v.clone()))
        else:
            m.register_buffer(name, v.clone())
    return root


def fsdp_saves(rank: int, world: int, ckpt_dir: str, out_dir: str, model_type: str, files: list[str]) -> dict[str, Any]:
    """FSDP2 ``fully_shard`` on a model with torchtune keys: save unchanged (epoch 0), then with every
    parameter changed plus a sharded optimizer state (epoch 1, intermediate)."""
    from torch.distributed.fsdp import fully_shard

    from shardwise import FullModelHFCheckpointer

    ck = FullModelHFCheckpointer(ckpt_dir, files, model_type, out_dir)
    tune = ck.load_checkpoint()["model"]
    model = module_from_state_dict(tune)
    fully_shard(model, mesh=_mesh(world))
    ck.save_checkpoint({"model": model.state_dict()}, epoch=0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1)
    sd = model.state_dict()
    names = [k for k, v in sd.items() if isinstance(v, DTensor)]
    opt = {"state": {i: {"exp_avg": sd[k] * 2, "step": torch.tensor(3.0)} for i, k in enumerate(names)},
           "param_groups": [{"lr": 0.1, "params": list(range(len(names)))}]}
    g = torch.Generator().manual_seed(5)
    dim = tune["layers.0.attn.q_proj.weight"].shape[1]
    rows = tune["layers.0.attn.q_proj.weight"].shape[0]
    adapter_full = {"layers.0.attn.q_proj.lora_a.weight": torch.randn(4, dim, generator=g),
                    "layers.0.attn.q_proj.lora_b.weight": torch.randn(rows, 4, generator=g)}
    adapter = shard_dict(adapter_full, world)
    cfg = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "peft_type": "LORA"}
    ck.save_checkpoint({"model": sd, "adapter": adapter, "adapter_config": cfg, "optimizer": opt, "seed": 7,
                        "epochs_run": 1}, epoch=1, intermediate_checkpoint=True)
    full = {k: (v.full_tensor() if isinstance(v, DTensor) else v) for k, v in sd.items()}
    exp_avg = {i: full[k] * 2 for i, k in enumerate(names)}
    return {"full": full, "exp_avg": exp_avg, "adapter": adapter_full, "adapter_config": cfg} if rank == 0 else {}


def raw_cases(rank: int, world: int, cases: list[tuple[dict[str, torch.Tensor], dict[str, str]]], out: str) -> bool:
    """Several HF-keyed saves (``out/i``), then each loaded back with shardwise's reader into DTensors
    and with torch's HuggingFaceStorageReader into plain tensors."""
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint import save as dcp_save

    from shardwise import dcp as sdcp

    for i, (full, placements) in enumerate(cases):
        path = f"{out}/{i}"
        if i % 2:  # torch's own entry point with the storage writer, as with HuggingFaceStorageWriter
            dcp_save(shard_dict(full, world, placements), storage_writer=sdcp.HFStorageWriter(path))
        else:
            sdcp.save(shard_dict(full, world, placements), path)
        load_sharded(rank, world, path, None, full, placements)
        plain = {k: torch.empty_like(v) for k, v in full.items()}
        dcp_load(plain, storage_reader=HuggingFaceStorageReader(path))
        for k, v in full.items():
            if not torch.equal(plain[k], v):
                raise AssertionError(f"torch's reader: {k} differs in case {i}")
    return True


def load_into_fsdp(rank: int, world: int, path: str, model_type: str | None, expect: dict[str, torch.Tensor]) -> bool:
    """``shardwise.dcp.load`` of an HF folder straight into an FSDP2 model's shards."""
    from torch.distributed.fsdp import fully_shard

    from shardwise import dcp as sdcp

    model = module_from_state_dict({k: torch.zeros_like(v) for k, v in expect.items()})
    fully_shard(model, mesh=_mesh(world))
    sd = model.state_dict()
    sdcp.load(sd, path, model_type=model_type)
    model.load_state_dict(sd)
    check_loaded(rank, model.state_dict(), expect)
    return True


def stuck(rank: int, world: int) -> None:
    """Rank 1 waits on an event nobody sets; rank 0 waits for it at a barrier."""
    import threading

    if rank == 1:
        threading.Event().wait()
    dist.barrier()


def publish_fails_on_rank0(rank: int, world: int, ckpt_dir: str, out_dir: str, files: list[str]) -> str:
    """Rank 0 cannot stage the recipe state (disk full): every rank must get an error, none may hang."""
    import shardwise.checkpointer.collective as coll
    from shardwise import FullModelHFCheckpointer

    if rank == 0:
        def boom(*a: Any, **k: Any) -> Any:
            raise OSError(28, "No space left on device (injected)")

        coll.stage_torch_save = boom  # type: ignore[assignment]
    ck = FullModelHFCheckpointer(ckpt_dir, files, "LLAMA3", out_dir)
    tune = ck.load_checkpoint()["model"]
    sd = shard_dict(dict(tune), world)
    opt = {"state": {0: {"exp_avg": sd[next(iter(sd))]}}, "param_groups": [{"params": [0]}]}
    try:
        ck.save_checkpoint({"model": sd, "optimizer": opt, "epochs_run": 1}, epoch=0, intermediate_checkpoint=True)
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    return "saved"


def ordered_max_shard(rank: int, world: int, full: dict[str, torch.Tensor], out: str, cap: int) -> bool:
    """Plain (replicated) tensors between sharded ones with a max_shard_size: DCP's dedup hands them to
    other ranks, the split must still follow the state dict's order."""
    from shardwise import dcp as sdcp

    placements = {k: ("plain" if i % 2 else "0") for i, k in enumerate(full)}
    sdcp.save(shard_dict(full, world, placements), out, max_shard_size=cap)
    return True


def background_collective(rank: int, world: int, ckpt_dir: str, out_bg: str, out_sync: str, files: list[str]) -> str:
    """A collective background save (model and a sharded optimizer state), the values changed right
    after the call; then the same values saved synchronously elsewhere, to compare."""
    from shardwise import FullModelHFCheckpointer

    bg = FullModelHFCheckpointer(ckpt_dir, files, "LLAMA3", out_bg)
    tune = dict(bg.load_checkpoint()["model"])
    sd = shard_dict(tune, world)
    first = next(iter(sd))
    exp_avg = shard_dict({"m": torch.ones_like(tune[first])}, world)["m"]
    opt = {"state": {first: {"exp_avg": exp_avg, "step": torch.tensor(3.0)}}, "param_groups": [{"lr": 0.1}]}
    future = bg.save_checkpoint({"model": sd, "optimizer": opt, "epochs_run": 1}, epoch=0,
                                intermediate_checkpoint=True, background=True)
    assert future is not None
    for v in sd.values():  # the next step, at once
        v.to_local().add_(1)
    exp_avg.to_local().mul_(5)
    future.result(timeout=120)
    sync = FullModelHFCheckpointer(ckpt_dir, files, "LLAMA3", out_sync)
    sync.save_checkpoint({"model": shard_dict(tune, world), "optimizer": {
        "state": {first: {"exp_avg": shard_dict({"m": torch.ones_like(tune[first])}, world)["m"],
                          "step": torch.tensor(3.0)}}, "param_groups": [{"lr": 0.1}]}, "epochs_run": 1},
        epoch=0, intermediate_checkpoint=True)
    resumed = FullModelHFCheckpointer(ckpt_dir, files, "LLAMA3", out_bg, should_load_recipe_state=True)
    state = resumed.load_checkpoint()
    assert torch.equal(state["optimizer"]["state"][first]["exp_avg"], torch.ones_like(tune[first]))
    assert state["epochs_run"] == 1
    return "ok"


def async_saves(rank: int, world: int, full: dict[str, torch.Tensor], out_a: str, out_b: str) -> str:
    """Two background saves; the shards change right after each call returns."""
    from shardwise import dcp as sdcp

    sd = shard_dict(full, world, {"ids": "plain"})
    first = sdcp.async_save(sd, out_a)
    for v in sd.values():  # the next step changes the values at once
        local = v.to_local() if isinstance(v, DTensor) else v
        if local.is_floating_point():
            local.mul_(2)
        else:
            local.add_(1)
    second = sdcp.async_save(sd, out_b)  # waits for the first
    assert first.done()
    for v in sd.values():
        local = v.to_local() if isinstance(v, DTensor) else v
        local.zero_()
    second.result(timeout=120)
    dist.barrier()
    return "ok"
