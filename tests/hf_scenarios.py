"""Rank functions for ``shardwise.hf`` under FSDP2 / tensor parallel (importable for spawn)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

FAMILIES = ("llama", "qwen2", "gemma2", "mistral", "phi3")


def build(family: str, tie: bool, seed: int = 0) -> Any:
    """A tiny transformers causal LM of ``family`` (random weights from ``seed``)."""
    import transformers

    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
           "gemma2": transformers.Gemma2Config, "mistral": transformers.MistralConfig,
           "phi3": transformers.Phi3Config}[family]
    cfg = cls(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, tie_word_embeddings=tie, pad_token_id=0, bos_token_id=1,
              eos_token_id=2)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # transformers zero-initialises norms and biases: make every value count
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def inputs() -> torch.Tensor:
    return torch.arange(12).reshape(2, 6) % 128


def logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(inputs()).logits


def shard(model: Any, mesh: Any) -> Any:
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def fsdp_save_load(rank: int, world: int, family: str, tie: bool, ref: str, out: str, sizes: list[str]) -> Any:
    """Rank 0 saves the unsharded model with transformers (``ref/<size>``); then every rank shards it
    with ``fully_shard`` and saves with shardwise (``out/<size>``); a differently initialised sharded
    model then loads the output back. Returns the original logits and the reloaded model's."""
    from shardwise import hf

    model = build(family, tie)
    want = logits(model)
    if rank == 0:
        for size in sizes:
            model.save_pretrained(Path(ref) / size, max_shard_size=size)
    dist.barrier()
    mesh = init_device_mesh("cpu", (world,))
    shard(model, mesh)
    for size in sizes:
        hf.save_pretrained(model, Path(out) / size, max_shard_size=size)
    other = shard(build(family, tie, seed=1), mesh)
    hf.load_pretrained(other, Path(out) / sizes[-1])
    got = logits(other)
    tied = other.lm_head.weight is other.model.embed_tokens.weight
    return {"want": want, "got": got, "tied": tied}


def tp_plan_mesh(rank: int, world: int, family: str, ref: str, out: str) -> Any:
    """A 2-D mesh: the model's own tensor-parallel plan (``config.base_model_tp_plan``, applied with
    torch's ``parallelize_module``) on the inner dimension, FSDP2 on the outer. Saves, then loads into a
    second 2-D model; returns whether every full parameter came back."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from shardwise import hf

    model = build(family, False)
    if rank == 0:
        model.save_pretrained(ref)
    dist.barrier()
    full = {k: v.clone() for k, v in model.state_dict().items()}
    mesh = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("dp", "tp"))
    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}

    def distribute(m: Any) -> Any:
        plan = {f"model.{k}": styles[v]() for k, v in m.config.base_model_tp_plan.items() if v in styles}
        parallelize_module(m, mesh["tp"], plan)
        return shard(m, mesh["dp"])

    distribute(model)
    kinds = {tuple(str(p) for p in v.placements) for v in model.state_dict().values() if isinstance(v, DTensor)}
    hf.save_pretrained(model, out)
    other = distribute(build(family, False, seed=1))
    hf.load_pretrained(other, out)
    back = {k: (v.full_tensor() if isinstance(v, DTensor) else v) for k, v in other.state_dict().items()}
    same = all(torch.equal(back[k], full[k]) for k in full)
    return {"same": same, "placements": sorted(kinds)}


def bad_loads(rank: int, world: int, family: str, path: str) -> list[str]:
    """``load_pretrained`` of a folder missing a weight, and of one with a foreign tensor: the error text."""
    from shardwise import hf

    mesh = init_device_mesh("cpu", (world,))
    errors = []
    for case in ("missing", "unexpected"):
        model = shard(build(family, False), mesh)
        try:
            hf.load_pretrained(model, Path(path) / case)
        except Exception as e:  # noqa: BLE001 - the text is the result
            errors.append(f"{type(e).__name__}: {e}")
        else:
            errors.append("no error")
    return errors
