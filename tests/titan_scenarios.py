"""Rank functions for the torchtitan integration (importable for spawn): torchtitan's llama3 debug
model and state-dict adapter under FSDP2, at the ``CheckpointManager`` level."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor


def debug_model(world: int, seed: int) -> tuple[Any, Any]:
    """torchtitan's llama3 ``debugmodel`` built on meta, sharded with ``fully_shard``, initialised."""
    from torch.distributed.fsdp import fully_shard
    from torchtitan.models.llama3 import model_registry

    spec = model_registry("debugmodel")
    with torch.device("meta"):
        model = spec.model.build()
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.layers.values() if isinstance(model.layers, torch.nn.ModuleDict) else model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device="cpu")
    torch.manual_seed(seed)
    with torch.no_grad():
        model.init_weights(buffer_device=None)
    return spec, model


def full(model: Any) -> dict[str, torch.Tensor]:
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v.clone()) for k, v in model.state_dict().items()}


def write_assets(root: Path, keys: list[str]) -> Path:
    """An ``hf_assets_path`` whose index puts the first half of the keys in file 1, the rest in file 2
    (the adapter's ``fqn_to_index_mapping``, as for a real multi-file model)."""
    assets = root / "assets"
    assets.mkdir(parents=True, exist_ok=True)
    half = len(keys) // 2
    weight_map = {k: f"model-0000{1 if i < half else 2}-of-00002.safetensors" for i, k in enumerate(keys)}
    (assets / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return assets


def manager(cls: Any, model: Any, spec: Any, root: str, folder: str, assets: Path | None, **cfg: Any) -> Any:
    from torchtitan.components.optimizer.optimizer import default_adamw

    adapter = spec.state_dict_adapter(spec.model, str(assets) if assets else None)
    optimizers = default_adamw(lr=1e-3, implementation="for-loop").build(model_parts=[model])
    config = cls.Config(enable=True, folder=folder, **cfg)
    return config.build(dataloader=None, model_parts=[model], optimizers=optimizers, lr_schedulers=None,
                        states={}, sd_adapter=adapter, base_folder=root), optimizers


def hf_save_load(rank: int, world: int, root: str) -> dict[str, Any]:
    """torchtitan's own last-step HF save and shardwise's (sync and async), then an HF initial load
    through shardwise into a differently initialised model, and one training step after it."""
    from torchtitan.components.checkpointer import AsyncMode, CheckpointManager

    from shardwise.torchtitan import ShardwiseCheckpointManager

    spec, model = debug_model(world, seed=0)
    want = full(model)
    hf_keys = list(spec.state_dict_adapter(spec.model, None).to_hf(model.state_dict()))
    assets = write_assets(Path(root), hf_keys) if rank == 0 else Path(root) / "assets"
    dist.barrier()
    common = {"last_save_in_hf": True, "last_save_model_only": True, "export_dtype": "float32"}
    theirs, _ = manager(CheckpointManager, model, spec, root, "theirs", assets, **common)
    theirs.save(curr_step=3, last_step=True)
    theirs.close()
    ours, _ = manager(ShardwiseCheckpointManager, model, spec, root, "ours", assets, async_mode="async", **common)
    ours.save(curr_step=3, last_step=True)
    fut = ours.dcp_save(ours.states["model"].state_dict(), str(Path(root) / "ours_async"), AsyncMode.ASYNC,
                        to_hf=True)
    fut.result(timeout=120)
    ours.close()
    dist.barrier()

    _, fresh = debug_model(world, seed=1)
    before = full(fresh)
    loader, optimizers = manager(ShardwiseCheckpointManager, fresh, spec, root, "resume", assets,
                                 initial_load_path=str(Path(root) / "ours" / "step-3"), initial_load_in_hf=True,
                                 initial_load_model_only=True)
    assert loader.load(), "nothing was loaded"
    loaded = full(fresh)
    tokens = torch.arange(256).reshape(2, 128) % 2048
    positions = torch.arange(128).repeat(2, 1)

    def logits(m: Any) -> torch.Tensor:
        with torch.no_grad():
            return m(tokens, positions=positions, attention_masks=m.get_attention_masks(positions))

    same_logits = torch.equal(logits(fresh), logits(model))
    # a training step on the loaded weights: torchtitan's llama3 attends with FlexAttention only, which
    # has no backward on the CPU, so the step takes synthetic gradients
    for p in fresh.parameters():
        p.grad = torch.ones_like(p)
    optimizers.step()
    after = full(fresh)
    loader.close()
    return {
        "loaded_equal": all(torch.equal(loaded[k], want[k]) for k in want),
        "fresh_differed": any(not torch.equal(before[k], want[k]) for k in want),
        "same_logits": same_logits,
        "trained": any(not torch.equal(after[k], loaded[k]) for k in want),
        "want": want if rank == 0 else None,
    }
