"""``shardwise.torchtune.DistributedHFCheckpointer`` through torchtune 0.6.1's real ``CheckpointClient``:
a tiny torchtune Llama-3 under FSDP2 on 2 gloo CPU ranks, AdamW, set up and resumed the way
``full_finetune_distributed`` does it.

One uninterrupted run saves after every epoch (intermediate saves with the optimizer), never gathering
(``training.gather_cpu_state_dict`` raises if called); a fresh set of processes resumes from the last
intermediate checkpoint and must produce the same losses and the same final HF shards, byte for byte.
Two spawns in all; every check reads their results."""

from __future__ import annotations

import importlib.util
import inspect
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import tt_scenarios as S
from dist_helpers import run_ranks
from hypothesis import given, settings
from hypothesis import strategies as st

from ckpt_factory import LlamaSpec, llama_state_dict, write_hf_checkpoint

HAVE_TT = importlib.util.find_spec("torchtune") is not None
needs_torchtune = pytest.mark.skipif(not HAVE_TT, reason="torchtune 0.6.1 is not installed (make test installs it)")

WORLD = 2
EPOCHS = 3
STEPS = 2


def test_import_shardwise_never_imports_torchtune() -> None:
    code = ("import sys, shardwise, shardwise.dcp, shardwise.checkpointer; "
            "bad = [m for m in sys.modules if m == 'torchtune' or m.startswith('torchtune.')]; "
            "assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    if not HAVE_TT:
        pytest.skip("torchtune 0.6.1 is not installed (make test installs it)")
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("tt")
    base = root / "base"
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**S.HF_CONFIG))
    total = sum(t.numel() * t.element_size() for t in hf.state_dict().values())
    hf.save_pretrained(base, max_shard_size=max(total // 3, 20_000))
    files = sorted(p.name for p in base.glob("*.safetensors"))
    assert len(files) >= 2
    out, single, stash = root / "out", root / "single", root / "full_optimizer.pt"
    a = run_ranks(S.run_and_save, WORLD, str(base), files, str(out), str(single), EPOCHS, STEPS, str(stash),
                  timeout=240)
    final = f"epoch_{EPOCHS - 1}"
    first_final = root / "first_final"
    shutil.copytree(out / final, first_final)
    snapshot = sorted(p.name for p in out.iterdir())
    b = run_ranks(S.resume, WORLD, str(base), files, str(out), EPOCHS, STEPS, str(stash), timeout=240)
    return dict(a=a, b=b, out=out, single=single / final, first_final=first_final, final=final,
                snapshot=snapshot, files=files)


@needs_torchtune
def test_client_saves_collectively_without_gather(runs: dict[str, Any]) -> None:
    # reaching here means gather_cpu_state_dict / get_full_optimizer_state_dict were never called
    out: Path = runs["out"]
    assert {f"epoch_{e}" for e in range(EPOCHS)} <= set(runs["snapshot"])
    for e in range(EPOCHS):
        assert sorted(p.name for p in (out / f"epoch_{e}").glob("*.safetensors")) == runs["files"]
    recipe = torch.load(out / "recipe_state" / "recipe_state.pt", weights_only=False)
    assert "optimizer" in recipe["_shardwise_dcp_keys"]  # saved sharded by DCP: only markers stay inline
    moments = [v for st in recipe["optimizer"]["state"].values() for k, v in st.items() if k != "step"]
    assert moments and all(isinstance(v, tuple) and v[0] == "__shardwise_dcp_leaf__" for v in moments)
    folders = sorted(p.name for p in (out / "recipe_state").iterdir() if p.is_dir())
    assert folders == [recipe["_shardwise_dcp_dir"].split("/")[-1]]  # one per save; older ones removed
    assert (out / recipe["_shardwise_dcp_dir"] / ".metadata").is_file()


@needs_torchtune
def test_saved_optimizer_is_keyed_by_name_like_torch(runs: dict[str, Any]) -> None:
    for r in range(WORLD):
        assert runs["a"][r]["same_names"], f"rank {r}: names differ from get_optimizer_state_dict's"
        assert runs["a"][r]["dsd_kept"], f"rank {r}: get_optimizer_state_dict's sharded form was changed"
        assert runs["b"][r]["optimizer_loaded_exactly"], f"rank {r}: loaded optimizer != torch's full state dict"
        assert runs["b"][r]["progress"] == [EPOCHS - 1, EPOCHS, STEPS, 0]


@needs_torchtune
def test_optimizer_order_that_cannot_be_validated_is_refused(runs: dict[str, Any]) -> None:
    for r in range(WORLD):
        assert runs["a"][r]["refused"] == ["reversed", "dropped"]


@needs_torchtune
def test_resume_continues_exactly(runs: dict[str, Any]) -> None:
    last = EPOCHS - 1
    for r in range(WORLD):
        assert sorted(runs["b"][r]["losses"]) == [last], "the resume did not start at the saved epoch"
        assert runs["b"][r]["losses"][last] == runs["a"][r]["losses"][last], f"rank {r}: losses differ"
    assert S.saved_files(runs["out"] / runs["final"]) == S.saved_files(runs["first_final"])


@needs_torchtune
def test_load_into_sharded_template(runs: dict[str, Any]) -> None:
    # DistributedCheckpointer's load_checkpoint(state_dict) form: the same model and optimizer shards
    for r in range(WORLD):
        assert runs["b"][r]["template_filled"] == [True, True, EPOCHS - 1, 0]


@needs_torchtune
def test_collective_save_equals_single_process_save(runs: dict[str, Any]) -> None:
    got, want = S.saved_files(runs["first_final"]), S.saved_files(runs["single"])
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name] == want[name], f"{name} differs from the single-process save"


@needs_torchtune
def test_transformers_loads_the_saved_folder(runs: dict[str, Any]) -> None:
    import transformers

    from shardwise import FullModelHFCheckpointer

    folder: Path = runs["first_final"]
    hf = transformers.LlamaForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    tune_sd = FullModelHFCheckpointer(str(folder), sorted(set(index["weight_map"].values())), "LLAMA3",
                                      str(folder.parent / "unused_out")).load_checkpoint()["model"]
    model = S.build_tune_model()
    model.load_state_dict(tune_sd)
    tokens = S.batch(9, 0, 0)
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, model.eval()(tokens), rtol=1e-4, atol=1e-5)


