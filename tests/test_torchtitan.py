"""shardwise.torchtitan: torchtitan's HF save and load through shardwise (llama3 debug model, 2 ranks)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from dist_helpers import run_ranks

pytest.importorskip("torchtitan")


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            out.update(load_file(folder / name))
    return out


def test_hf_save_once_from_every_rank_and_load(tmp_path: Path) -> None:
    import titan_scenarios as T

    res = run_ranks(T.hf_save_load, 2, str(tmp_path), timeout=300)
    theirs, ours, ours_async = tmp_path / "theirs" / "step-3", tmp_path / "ours" / "step-3", tmp_path / "ours_async"
    # torchtitan's path leaves its per-rank files in sharded/ beside the consolidated ones
    assert (theirs / "sharded").is_dir()
    assert sorted(os.listdir(ours)) == sorted(n for n in os.listdir(theirs) if n != "sharded")
    assert not (ours / "sharded").exists()
    a, b = tensors(theirs), tensors(ours)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    index = "model.safetensors.index.json"
    def weight_map(folder: Path) -> dict[str, str]:
        return json.loads((folder / index).read_text())["weight_map"]

    assert weight_map(ours) == weight_map(theirs)
    # the async HF save writes the same bytes as the synchronous one
    assert all((ours / n).read_bytes() == (ours_async / n).read_bytes() for n in os.listdir(ours))
    for r in range(2):
        assert res[r]["fresh_differed"] and res[r]["loaded_equal"], r
        assert res[r]["same_logits"] and res[r]["trained"], r
    # transformers loads the output as a LlamaForCausalLM (torchtitan writes no config: one made here)
    import transformers

    q, k, gate = b["model.layers.0.self_attn.q_proj.weight"], b["model.layers.0.self_attn.k_proj.weight"], \
        b["model.layers.0.mlp.gate_proj.weight"]
    heads = 16
    cfg = transformers.LlamaConfig(vocab_size=b["model.embed_tokens.weight"].shape[0], hidden_size=q.shape[1],
                                   intermediate_size=gate.shape[0], num_hidden_layers=6, num_attention_heads=heads,
                                   num_key_value_heads=k.shape[0] // (q.shape[0] // heads), tie_word_embeddings=False)
    import shutil

    hf_dir = tmp_path / "hf"
    shutil.copytree(ours, hf_dir)
    cfg.save_pretrained(hf_dir)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    sd = model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in b.items())
