"""Multi-process tests of the distributed save and load: spawned CPU ranks on gloo over 127.0.0.1
(FSDP2 ``fully_shard`` on CPU), world sizes 1-4; every wait is bounded (tests/dist_helpers.py)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import dist_scenarios as S
import pytest
import torch
from dist_helpers import RankFailed, run_ranks
from safetensors.torch import save_file
from test_convert_families import FAMILIES, P

from ckpt_factory import LlamaSpec, llama_state_dict, split_keys, write_hf_checkpoint
from shardwise import FullModelHFCheckpointer

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _model_files(folder: Path) -> dict[str, bytes]:
    return {k: v for k, v in _files(folder).items() if k.endswith(".safetensors") or k.endswith(".index.json")}


def _llama_ckpt(folder: Path, spec: LlamaSpec, cuts: list[int]) -> list[str]:
    sd = llama_state_dict(spec)
    return write_hf_checkpoint(folder, sd, split_keys(list(sd), cuts), spec.config(),
                               metadata={"format": "pt", "origin": "test"})


@pytest.mark.parametrize("world", [3])
def test_fsdp2_collective_saves_are_exact(tmp_path: Path, world: int) -> None:
    """FSDP2 model with torchtune keys, 5 heads of head_dim 6 over 3 ranks (boundaries cut heads and
    row pairs), inv_freq kept aside: an unchanged save reproduces the input files byte for byte; a
    trained one equals the single-process save of the same full state dict; the sharded optimizer state
    comes back on resume."""
    spec = LlamaSpec(layers=2, heads=5, kv_heads=5, head_dim=6, hidden=30, intermediate=22, vocab=37, inv_freq=True)
    names = _llama_ckpt(tmp_path / "in", spec, [7, 15])
    res = run_ranks(S.fsdp_saves, world, str(tmp_path / "in"), str(tmp_path / "out"), "LLAMA3", names)
    out = tmp_path / "out"
    assert _files(tmp_path / "in") == _files(out / "epoch_0")  # shards, index and config.json
    ref = FullModelHFCheckpointer(str(tmp_path / "in"), names, "LLAMA3", str(tmp_path / "ref"))
    ref.load_checkpoint()
    ref.save_checkpoint({"model": res[0]["full"], "adapter": res[0]["adapter"],
                         "adapter_config": res[0]["adapter_config"]}, epoch=1)
    assert _model_files(out / "epoch_1") == _model_files(tmp_path / "ref" / "epoch_1")
    for name in ("adapter_model.safetensors", "adapter_config.json", "config.json"):  # gathered adapters
        assert (out / "epoch_1" / name).read_bytes() == (tmp_path / "ref" / "epoch_1" / name).read_bytes()
    got = torch.load(out / "epoch_1" / "adapter_model.pt", weights_only=True)
    assert all(torch.equal(got[k], v) for k, v in res[0]["adapter"].items()) and set(got) == set(res[0]["adapter"])
    assert sorted(os.listdir(out)) == ["epoch_0", "epoch_1", "recipe_state"]  # no staging leftovers
    resumed = FullModelHFCheckpointer(str(tmp_path / "in"), names, "LLAMA3", str(out), should_load_recipe_state=True)
    state = resumed.load_checkpoint()
    assert state["seed"] == 7 and state["epochs_run"] == 1
    for i, t in res[0]["exp_avg"].items():
        assert torch.equal(state["optimizer"]["state"][i]["exp_avg"], t)
    assert state["optimizer"]["param_groups"] == [{"lr": 0.1, "params": list(range(len(res[0]["exp_avg"])))}]
    for k, t in res[0]["adapter"].items():  # a LoRA resume: the adapter saved with the recipe state
        assert torch.equal(state["adapter"][k], t), k


@pytest.mark.parametrize("family,world", [("LLAMA3_2", 2), ("LLAMA4", 4), ("PHI3_MINI", 3)])
def test_families_through_the_checkpointer(tmp_path: Path, family: str, world: int) -> None:
    """Tied embeddings with a stored lm_head (whole-tensor comparison, gathered), Llama4's fused experts
    (no row map: gathered and re-sharded unevenly), Phi3's fused qkv (several sources per HF tensor): unchanged
    collective saves reproduce the input files; trained ones equal the single-process save."""
    p = P(layers=2, heads=4, kv_heads=2, head_dim=4, hidden=16, inter=12, vocab=23, dtype=torch.bfloat16,
          tied=family == "LLAMA3_2", lm_head=True,
          extra=(("moe", [1]), ("experts", 5), ("same_head", True)))  # 5 experts on 4 ranks: 2, 2, 1, 0 rows
    hf, cfg = FAMILIES[family].make(p)
    src = tmp_path / "in"
    src.mkdir()
    keys = list(hf)
    names = []
    for i, g in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2 :]), 1):
        names.append(f"model-{i:05d}-of-00002.safetensors")
        save_file({k: hf[k].contiguous() for k in g}, str(src / names[-1]), metadata={"format": "pt"})
    (src / "config.json").write_text(json.dumps(cfg))
    mt = FAMILIES[family].model_type.name
    single = FullModelHFCheckpointer(str(src), names, mt, str(tmp_path / "x"))
    tune0 = single.load_checkpoint()["model"]
    change = {k: 0.5 for k in tune0}
    run_ranks(S.save_checkpointer, world, str(src), str(tmp_path / "out"), mt, names, None, 1, change)
    got = _model_files(tmp_path / "out" / "epoch_0")  # unchanged weights
    assert {n: got[n] for n in names} == {n: (src / n).read_bytes() for n in names}
    single.save_checkpoint({"model": tune0}, epoch=0)
    assert got == _model_files(tmp_path / "x" / "epoch_0")  # and the index a single process writes
    ref = FullModelHFCheckpointer(str(src), names, mt, str(tmp_path / "ref"))
    tune = ref.load_checkpoint()["model"]
    ref.save_checkpoint({"model": {k: v.clone() + 0.5 for k, v in tune.items()}}, epoch=1)
    assert _model_files(tmp_path / "out" / "epoch_1") == _model_files(tmp_path / "ref" / "epoch_1")


def _random_case(rng: random.Random) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    full: dict[str, torch.Tensor] = {}
    placements: dict[str, str] = {}
    for i in range(rng.randint(1, 6)):
        nd = rng.randint(1, 3)
        shape = [rng.randint(1, 9) for _ in range(nd)]
        dtype = rng.choice([torch.bfloat16, torch.float32, torch.int64, torch.bool, torch.float16])
        g = torch.Generator().manual_seed(rng.randint(0, 2**31))
        if dtype == torch.bool:
            t = torch.rand(shape, generator=g) > 0.5
        elif dtype == torch.int64:
            t = torch.randint(-1000, 1000, shape, generator=g)
        else:
            t = torch.randn(shape, generator=g).to(dtype)
        name = f"layer.{i}.{rng.choice(['weight', 'bias', 'ids'])}"
        full[name] = t
        placements[name] = rng.choice(["0", "0", "r", "plain"] + (["1"] if nd > 1 else []))
    return full, placements


@pytest.mark.parametrize("world,seed", [(1, 1), (2, 2), (4, 4)])
def test_hf_keyed_saves_match_safetensors_and_load_back(tmp_path: Path, world: int, seed: int) -> None:
    """Random HF-keyed state dicts (uneven Shard(0), Shard(1), replicated DTensors, plain tensors; bf16,
    f16, f32, int64, bool) through ``shardwise.dcp.save``: byte-identical to ``safetensors.save_file``
    of the full tensors; shardwise's reader puts every rank's rows back, torch's reader loads them."""
    rng = random.Random(seed)
    cases = [_random_case(rng) for _ in range(4)]
    run_ranks(S.raw_cases, world, cases, str(tmp_path / "out"))
    for i, (full, _) in enumerate(cases):
        save_file(full, str(tmp_path / f"ref{i}.safetensors"), metadata={"format": "pt"})
        got = tmp_path / "out" / str(i) / "model-00001-of-00001.safetensors"
        assert got.read_bytes() == (tmp_path / f"ref{i}.safetensors").read_bytes()


