"""``shardwise.hf.save_pretrained`` / ``load_pretrained``: the same files as transformers' save_pretrained,
from one process and from every rank of FSDP2 / 2-D (tensor parallel + FSDP) models."""

from __future__ import annotations

import os
from pathlib import Path

import hf_scenarios as H
import pytest
import torch
from dist_helpers import run_ranks
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardwise import hf
from shardwise.errors import CheckpointError, ConfigError

pytest.importorskip("transformers")


def same_files(a: Path, b: Path) -> list[str]:
    """The differences between two folders (names, then bytes), empty when identical."""
    na, nb = sorted(os.listdir(a)), sorted(os.listdir(b))
    if na != nb:
        return [f"names {na} != {nb}"]
    return [n for n in na if (a / n).read_bytes() != (b / n).read_bytes()]


@pytest.mark.parametrize("family", H.FAMILIES)
@pytest.mark.parametrize("tie", [False, True])
def test_one_process_same_bytes_as_transformers(tmp_path: Path, family: str, tie: bool) -> None:
    model = H.build(family, tie)
    for size in (None, "20KB"):
        ref, out = tmp_path / f"ref{size}", tmp_path / f"out{size}"
        model.save_pretrained(ref, **({} if size is None else {"max_shard_size": size}))
        hf.save_pretrained(model, out, max_shard_size=size)
        assert same_files(ref, out) == []
        assert (out / "model.safetensors.index.json").exists() == (size is not None)
    assert (out / "generation_config.json").exists()


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=st.integers(min_value=1, max_value=200_000), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_any_max_shard_size_splits_as_transformers(tmp_path_factory: pytest.TempPathFactory, size: int,
                                                   dtype: torch.dtype) -> None:
    tmp = tmp_path_factory.mktemp("split")
    model = H.build("llama", True).to(dtype)
    model.save_pretrained(tmp / "ref", max_shard_size=size)
    hf.save_pretrained(model, tmp / "out", max_shard_size=size)
    assert same_files(tmp / "ref", tmp / "out") == []


def test_existing_folder_keeps_other_files_and_drops_stale_shards(tmp_path: Path) -> None:
    model = H.build("qwen2", False)
    out = tmp_path / "out"
    hf.save_pretrained(model, out, max_shard_size="20KB")
    (out / "tokenizer.json").write_text("{}")
    (out / "runs").mkdir()
    (out / "runs" / "events").write_text("x")
    hf.save_pretrained(model, out)  # now one file: the numbered shards and the index are stale
    model.save_pretrained(tmp_path / "ref")
    names = sorted(os.listdir(out))
    assert names == sorted(os.listdir(tmp_path / "ref") + ["runs", "tokenizer.json"])
    assert (out / "runs" / "events").read_text() == "x"
    for n in os.listdir(tmp_path / "ref"):
        assert (out / n).read_bytes() == (tmp_path / "ref" / n).read_bytes()


def test_load_pretrained_one_process_and_tied(tmp_path: Path) -> None:
    import transformers

    src = H.build("llama", True)
    src.save_pretrained(tmp_path / "ref", max_shard_size="20KB")
    model = H.build("llama", True, seed=3)
    hf.load_pretrained(model, tmp_path / "ref")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(H.logits(model), H.logits(src))
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ref")
    assert torch.equal(H.logits(back), H.logits(model))


def test_refusals_name_the_problem(tmp_path: Path) -> None:
    model = H.build("llama", False)
    with pytest.raises(ConfigError, match="safe_serialization=False"):
        hf.save_pretrained(model, tmp_path / "o", safe_serialization=False)
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="is a file"):
        hf.save_pretrained(model, tmp_path / "file")
    assert not (tmp_path / "o").exists()


def _bad_folders(tmp: Path) -> None:
    from safetensors.torch import load_file, save_file

    model = H.build("mistral", False)
    model.save_pretrained(tmp / "good")
    sd = load_file(tmp / "good" / "model.safetensors")
    for case in ("missing", "unexpected"):
        (tmp / case).mkdir()
        (tmp / case / "config.json").write_bytes((tmp / "good" / "config.json").read_bytes())
        changed = dict(sd)
        if case == "missing":
            del changed["model.layers.1.mlp.up_proj.weight"]
        else:
            changed["model.extra.weight"] = torch.zeros(3)
        save_file(changed, tmp / case / "model.safetensors", metadata={"format": "pt"})


def test_load_errors_name_the_keys(tmp_path: Path) -> None:
    _bad_folders(tmp_path)
    model = H.build("mistral", False)
    with pytest.raises(CheckpointError, match=r"missing \['model.layers.1.mlp.up_proj.weight'\]"):
        hf.load_pretrained(model, tmp_path / "missing")
    with pytest.raises(CheckpointError, match=r"unexpected \['model.extra.weight'\]"):
        hf.load_pretrained(model, tmp_path / "unexpected")


# ---------------------------------------------------------------------------------- multi-process
@pytest.mark.parametrize(("family", "tie", "world"), [
    ("llama", True, 2), ("qwen2", False, 3), ("gemma2", True, 2), ("mistral", False, 4), ("phi3", False, 2),
])
def test_fsdp2_ranks_write_transformers_files(tmp_path: Path, family: str, tie: bool, world: int) -> None:
    import transformers

    sizes = ["50GB", "20KB"]
    res = run_ranks(H.fsdp_save_load, world, family, tie, str(tmp_path / "ref"), str(tmp_path / "out"), sizes,
                    timeout=240)
    for size in sizes:
        assert same_files(tmp_path / "ref" / size, tmp_path / "out" / size) == []
    for r in range(world):
        assert torch.equal(res[r]["got"], res[r]["want"]), f"rank {r}: reloaded logits differ"
        assert res[r]["tied"] == tie
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "20KB")
    assert torch.equal(H.logits(back.eval()), res[0]["want"])


def test_2d_mesh_tensor_parallel_plus_fsdp(tmp_path: Path) -> None:
    res = run_ranks(H.tp_plan_mesh, 4, "llama", str(tmp_path / "ref"), str(tmp_path / "out"), timeout=240)
    assert same_files(tmp_path / "ref", tmp_path / "out") == []
    assert all(r["same"] for r in res.values())
    # both mesh dimensions shard: FSDP's dim-0 shards of tensor-parallel rows (strided) or columns
    kinds = res[0]["placements"]
    assert ("S(0)", "S(1)") in kinds and any(k[0].startswith("_S(0") for k in kinds), kinds


def test_fsdp2_bad_loads_fail_on_every_rank(tmp_path: Path) -> None:
    _bad_folders(tmp_path)
    res = run_ranks(H.bad_loads, 2, "mistral", str(tmp_path), timeout=180)
    for r in range(2):
        assert "missing ['model.layers.1.mlp.up_proj.weight']" in res[r][0]
        assert "unexpected ['model.extra.weight']" in res[r][1]