@needs_torchtune
def test_is_a_torchtune_distributed_checkpointer(tmp_path: Path) -> None:
    from torchtune.training.checkpointing._checkpointer import DistributedCheckpointer

    from shardwise import FullModelHFCheckpointer
    from shardwise.torchtune import DistributedHFCheckpointer
    spec = LlamaSpec()
    sd = llama_state_dict(spec)
    files = write_hf_checkpoint(tmp_path / "in", sd, [sorted(sd)], spec.config())
    ck = DistributedHFCheckpointer(str(tmp_path / "in"), files, "LLAMA3", str(tmp_path / "out"))
    assert isinstance(ck, DistributedCheckpointer) and isinstance(ck, FullModelHFCheckpointer)
    assert inspect.signature(DistributedHFCheckpointer) == inspect.signature(FullModelHFCheckpointer)
    future = ck.save_checkpoint({"model": ck.load_checkpoint()["model"]}, epoch=7, save_async=True)
    future.result(timeout=120)  # torchtune's save_async: written in the background, published when done
    assert sorted(p.name for p in (tmp_path / "out" / "epoch_7").iterdir() if p.suffix == ".safetensors") == files
    # a single-device / gathered save (plain tensors) keeps the optimizer as the recipe gave it
    tune = ck.load_checkpoint()["model"]
    params = [torch.nn.Parameter(t.float().clone()) for t in tune.values()]
    opt = torch.optim.AdamW(params[:2])
    for p in params[:2]:
        p.grad = torch.ones_like(p)
    opt.step()
    raw = opt.state_dict()
    ck.save_checkpoint({"model": tune, "optimizer": raw, "seed": 0}, epoch=0, intermediate_checkpoint=True)
    saved = torch.load(tmp_path / "out" / "recipe_state" / "recipe_state.pt", weights_only=False)["optimizer"]
    assert sorted(saved["state"]) == [0, 1] and saved["param_groups"][0]["params"] == [0, 1]