def test_failures_fail_every_rank_and_publish_nothing(tmp_path: Path) -> None:
    """A rank raising inside write_data, a rank SIGKILLed mid-save, a rank that cannot see the staging
    folder: every surviving rank gets an error (no hang), the previous checkpoint is intact, and no
    folder that looks complete appears."""
    full = {"w": torch.randn(9, 4), "ids": torch.arange(5)}
    out = tmp_path / "ckpt"
    res = run_ranks(S.fail_one_rank, 2, full, str(out), "raise", 1)
    for r in (0, 1):
        assert "CheckpointIOError" in res[r] and "rank 1" in res[r] and "No space left" in res[r], res[r]
    _assert_previous_intact(tmp_path, out, full)

    out2 = tmp_path / "ckpt2"
    res = run_ranks(S.fail_one_rank, 2, full, str(out2), "kill", 1, allow_errors=True)
    assert res[1] == ("died", -9)
    assert isinstance(res[0], str) and res[0] != "saved", res[0]  # an error, within the bounded wait
    assert "timed out" not in res[0].lower(), res[0]  # from the lost peer, not the process group's timeout
    _assert_previous_intact(tmp_path, out2, full)

    out3 = tmp_path / "ckpt3"
    other = tmp_path / "elsewhere"
    other.mkdir()
    res = run_ranks(S.unshared_filesystem, 2, full, str(out3), str(other))
    for r in (0, 1):
        assert "cannot see the staging folder" in res[r] and "shared filesystem" in res[r], res[r]
    assert not out3.exists() and not [n for n in os.listdir(tmp_path) if n.startswith(".ckpt3")]


