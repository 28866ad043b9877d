"""Rank functions for tests/test_torchtune_dist.py: torchtune 0.6.1's ``CheckpointClient`` driving
``shardwise.torchtune.DistributedHFCheckpointer`` the way ``full_finetune_distributed`` does (importable
for the spawn start method; torchtune is imported inside the functions)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

#: the tiny model: HF config (written by transformers) and the matching torchtune llama3 builder
HF_CONFIG: dict[str, Any] = dict(
    vocab_size=97, hidden_size=32, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=500000.0,
    tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
SEQ = 12
BATCH = 2
LR = 1e-2


def build_tune_model() -> torch.nn.Module:
    from torchtune.models.llama3 import llama3

    c = HF_CONFIG
    return llama3(
        vocab_size=c["vocab_size"], num_layers=c["num_hidden_layers"], num_heads=c["num_attention_heads"],
        num_kv_heads=c["num_key_value_heads"], embed_dim=c["hidden_size"], max_seq_len=c["max_position_embeddings"],
        intermediate_dim=c["intermediate_size"], norm_eps=c["rms_norm_eps"], rope_base=int(c["rope_theta"]),
    )


def batch(epoch: int, step: int, rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * epoch + 10 * step + rank)
    return torch.randint(0, HF_CONFIG["vocab_size"], (BATCH, SEQ), generator=g)


def _forbid(*_: Any, **__: Any) -> Any:
    raise AssertionError("CheckpointClient gathered the state dict: DistributedHFCheckpointer was not seen "
                         "as a DistributedCheckpointer")


def _cfg(ckpt_dir: str, files: list[str], out_dir: str, resume: bool) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.create({
        "device": "cpu",
        "resume_from_checkpoint": resume,
        "checkpointer": {
            "_component_": "shardwise.torchtune.DistributedHFCheckpointer",
            "checkpoint_dir": ckpt_dir, "checkpoint_files": files, "model_type": "LLAMA3",
            "output_dir": out_dir, "recipe_checkpoint": None,
        },
    })


def _setup(ckpt: dict[str, Any], world: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """``full_finetune_distributed._setup_model`` / ``_setup_optimizer`` in miniature (FSDP2 on CPU)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torchtune import training
    from torchtune.modules import TransformerSelfAttentionLayer

    with torch.device("meta"):
        model = build_tune_model()
    mesh = init_device_mesh("cpu", (world,))
    training.shard_model(model, [lambda n, m: isinstance(m, TransformerSelfAttentionLayer)],
                         cpu_offload=False, dp_mesh=mesh)
    with torch.device("cpu"):
        for m in model.modules():
            if hasattr(m, "rope_init"):
                m.rope_init()
    training.load_from_full_model_state_dict(model, ckpt["model"], torch.device("cpu"), strict=True)
    training.validate_no_params_on_meta_device(model)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    if training.OPT_KEY in ckpt:
        training.load_from_full_optimizer_state_dict(model, opt, ckpt[training.OPT_KEY], torch.device("cpu"))
    return model, opt


def _train_epoch(model: torch.nn.Module, opt: torch.optim.Optimizer, epoch: int, steps: int, rank: int) -> list[float]:
    losses = []
    for step in range(steps):
        tokens = batch(epoch, step, rank)
        logits = model(tokens)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def _full_optimizer(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))


def _refusals(model_sd: dict[str, Any], opt_sd: dict[str, Any]) -> list[str]:
    """The name matching refuses (never guesses) when the optimizer's order cannot be the model's."""
    from shardwise.torchtune import OptimizerKeyError, optimizer_state_by_name

    cases = {
        "reversed": dict(reversed(list(model_sd.items()))),
        "dropped": {k: v for i, (k, v) in enumerate(model_sd.items()) if i != 3},
    }
    refused = []
    for name, sd in cases.items():
        try:
            optimizer_state_by_name(opt_sd, sd)
        except OptimizerKeyError:
            refused.append(name)
    return refused


