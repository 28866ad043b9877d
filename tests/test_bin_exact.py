"""``.bin``/``.pt`` checkpoints come back byte for byte with ``safe_serialization=False``: the zip
record prefix of the input (``pytorch_model/`` from ``torch.save`` to a path, ``archive/`` from a file
object), tied weights pickled into one storage, key order, and the index (transformers 4.x layout).

transformers 5 no longer writes ``.bin``; its 4.x ``save_pretrained(safe_serialization=False)`` is
emulated exactly: ``huggingface_hub.split_torch_state_dict_into_shards`` + ``torch.save`` to each shard
path + ``json.dumps(index, indent=2, sort_keys=True) + "\\n"``."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckpt_factory import LlamaSpec, llama_state_dict
from shardwise import FullModelHFCheckpointer

hub = pytest.importorskip("huggingface_hub")


def _write(folder: Path, sd: dict[str, torch.Tensor], writer: str, max_shard: int) -> list[str]:
    """Write ``sd`` as ``writer`` would: ``path`` (torch.save to a path), ``fileobj`` (to an open file),
    ``hf4`` (transformers 4.x sharded save with index)."""
    folder.mkdir(parents=True)
    if writer == "hf4":
        split = hub.split_torch_state_dict_into_shards(
            sd, filename_pattern="pytorch_model{suffix}.bin", max_shard_size=max_shard
        )
        for name, keys in split.filename_to_tensors.items():
            torch.save({k: sd[k] for k in keys}, folder / name)
        if split.is_sharded:
            index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
            (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return sorted(split.filename_to_tensors)
    if writer == "path":
        torch.save(sd, folder / "pytorch_model.bin")
    else:
        with open(folder / "model.pt", "wb") as f:
            torch.save(sd, f)
    return ["pytorch_model.bin" if writer == "path" else "model.pt"]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    writer=st.sampled_from(["path", "fileobj", "hf4"]),
    tied=st.booleans(),
    max_shard=st.sampled_from([3_000, 12_000, 10**9]),
    trained=st.booleans(),
    seed=st.integers(0, 3),
)
def test_bin_round_trip_is_byte_exact(
    tmp_path_factory: pytest.TempPathFactory, writer: str, tied: bool, max_shard: int, trained: bool, seed: int
) -> None:
    root = tmp_path_factory.mktemp("bin")
    spec = LlamaSpec(lm_head=True, dtype=torch.float32)
    sd = llama_state_dict(spec, seed)
    cfg = spec.config()
    if tied:
        embed = sd["model.embed_tokens.weight"]
        # transformers 4.x's state_dict() detaches each key: two tensor objects, one storage; a script
        # doing sd[b] = sd[a] pickles one object twice
        sd["lm_head.weight"] = embed.detach() if writer == "hf4" else embed
        cfg["tie_word_embeddings"] = True
    names = _write(root / "hf", sd, writer, max_shard)
    (root / "hf" / "config.json").write_text(json.dumps(cfg))
    ck = FullModelHFCheckpointer(str(root / "hf"), names, "LLAMA3_2" if tied else "LLAMA3", str(root / "out"),
                                 safe_serialization=False)
    loaded = ck.load_checkpoint()["model"]
    model = {k: v.clone() for k, v in loaded.items()}  # what a recipe's model.state_dict() hands back
    if trained:
        model["tok_embeddings.weight"] = model["tok_embeddings.weight"] + 1
    ck.save_checkpoint({"model": model}, epoch=0)
    out = root / "out" / "epoch_0"
    assert sorted(p.name for p in out.iterdir() if p.name != "config.json") == sorted(
        p.name for p in (root / "hf").iterdir() if p.name != "config.json")
    for name in names:
        a, b = (root / "hf" / name).read_bytes(), (out / name).read_bytes()
        if not trained:
            assert a == b, (name, zipfile.ZipFile(out / name).namelist()[:2])
        else:  # the same structure: records, prefix, shared storages
            za, zb = zipfile.ZipFile(root / "hf" / name), zipfile.ZipFile(out / name)
            assert za.namelist() == zb.namelist()
    back = {}
    for name in names:
        back.update(torch.load(out / name, weights_only=True))
    if tied:  # still one storage: transformers ties them again on load either way, and the size is the same
        lm, embed = back["lm_head.weight"], back["model.embed_tokens.weight"]
        assert lm.untyped_storage().data_ptr() == embed.untyped_storage().data_ptr()
        assert torch.equal(back["lm_head.weight"], back["model.embed_tokens.weight"])
    index = root / "hf" / "pytorch_model.bin.index.json"
    if index.is_file() and not trained:
        assert (out / index.name).read_bytes() == index.read_bytes()


def test_bin_views_of_a_larger_storage_round_trip(tmp_path: Path) -> None:
    """A tensor saved as a slice of a bigger storage (and a transposed one) pickles the same again."""
    spec = LlamaSpec(dtype=torch.float32)
    sd = llama_state_dict(spec)
    big = torch.randn(4, *sd["model.norm.weight"].shape)
    sd["model.norm.weight"] = big[2]
    w = sd["model.layers.0.mlp.down_proj.weight"]
    sd["model.layers.0.mlp.down_proj.weight"] = w.t().contiguous().t()
    (tmp_path / "hf").mkdir()
    torch.save(sd, tmp_path / "hf" / "pytorch_model.bin")
    (tmp_path / "hf" / "config.json").write_text(json.dumps(spec.config()))
    ck = FullModelHFCheckpointer(str(tmp_path / "hf"), ["pytorch_model.bin"], "LLAMA3", str(tmp_path / "out"),
                                 safe_serialization=False)
    model = {k: v.clone() for k, v in ck.load_checkpoint()["model"].items()}
    ck.save_checkpoint({"model": model}, epoch=0)
    assert (tmp_path / "out" / "epoch_0" / "pytorch_model.bin").read_bytes() == (
        tmp_path / "hf" / "pytorch_model.bin").read_bytes()


def test_fresh_bin_files_are_named_like_torch_save_names_them(tmp_path: Path) -> None:
    """A safetensors input saved as ``.bin`` (and the torchtune adapter file) gets records named after the
    file, as ``torch.save(obj, path)`` writes (torchtune, transformers), not ``archive/``."""
    spec = LlamaSpec()
    (tmp_path / "hf").mkdir()
    from safetensors.torch import save_file

    save_file(llama_state_dict(spec), tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "hf" / "config.json").write_text(json.dumps(spec.config()))
    ck = FullModelHFCheckpointer(str(tmp_path / "hf"), ["model.safetensors"], "LLAMA3", str(tmp_path / "out"),
                                 safe_serialization=False)
    state = ck.load_checkpoint()
    adapter = {"layers.0.attn.q_proj.lora_a.weight": torch.zeros(2, spec.hidden)}
    ck.save_checkpoint({"model": state["model"], "adapter": adapter, "seed": 1}, epoch=0,
                       intermediate_checkpoint=True)
    out = tmp_path / "out"
    for f, prefix in [(out / "epoch_0" / "pytorch_model.bin", "pytorch_model"),
                      (out / "epoch_0" / "adapter_model.pt", "adapter_model"),
                      (out / "recipe_state" / "recipe_state.pt", "recipe_state")]:
        assert {n.split("/")[0] for n in zipfile.ZipFile(f).namelist()} == {prefix}, f
    assert not [p for p in out.rglob("*") if "shardwise-tmp" in p.name]


def test_tied_bin_index_counts_the_shared_storage_once_and_is_consistent(tmp_path: Path) -> None:
    """transformers 4.x counts a tied storage once in total_size; verify accepts it, and roundtrip (which
    writes safetensors, where both copies are stored) calls the index the same content, not a problem."""
    from shardwise import roundtrip, verify

    spec = LlamaSpec(lm_head=True, dtype=torch.float32)
    sd = llama_state_dict(spec)
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].detach()
    cfg = {**spec.config(), "tie_word_embeddings": True}
    _write(tmp_path / "hf", sd, "hf4", 12_000)
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    index = json.loads((tmp_path / "hf" / "pytorch_model.bin.index.json").read_text())
    tensor_bytes = sum(t.numel() * t.element_size() for t in sd.values())
    assert index["metadata"]["total_size"] < tensor_bytes  # the tied storage counted once
    assert verify(tmp_path / "hf").ok
    report = roundtrip(tmp_path / "hf", "LLAMA3_2")
    assert report.ok and not report.warnings, report.summary()
    assert report.details["index"]["status"] == "equal-content"
