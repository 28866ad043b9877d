"""Recipe state and resume: full fine-tune and LoRA flows (with and without explicit paths) give back
exactly what was saved — model, adapter, optimizer, RNG, dataloader; latest-checkpoint discovery;
pruning; ``step``/``dir_prefix``/``max_shard_size``; Hypothesis round trips."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from ckpt_factory import LlamaSpec, llama_state_dict, split_keys, write_hf_checkpoint
from shardwise import FullModelHFCheckpointer
from shardwise.checkpointer.recipe_state import load_recipe_state
from shardwise.format.torchfile import atomic_torch_save

SPEC = LlamaSpec(layers=2, heads=4, kv_heads=2, head_dim=8, hidden=32, intermediate=24, vocab=29,
                 dtype=torch.float32)


def make_base(tmp: Path) -> tuple[Path, list[str], dict[str, torch.Tensor]]:
    sd = llama_state_dict(SPEC, seed=0)
    folder = tmp / "base"
    names = write_hf_checkpoint(folder, sd, split_keys(list(sd), [9]), SPEC.config())
    (folder / "tokenizer.json").write_text("{}")
    return folder, names, sd


def optimizer_state(seed: int) -> dict[str, Any]:
    """A real AdamW state dict: tensors, nested dicts, ints, floats, tuples, lists."""
    torch.manual_seed(seed)
    lin = torch.nn.Linear(5, 3)
    opt = torch.optim.AdamW(lin.parameters(), lr=1e-3, betas=(0.9, 0.99))
    for _ in range(2):
        lin(torch.randn(4, 5)).sum().backward()
        opt.step()
    return opt.state_dict()


def recipe(epoch: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(100 + epoch)
    torch.randn(3, generator=g)
    return {
        "optimizer": optimizer_state(epoch),
        "seed": 1234,
        "epochs_run": epoch + 1,
        "total_epochs": 5,
        "max_steps_per_epoch": None,
        "steps_run": 17 * (epoch + 1),
        "dataloader": {"sampler": {"epoch": epoch, "indices": [3, 1, 2]}, "_num_yielded": 7, "name": "ds"},
        "rng_state": g.get_state(),
        "global_rng": torch.get_rng_state(),
    }


def deep_equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(deep_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(deep_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return type(a) is type(b) and a == b


def trained(model: dict[str, torch.Tensor], epoch: int) -> dict[str, torch.Tensor]:
    """'Training': every weight moves (new tensors; the loaded ones are mapped views)."""
    return {k: v + 0.01 * (epoch + 1) for k, v in model.items()}


def lora(epoch: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(epoch)
    out = {}
    for n in range(SPEC.layers):
        for leaf, rows in (("q_proj", 32), ("v_proj", 16)):
            out[f"layers.{n}.attn.{leaf}.lora_a.weight"] = torch.randn(4, 32, generator=g)
            out[f"layers.{n}.attn.{leaf}.lora_b.weight"] = torch.randn(rows, 4, generator=g)
    return out


def check_recipe(state: dict[str, Any], epoch: int) -> None:
    expected = recipe(epoch)
    for k, v in expected.items():
        assert deep_equal(state[k], v), k


# ------------------------------------------------------------------------------ full fine-tune
def test_full_finetune_resume_without_and_with_explicit_paths(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    base, names, _ = make_base(tmp_path)
    out = tmp_path / "out"
    ck = FullModelHFCheckpointer(str(base), names, "LLAMA3", str(out))
    models = {}
    loaded = ck.load_checkpoint()
    for epoch in range(2):
        models[epoch] = trained(loaded["model"], epoch)
        ck.save_checkpoint({"model": models[epoch], **recipe(epoch)}, epoch=epoch, intermediate_checkpoint=True)

    # without paths: the original names are found in the latest epoch folder
    r = FullModelHFCheckpointer(str(base), names, "LLAMA3", str(out), should_load_recipe_state=True)
    state = r.load_checkpoint()
    assert "adapter" not in state
    assert state["model"].keys() == models[1].keys()
    assert all(torch.equal(state["model"][k], models[1][k]) for k in models[1])
    check_recipe(state, 1)

    # torchtune's way: checkpoint_files relative to output_dir, explicit recipe_checkpoint
    files = [f"epoch_0/{n}" for n in names]
    with caplog.at_level(logging.WARNING, logger="shardwise"):
        r = FullModelHFCheckpointer(str(base), files, "LLAMA3", str(out),
                                    recipe_checkpoint="recipe_state/recipe_state.pt", resume_from_checkpoint=True)
    assert "resume_from_checkpoint is deprecated" in caplog.text
    state = r.load_checkpoint()
    assert all(torch.equal(state["model"][k], models[0][k]) for k in models[0])
    check_recipe(state, 1)  # one recipe file, the last intermediate save's

    # absolute paths into checkpoint_dir: torchtune would silently resume from the base weights
    absolute = [str(base / n) for n in names]
    state = FullModelHFCheckpointer(str(base), absolute, "LLAMA3", str(out),
                                    should_load_recipe_state=True).load_checkpoint()
    assert all(torch.equal(state["model"][k], models[1][k]) for k in models[1])

    # and a save after the resume continues exactly
    r.save_checkpoint({"model": state["model"], **recipe(2)}, epoch=2, intermediate_checkpoint=True)
    again = FullModelHFCheckpointer(str(base), names, "LLAMA3", str(out),
                                    should_load_recipe_state=True).load_checkpoint()
    assert all(torch.equal(again["model"][k], models[1][k]) for k in models[1])
    check_recipe(again, 2)


# ------------------------------------------------------------------------------ LoRA
def test_lora_resume_auto_explicit_and_from_peft_only(tmp_path: Path) -> None:
    base, names, _ = make_base(tmp_path)
    out = tmp_path / "out"
    ck = FullModelHFCheckpointer(str(base), names, "LLAMA3", str(out))
    base_model = ck.load_checkpoint()["model"]
    cfg = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "peft_type": "LORA"}
    for epoch in range(2):
        merged = trained(base_model, epoch)  # the LoRA recipe saves the merged model too
        ck.save_checkpoint({"model": merged, "adapter": lora(epoch), "adapter_config": cfg, **recipe(epoch)},
                           epoch=epoch, intermediate_checkpoint=True)

    def load(**kw: Any) -> dict[str, Any]:
        return FullModelHFCheckpointer(str(base), names, "LLAMA3", str(out), should_load_recipe_state=True,
                                       **kw).load_checkpoint()

    state = load()
    # the LoRA branch: base (un-merged) weights from checkpoint_dir, the adapter of the latest epoch
    assert all(torch.equal(state["model"][k], base_model[k]) for k in base_model)
    assert deep_equal(state["adapter"], lora(1))
    check_recipe(state, 1)

    state = load(adapter_checkpoint="epoch_0/adapter_model.pt")
    assert deep_equal(state["adapter"], lora(0))

    # only the PEFT file left (e.g. copied from the Hub): converted back to torchtune keys exactly
    (out / "epoch_1" / "adapter_model.pt").unlink()
    state = load()
    assert deep_equal(state["adapter"], lora(1))
    state = load(adapter_checkpoint="epoch_1/adapter_model.safetensors")
    assert deep_equal(state["adapter"], lora(1))

    with pytest.raises(ValueError, match="adapter_checkpoint 'epoch_7/adapter_model.pt' not found"):
        load(adapter_checkpoint="epoch_7/adapter_model.pt")


def test_lora_resume_from_step_folders(tmp_path: Path) -> None:
    base, names, _ = make_base(tmp_path)
    out = tmp_path / "out"
    ck = FullModelHFCheckpointer(str(base), names, "LLAMA3", str(out))
    ck.load_checkpoint()
    for step in (50, 100):
        ck.save_checkpoint({"adapter": lora(step), **recipe(step)}, epoch=0, adapter_only=True,
                           intermediate_checkpoint=True, step=step, dir_prefix="step")
    assert sorted(p.name for p in out.iterdir()) == ["recipe_state", "step_100", "step_50"]
    state = FullModelHFCheckpointer(str(base), names, "LLAMA3", str(out),
                                    should_load_recipe_state=True).load_checkpoint()
    assert deep_equal(state["adapter"], lora(100))
    check_recipe(state, 100)
    with pytest.raises(ValueError, match="needs step"):
        ck.save_checkpoint({"adapter": {}}, epoch=0, adapter_only=True, dir_prefix="step")
    with pytest.raises(ValueError, match="dir_prefix"):
        ck.save_checkpoint({"adapter": {}}, epoch=0, adapter_only=True, dir_prefix="iter")


# ------------------------------------------------------------------------------ discovery and errors
def test_empty_output_dir_gives_clear_error(tmp_path: Path) -> None:
    base, names, _ = make_base(tmp_path)
    with pytest.raises(ValueError, match="holds no checkpoint") as e:
        FullModelHFCheckpointer(str(base), names, "LLAMA3", str(tmp_path / "new"), should_load_recipe_state=True)
    assert not isinstance(e.value, TypeError)
    # a final (non-intermediate) save writes no recipe state: say so
    ck = FullModelHFCheckpointer(str(base), names, "LLAMA3", str(tmp_path / "o2"))
    ck.save_checkpoint(ck.load_checkpoint(), epoch=0)
    with pytest.raises(ValueError, match="without intermediate_checkpoint=True"):
        FullModelHFCheckpointer(str(base), names, "LLAMA3", str(tmp_path / "o2"), should_load_recipe_state=True)


def test_latest_epoch_discovery(tmp_path: Path) -> None:
    base, names, _ = make_base(tmp_path)
    out = tmp_path / "out"
    ck = FullModelHFCheckpointer(str(base), names, "LLAMA3", str(out))
    ck.load_checkpoint()
    for epoch in (9, 10):
        ck.save_checkpoint({"adapter": lora(epoch), **recipe(epoch)}, epoch=epoch, adapter_only=True,
                           intermediate_checkpoint=True)
    (out / "epoch_7.txt").write_text("not a checkpoint")
    (out / "epoch_99").mkdir()  # empty: an interrupted non-atomic writer, or a user's mkdir
    decoy = out / ".epoch_11.shardwise-999999-deadbeef"  # a save in progress (or killed)
    decoy.mkdir()
    torch.save(lora(11), decoy / "adapter_model.pt")
    (out / "epoch_12_old").mkdir()
    torch.save(lora(12), out / "epoch_12_old" / "adapter_model.pt")
    r = FullModelHFCheckpointer(str(base), names, "LLAMA3", str(out), should_load_recipe_state=True)
    assert r._adapter_checkpoint == out / "epoch_10" / "adapter_model.pt"
    assert deep_equal(r.load_checkpoint()["adapter"], lora(10))


def test_keep_last_n_checkpoints(tmp_path: Path) -> None:
    base, names, _ = make_base(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="keep_last_n_checkpoints"):
        FullModelHFCheckpointer(str(base), names, "LLAMA3", str(out), keep_last_n_checkpoints=0)
    ck = FullModelHFCheckpointer(str(base), names, "LLAMA3", str(out), keep_last_n_checkpoints=2)
    state = ck.load_checkpoint()
    staging = out / ".epoch_1.shardwise-999999-0badc0de"
    staging.mkdir()
    for epoch in range(5):
        ck.save_checkpoint({"model": state["model"], **recipe(epoch)}, epoch=epoch, intermediate_checkpoint=True)
    left = sorted(p.name for p in out.iterdir())
    assert left == [staging.name, "epoch_3", "epoch_4", "recipe_state"]  # others' temp folders untouched
    # re-saving an older epoch keeps the folder just written
    ck.save_checkpoint({"model": state["model"]}, epoch=1)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("epoch")) == ["epoch_1", "epoch_4"]


# ------------------------------------------------------------------------------ Hypothesis
_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**62), 2**62), st.floats(allow_nan=False), st.text(max_size=8),
    st.builds(lambda shape, dt: torch.arange(math.prod(shape)).reshape(shape).to(dt),
              st.lists(st.integers(0, 3), max_size=3),
              st.sampled_from([torch.float32, torch.bfloat16, torch.int64, torch.uint8, torch.bool, torch.float16])),
)
_tree = st.recursive(
    _leaf,
    lambda kids: st.one_of(st.lists(kids, max_size=3), st.tuples(kids, kids),
                           st.dictionaries(st.one_of(st.text(max_size=6), st.integers(0, 9)), kids, max_size=3)),
    max_leaves=12,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(state=st.dictionaries(st.text(min_size=1, max_size=8).filter(lambda k: k not in ("model", "adapter",
                                                                                        "adapter_config")),
                             _tree, max_size=5))
def test_recipe_state_roundtrip(tmp_path: Path, state: dict[str, Any]) -> None:
    path = tmp_path / "recipe_state.pt"
    atomic_torch_save(state, path, fsync=False)
    assert deep_equal(load_recipe_state(path), state)


def test_recipe_state_through_checkpointer_is_weights_only(tmp_path: Path) -> None:
    base, names, _ = make_base(tmp_path)
    out = tmp_path / "out"
    ck = FullModelHFCheckpointer(str(base), names, "LLAMA3", str(out))
    state = ck.load_checkpoint()
    ck.save_checkpoint({**state, **recipe(0), "extra": {"nested": [1, (2, 3.5)], "g": torch.Generator().get_state()}},
                       epoch=0, intermediate_checkpoint=True)
    saved = load_recipe_state(out / "recipe_state" / "recipe_state.pt")
    assert "model" not in saved and saved["extra"]["nested"] == [1, (2, 3.5)]

    class Evil:
        def __reduce__(self) -> Any:
            return (print, ("executed",))

    torch.save({"seed": Evil()}, out / "recipe_state" / "recipe_state.pt")
    r = FullModelHFCheckpointer(str(base), names, "LLAMA3", str(out), should_load_recipe_state=True)
    with pytest.raises(ValueError, match="unable to load the recipe state"):
        r.load_checkpoint()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    sizes=st.lists(st.tuples(st.integers(1, 40), st.integers(1, 24)), min_size=1, max_size=12),
    cap=st.integers(64, 3000),
    cap_kind=st.sampled_from(["int", "str"]),
)
def test_max_shard_size_splits_new_keys(tmp_path_factory: pytest.TempPathFactory, sizes: list[tuple[int, int]],
                                        cap: int, cap_kind: str) -> None:
    tmp = tmp_path_factory.mktemp("cap")
    base, names, sd = make_base(tmp)
    ck = FullModelHFCheckpointer(str(base), names, "LLAMA3", str(tmp / "out"))
    model = dict(ck.load_checkpoint()["model"])
    new = {}
    for i, (r, c) in enumerate(sizes):  # layers the base checkpoint does not have: keys with no original shard
        key = f"layers.{10 + i}.mlp.w2.weight"
        model[key] = new[key] = torch.full((r, c), float(i))
    ck.save_checkpoint({"model": model}, epoch=0, max_shard_size=cap if cap_kind == "int" else f"{cap}B")
    folder = tmp / "out" / "epoch_0"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    files: dict[str, list[str]] = {}
    total = new_shards = 0
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            files[f.name] = list(h.keys())
            sizes_in_file = [h.get_tensor(k).nbytes for k in h.keys()]  # noqa: SIM118
        total += sum(sizes_in_file)
        if all(k.startswith("model.layers.") and int(k.split(".")[2]) >= 10 for k in files[f.name]):
            new_shards += 1
            assert sum(sizes_in_file) <= cap or len(sizes_in_file) == 1, f.name
        else:
            assert not any(k.startswith("model.layers.") and int(k.split(".")[2]) >= 10 for k in files[f.name])
    written = [k for ks in files.values() for k in ks]
    assert len(written) == len(set(written))  # every key exactly once
    assert index["weight_map"] == {k: n for n, ks in files.items() for k in ks}
    added = {f"model.layers.{10 + i}.mlp.down_proj.weight" for i in range(len(sizes))}
    assert set(index["weight_map"]) == set(sd) | added
    assert index["metadata"]["total_size"] == total
    if len(new) > 1 and sum(t.nbytes for t in new.values()) > cap:
        assert new_shards >= 2  # the cap really splits