def _assert_previous_intact(tmp_path: Path, out: Path, full: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import load_file

    got = load_file(str(out / "model-00001-of-00001.safetensors"))
    assert all(torch.equal(got[k], v) for k, v in full.items())  # the first save, not the failed one
    leftovers = [n for n in os.listdir(tmp_path) if n.startswith(f".{out.name}")]
    assert leftovers == []  # the surviving coordinator removed its staging folder


def test_loads_transformers_and_torch_writer_output_into_fsdp2(tmp_path: Path) -> None:
    """``save_pretrained`` output and torch's own ``HuggingFaceStorageWriter`` output load straight into
    FSDP2 shards exactly (torchtune keys through the row map, and HF keys)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=40, hidden_size=30, intermediate_size=24, num_hidden_layers=2,
                                   num_attention_heads=5, num_key_value_heads=5, head_dim=6)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    expect_tune = FullModelHFCheckpointer(str(tmp_path / "hf"), _shards(tmp_path / "hf"), "LLAMA3",
                                          str(tmp_path / "o")).load_checkpoint()["model"]
    run_ranks(S.load_into_fsdp, 3, str(tmp_path / "hf"), "LLAMA3", {k: v.clone() for k, v in expect_tune.items()})
    from torch.distributed.checkpoint import HuggingFaceStorageWriter
    from torch.distributed.checkpoint import save as dcp_save

    hf_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    dcp_save(hf_sd, storage_writer=HuggingFaceStorageWriter(str(tmp_path / "torchhf")), no_dist=True)
    run_ranks(S.load_into_fsdp, 2, str(tmp_path / "torchhf"), None, hf_sd)


def _shards(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.safetensors"))


def test_collective_output_loads_in_transformers(tmp_path: Path) -> None:
    """A collective save of trained weights is a folder ``from_pretrained`` loads, with the logits of
    the same weights saved by one process."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(1)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "hf", max_shard_size="30KB")
    names = _shards(tmp_path / "hf")
    tune = FullModelHFCheckpointer(str(tmp_path / "hf"), names, "LLAMA3", str(tmp_path / "x")).load_checkpoint()
    change = {k: 0.01 for k in tune["model"]}
    run_ranks(S.save_checkpointer, 2, str(tmp_path / "hf"), str(tmp_path / "out"), "LLAMA3", names, None, 0, change)
    a = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out" / "epoch_0")
    ids = torch.tensor([[1, 5, 7, 30, 2]])
    ref = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf")
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.01)
        assert torch.equal(a(ids).logits, ref(ids).logits)


def test_run_ranks_bounds_a_stuck_rank() -> None:
    """The harness itself: a rank that never finishes fails the test within the timeout."""
    with pytest.raises(RankFailed, match="did not finish"):
        run_ranks(S.stuck, 2, timeout=20)


def test_rank0_failure_while_publishing_fails_every_rank(tmp_path: Path) -> None:
    """A rank-0-only step failing (the recipe state cannot be staged) is an error on every rank, not a
    rank left waiting; nothing is published."""
    spec = LlamaSpec(layers=1)
    names = _llama_ckpt(tmp_path / "in", spec, [5])
    res = run_ranks(S.publish_fails_on_rank0, 2, str(tmp_path / "in"), str(tmp_path / "out"), names, timeout=150)
    assert "No space left" in res[0] and "rank 0" not in res[0], res[0]
    assert "could not publish" in res[1] and "rank 0 failed" in res[1] and "No space left" in res[1], res[1]
    out = tmp_path / "out"
    assert not (out / "epoch_0").exists() and not (out / "recipe_state" / "recipe_state.pt").exists()
    assert [p.name for p in out.iterdir() if not p.name.startswith(".")] in ([], ["recipe_state"])


def test_max_shard_size_follows_the_state_dict_order(tmp_path: Path) -> None:
    """Replicated and sharded tensors interleaved, split by max_shard_size: the same files as the
    layout planned in one process from the state dict in its own order."""
    from shardwise.dcp import plan_layout

    g = torch.Generator().manual_seed(3)
    full = {f"t.{i}": torch.randn(8, 16, generator=g) for i in range(7)}
    cap = 3 * 8 * 16 * 4
    run_ranks(S.ordered_max_shard, 2, full, str(tmp_path / "out"), cap)
    expect = plan_layout({k: (v.dtype, tuple(v.shape)) for k, v in full.items()}, max_shard_size=cap)
    assert sorted(f[0] for f in expect.files) == sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    for name, header, size in expect.files:
        got = (tmp_path / "out" / name).read_bytes()
        assert got[: len(header)] == header and len(got) == size
    assert (tmp_path / "out" / "model.safetensors.index.json").read_bytes() == expect.index
