"""Exact round trip HF → load_checkpoint → save_checkpoint → HF for generated Llama-family checkpoints."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from ckpt_factory import LlamaSpec, llama_state_dict, split_keys, write_hf_checkpoint
from shardwise import FullModelHFCheckpointer
from shardwise.convert import permute_to_hf, permute_to_tune

LLAMA_TYPES = ["LLAMA2", "LLAMA3", "LLAMA3_2", "MISTRAL", "GEMMA"]


@st.composite
def specs(draw):
    kv = draw(st.integers(1, 3))
    groups = draw(st.integers(1, 3))
    head_dim = draw(st.sampled_from([8, 12, 16]))
    heads = kv * groups
    hidden = draw(st.sampled_from([16, 24, 40]).filter(lambda h: h != heads * head_dim or True))
    return LlamaSpec(
        layers=draw(st.integers(1, 3)),
        heads=heads,
        kv_heads=kv,
        head_dim=head_dim,
        hidden=hidden,
        intermediate=draw(st.sampled_from([8, 20])),
        vocab=draw(st.integers(3, 20)),
        dtype=draw(st.sampled_from([torch.bfloat16, torch.float16, torch.float32])),
        inv_freq=draw(st.booleans()),
        lm_head=draw(st.booleans()),
    )


metadata_st = st.one_of(
    st.none(),
    st.just({"format": "pt"}),
    st.dictionaries(st.text("abcxyz_", min_size=1, max_size=6), st.text(max_size=8), min_size=1, max_size=3),
)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    spec=specs(),
    n_shards=st.integers(1, 5),
    cuts=st.lists(st.integers(1, 60), max_size=6),
    metadata=metadata_st,
    model_type=st.sampled_from(LLAMA_TYPES),
    seed=st.integers(0, 2**16),
)
def test_exact_roundtrip(spec, n_shards, cuts, metadata, model_type, seed):
    sd = llama_state_dict(spec, seed)
    keys = list(sd)
    groups = split_keys(keys, sorted(cuts)[: n_shards - 1])
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "hf"
        names = write_hf_checkpoint(src, sd, groups, spec.config(), metadata)
        out = Path(tmp) / "out"
        ck = FullModelHFCheckpointer(str(src), list(reversed(names)), model_type, str(out))
        state = ck.load_checkpoint()
        assert not any("inv_freq" in k for k in state["model"])
        ck.save_checkpoint(state, epoch=0)
        before, after = _files(src), _files(out / "epoch_0")
        for name in names:
            assert after[name] == before[name], name
        if len(names) > 1:
            assert json.loads(after["model.safetensors.index.json"]) == json.loads(
                before["model.safetensors.index.json"]
            )
            assert after["model.safetensors.index.json"] == before["model.safetensors.index.json"]
        else:
            assert "model.safetensors.index.json" not in after
        assert after["config.json"] == before["config.json"]
        assert not [p for p in out.iterdir() if p.name.startswith(".")]


@settings(max_examples=30, deadline=None)
@given(
    n_heads=st.integers(1, 4),
    half=st.integers(1, 6),
    cols=st.integers(1, 5),
    extra_dims=st.booleans(),
)
def test_qk_permutation_formula(n_heads, half, cols, extra_dims):
    hd = 2 * half
    shape = (n_heads * hd, cols) if extra_dims else (n_heads * hd,)
    hf = torch.arange(torch.Size(shape).numel(), dtype=torch.float64).reshape(shape)
    tune = permute_to_tune(hf, n_heads, hd)
    for h in range(n_heads):
        for i in range(2):
            for j in range(half):
                assert torch.equal(tune[h * hd + 2 * j + i], hf[h * hd + i * half + j])
    back = permute_to_hf(tune, n_heads, hd)
    assert torch.equal(back, hf)
    for h in range(n_heads):
        for i in range(2):
            for j in range(half):
                assert torch.equal(back[h * hd + i * half + j], tune[h * hd + 2 * j + i])


def test_loaded_tensors_match_files(tmp_path):
    spec = LlamaSpec(layers=2, heads=4, kv_heads=2, head_dim=8, hidden=24, inv_freq=True)
    sd = llama_state_dict(spec, 3)
    names = write_hf_checkpoint(tmp_path / "hf", sd, split_keys(list(sd), [5, 14]), spec.config())
    ck = FullModelHFCheckpointer(str(tmp_path / "hf"), names, "LLAMA3", str(tmp_path / "out"))
    model = ck.load_checkpoint()["model"]
    hd = spec.head_dim
    for n in range(spec.layers):
        q = sd[f"model.layers.{n}.self_attn.q_proj.weight"]
        assert torch.equal(model[f"layers.{n}.attn.q_proj.weight"], permute_to_tune(q, spec.heads, hd))
        assert torch.equal(model[f"layers.{n}.attn.v_proj.weight"], sd[f"model.layers.{n}.self_attn.v_proj.weight"])
        assert model[f"layers.{n}.mlp.w1.weight"].dtype == spec.dtype
    assert torch.equal(model["tok_embeddings.weight"], sd["model.embed_tokens.weight"])
    assert torch.equal(model["output.weight"], sd["lm_head.weight"])
    assert len(model) == len(sd) - spec.layers  # inv_freq kept aside, not returned


def test_loaded_tensors_are_zero_copy_views(tmp_path):
    spec = LlamaSpec(layers=1, heads=2, kv_heads=2, head_dim=8, hidden=16)
    sd = llama_state_dict(spec)
    names = write_hf_checkpoint(tmp_path / "hf", sd, [list(sd)], spec.config())
    ck = FullModelHFCheckpointer(str(tmp_path / "hf"), names, "LLAMA2", str(tmp_path / "out"))
    model = ck.load_checkpoint()["model"]
    emb, norm = model["tok_embeddings.weight"], model["norm.scale"]
    # both are views into one mapping of the file, not separate allocations
    assert emb.untyped_storage().data_ptr() == norm.untyped_storage().data_ptr()
    assert emb.untyped_storage().nbytes() == (tmp_path / "hf" / names[0]).stat().st_size


def test_changed_weights_get_fresh_layout_like_safetensors(tmp_path):
    from safetensors.torch import save_file

    spec = LlamaSpec(layers=1, heads=2, kv_heads=1, head_dim=8, hidden=16, dtype=torch.float16)
    sd = llama_state_dict(spec)
    # one metadata key: safetensors orders several keys randomly (its HashMap), so only then can
    # its output be compared byte for byte
    names = write_hf_checkpoint(tmp_path / "hf", sd, [list(sd)], spec.config(), {"format": "np"})
    ck = FullModelHFCheckpointer(str(tmp_path / "hf"), names, "LLAMA3", str(tmp_path / "out"))
    state = ck.load_checkpoint()
    model = dict(state["model"])
    model["norm.scale"] = model["norm.scale"].float()  # a dtype change: the header must change
    ck.save_checkpoint({"model": model}, epoch=1)
    out = (tmp_path / "out" / "epoch_1" / "model.safetensors").read_bytes()
    expected = dict(sd)
    expected["model.norm.weight"] = sd["model.norm.weight"].float()
    save_file(expected, str(tmp_path / "ref.safetensors"), metadata={"format": "np"})
    assert out == (tmp_path / "ref.safetensors").read_bytes()


def test_changed_weights_keep_every_metadata_key(tmp_path):
    spec = LlamaSpec(layers=1, heads=2, kv_heads=1, head_dim=8, hidden=16)
    sd = llama_state_dict(spec)
    meta = {"format": "pt", "z": "1", "producer": "someone"}
    names = write_hf_checkpoint(tmp_path / "hf", sd, [list(sd)], spec.config(), meta)
    ck = FullModelHFCheckpointer(str(tmp_path / "hf"), names, "LLAMA3", str(tmp_path / "out"))
    model = dict(ck.load_checkpoint()["model"])
    model["norm.scale"] = model["norm.scale"] * 2
    model["norm.scale"] = model["norm.scale"].float()
    ck.save_checkpoint({"model": model}, epoch=1)
    with safe_open(str(tmp_path / "out" / "epoch_1" / "model.safetensors"), "pt") as f:
        assert f.metadata() == meta
        assert torch.equal(f.get_tensor("model.norm.weight"), (sd["model.norm.weight"] * 2).float())


@pytest.mark.parametrize("model_type", LLAMA_TYPES)
def test_every_llama_type_loads(tmp_path, model_type):
    spec = LlamaSpec(layers=1)
    sd = llama_state_dict(spec)
    names = write_hf_checkpoint(tmp_path / "hf", sd, [list(sd)], spec.config())
    ck = FullModelHFCheckpointer(str(tmp_path / "hf"), names, model_type, str(tmp_path / "out"))
    assert set(ck.load_checkpoint()["model"]) >= {"tok_embeddings.weight", "layers.0.attn.q_proj.weight"}