def run_and_save(rank: int, world: int, ckpt_dir: str, files: list[str], out_dir: str, single_dir: str,
                 epochs: int, steps: int, stash: str) -> dict[str, Any]:
    """The uninterrupted run: train ``epochs`` epochs, saving through the client after each (all but the
    last intermediate, with the optimizer). Returns this rank's losses by epoch and checks made here."""
    from torch.distributed.tensor import DTensor
    from torchtune import training
    from torchtune.training.checkpointing._checkpoint_client import CheckpointClient, TrainingProgress

    from shardwise import FullModelHFCheckpointer
    from shardwise.torchtune import DistributedHFCheckpointer, optimizer_state_by_name

    training.gather_cpu_state_dict = _forbid
    training.get_full_optimizer_state_dict = _forbid
    client = CheckpointClient(_cfg(ckpt_dir, files, out_dir, resume=False))
    ckpt = client.load_base_checkpoint()
    assert isinstance(client._get_checkpointer(), DistributedHFCheckpointer)
    model, opt = _setup(ckpt, world)
    losses: dict[int, list[float]] = {}
    out: dict[str, Any] = {}
    for epoch in range(epochs):
        losses[epoch] = _train_epoch(model, opt, epoch, steps, rank)
        progress = TrainingProgress(seed=0, epochs_run=epoch + 1, total_epochs=epochs, max_steps_per_epoch=steps)
        client.save_checkpoint(model=model, optimizer=opt, training_progress=progress, epoch=epoch)
        if epoch == epochs - 2:  # the recipe state a resume will start from: torch's own full form
            full_opt = _full_optimizer(model, opt)
            by_name = optimizer_state_by_name(opt.state_dict(), model.state_dict())
            out["same_names"] = sorted(by_name["state"]) == sorted(full_opt["state"]) and [
                g["params"] for g in by_name["param_groups"]] == [g["params"] for g in full_opt["param_groups"]]
            out["refused"] = _refusals(model.state_dict(), opt.state_dict())
            # torch's sharded, name-keyed form (what a LoRA recipe can pass) goes through untouched
            from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

            dsd = get_optimizer_state_dict(model, opt)
            kept = optimizer_state_by_name(dsd, model.state_dict())
            out["dsd_kept"] = kept["state"] is dsd["state"] and all(
                isinstance(v, DTensor) for st in dsd["state"].values() for v in st.values() if v.dim())
            if rank == 0:
                torch.save(full_opt, stash)
    full = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in model.state_dict().items()}
    if rank == 0:  # the same weights through the single-process save
        single = FullModelHFCheckpointer(ckpt_dir, files, "LLAMA3", single_dir)
        single.save_checkpoint({"model": full}, epoch=epochs - 1)
    dist.barrier()
    out["losses"] = losses
    return out


def _local(t: Any) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _same(got: torch.Tensor, want: torch.Tensor, rank: int) -> bool:
    """Rank 0 holds the full values; the other ranks zero placeholders that take no memory (scalars
    real): the recipe takes the optimizer state from rank 0."""
    if rank == 0 or want.dim() == 0:
        return torch.equal(got, want)
    return set(got.stride()) == {0} and got.shape == want.shape and got.dtype == want.dtype and not got.any()


def resume(rank: int, world: int, ckpt_dir: str, files: list[str], out_dir: str, epochs: int, steps: int,
           stash: str) -> dict[str, Any]:
    """A fresh run with ``resume_from_checkpoint: True``, set up exactly as ``full_finetune_distributed``
    does; also fills a sharded template through ``load_checkpoint(state_dict)`` (DistributedCheckpointer's
    form) and checks it against what the full-state-dict path loaded."""
    from torch.distributed.checkpoint.state_dict import _init_optim_state, set_state_dict
    from torchtune import training
    from torchtune.training.checkpointing._checkpoint_client import CheckpointClient, TrainingProgress

    training.gather_cpu_state_dict = _forbid
    training.get_full_optimizer_state_dict = _forbid
    client = CheckpointClient(_cfg(ckpt_dir, files, out_dir, resume=True))
    ckpt = client.load_base_checkpoint()
    out: dict[str, Any] = {}
    expected = torch.load(stash, weights_only=False)
    got = ckpt[training.OPT_KEY]
    out["optimizer_loaded_exactly"] = (
        sorted(got["state"]) == sorted(expected["state"])
        and all(_same(got["state"][n][k], v, rank) for n, s in expected["state"].items() for k, v in s.items())
        and got["param_groups"] == expected["param_groups"]
    )
    epochs_run = ckpt[training.EPOCHS_KEY]
    out["progress"] = [ckpt[training.EPOCHS_KEY], ckpt[training.TOTAL_EPOCHS_KEY], ckpt[training.MAX_STEPS_KEY],
                       ckpt[training.SEED_KEY]]
    model, opt = _setup(ckpt, world)

    # DistributedCheckpointer's form: a sharded template filled in place, then set_state_dict
    ck = client._get_checkpointer()
    model2, opt2 = _setup({"model": {k: torch.zeros_like(v) for k, v in ckpt["model"].items()}}, world)
    _init_optim_state(opt2)
    template = {"model": model2.state_dict(), "optimizer": opt2.state_dict(), training.EPOCHS_KEY: 0,
                training.SEED_KEY: -1}
    filled = ck.load_checkpoint(template)
    set_state_dict(model2, opt2, model_state_dict=filled["model"], optim_state_dict=filled["optimizer"])
    same_model = all(torch.equal(_local(a), _local(b)) for a, b in zip(model.state_dict().values(),
                                                                      model2.state_dict().values()))
    s1, s2 = opt.state_dict(), opt2.state_dict()
    same_opt = sorted(s1["state"]) == sorted(s2["state"]) and all(
        torch.equal(_local(v), _local(s2["state"][i][k])) for i, s in s1["state"].items() for k, v in s.items())
    out["template_filled"] = [same_model, same_opt, filled[training.EPOCHS_KEY], filled[training.SEED_KEY]]
    del model2, opt2

    losses: dict[int, list[float]] = {}
    for epoch in range(epochs_run, epochs):
        losses[epoch] = _train_epoch(model, opt, epoch, steps, rank)
        progress = TrainingProgress(seed=0, epochs_run=epoch + 1, total_epochs=epochs, max_steps_per_epoch=steps)
        client.save_checkpoint(model=model, optimizer=opt, training_progress=progress, epoch=epoch)
    out["losses"] = losses
    return out


def saved_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}