_SHAPES = [(4, 3), (3, 4), (4,), (2, 3)]


def _opt(shapes: list[tuple[int, ...]], cuts: list[int], with_state: list[bool]) -> dict[str, Any]:
    """An ``optimizer.state_dict()`` over parameters ``0..n-1`` in order (torch numbers them so)."""
    n = len(shapes)
    bounds = [0, *sorted({c % (n + 1) for c in cuts}), n]
    groups = [{"lr": 0.1 * i, "params": list(range(a, b))} for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]
    state = {i: {"step": torch.tensor(3.0), "exp_avg": torch.empty(shapes[i], device="meta")}
             for i in range(n) if with_state[i]}
    return {"state": state, "param_groups": groups}


@needs_torchtune
@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(_SHAPES), min_size=1, max_size=7), st.lists(st.integers(0, 8), max_size=2),
       st.lists(st.booleans(), min_size=7, max_size=7), st.randoms(use_true_random=False))
def test_ids_to_names_is_the_order_or_a_refusal(shapes: list[tuple[int, ...]], cuts: list[int],
                                                 with_state: list[bool], rnd: Any) -> None:
    """Matched in order when the model's parameters are the optimizer's; otherwise either refused or
    (only where shapes cannot tell) matched by order — never a state tensor under a parameter of another
    shape."""
    from shardwise.torchtune import OptimizerKeyError, _by_name_one

    names = [f"layers.{i}.w" for i in range(len(shapes))]
    model = {n: torch.empty(s, device="meta") for n, s in zip(names, shapes)}
    opt = _opt(shapes, cuts, with_state)
    got = _by_name_one(opt, names, model)
    assert got["state"] == {names[i]: s for i, s in opt["state"].items()}
    assert [g["params"] for g in got["param_groups"]] == [[names[i] for i in g["params"]] for g in opt["param_groups"]]
    assert [g["lr"] for g in got["param_groups"]] == [g["lr"] for g in opt["param_groups"]]

    order = names[:]
    rnd.shuffle(order)
    try:
        moved = _by_name_one(opt, order, model)
    except OptimizerKeyError:
        assert opt["state"] and any(model[order[i]].shape != s["exp_avg"].shape for i, s in opt["state"].items())
    else:
        for name, s in moved["state"].items():
            assert s["exp_avg"].shape == model[name].shape
    if len(names) > 1:
        with pytest.raises(OptimizerKeyError, match="cannot be matched"):
            _by_name_one(opt, names[:-1], model)


@needs_torchtune
def test_optimizer_in_backward_form_is_keyed_per_parameter() -> None:
    """``OptimizerInBackwardWrapper.state_dict()``: one optimizer per parameter name, each id 0."""
    from shardwise.torchtune import OptimizerKeyError, optimizer_state_by_name

    model = {"a.w": torch.empty(4, 3, device="meta"), "b.w": torch.empty(3, device="meta")}
    per = {n: {"state": {0: {"step": torch.tensor(1.0), "exp_avg": torch.empty(t.shape, device="meta")}},
               "param_groups": [{"lr": 1e-3, "params": [0]}]} for n, t in model.items()}
    got = optimizer_state_by_name(per, model)
    assert {n: list(v["state"]) for n, v in got.items()} == {"a.w": ["a.w"], "b.w": ["b.w"]}
    assert got["a.w"]["param_groups"][0]["params"] == ["a.w"]
    per["a.w"], per["b.w"] = per["b.w"], per["a.w"]  # shapes tell the swap
    with pytest.raises(OptimizerKeyError, match="shape"):
        optimizer_state_by_name(per, model)
