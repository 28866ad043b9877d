"""A tiny Llama-3-style Hugging Face checkpoint, generated deterministically on the fly.

It is what ``shardwise roundtrip`` (no folder) runs on: a few MB of bf16 weights in two shards and an
index, laid out exactly as ``transformers``' ``save_pretrained`` writes them (``safetensors.torch
.save_file`` with ``{"format": "pt"}`` metadata; the index with ``indent=2, sort_keys=True`` and a
trailing newline).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .constants import SAFETENSOR_INDEX_FNAME

__all__ = ["SAMPLE_CONFIG", "SAMPLE_MODEL_TYPE", "sample_state_dict", "write_sample"]

#: the ``shardwise`` ModelType to convert the sample with
SAMPLE_MODEL_TYPE = "LLAMA3"

SAMPLE_CONFIG: dict[str, object] = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "head_dim": 32,
    "hidden_act": "silu",
    "hidden_size": 256,
    "intermediate_size": 688,
    "max_position_embeddings": 2048,
    "model_type": "llama",
    "num_attention_heads": 8,
    "num_hidden_layers": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "vocab_size": 1024,
}


def sample_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """The sample's weights in HF key order (embeddings, layers, final norm, lm_head), bf16."""
    c = SAMPLE_CONFIG
    g = torch.Generator().manual_seed(seed)
    d, hd = int(c["hidden_size"]), int(c["head_dim"])  # type: ignore[call-overload]
    heads, kv = int(c["num_attention_heads"]), int(c["num_key_value_heads"])  # type: ignore[call-overload]
    inter, vocab = int(c["intermediate_size"]), int(c["vocab_size"])  # type: ignore[call-overload]

    def w(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    def norm() -> torch.Tensor:
        return (1.0 + torch.randn(d, generator=g) * 0.01).to(torch.bfloat16)

    sd = {"model.embed_tokens.weight": w(vocab, d)}
    for n in range(int(c["num_hidden_layers"])):  # type: ignore[call-overload]
        p = f"model.layers.{n}."
        sd[p + "self_attn.q_proj.weight"] = w(heads * hd, d)
        sd[p + "self_attn.k_proj.weight"] = w(kv * hd, d)
        sd[p + "self_attn.v_proj.weight"] = w(kv * hd, d)
        sd[p + "self_attn.o_proj.weight"] = w(d, heads * hd)
        sd[p + "mlp.gate_proj.weight"] = w(inter, d)
        sd[p + "mlp.up_proj.weight"] = w(inter, d)
        sd[p + "mlp.down_proj.weight"] = w(d, inter)
        sd[p + "input_layernorm.weight"] = norm()
        sd[p + "post_attention_layernorm.weight"] = norm()
    sd["model.norm.weight"] = norm()
    sd["lm_head.weight"] = w(vocab, d)
    return sd


def write_sample(folder: str | Path, seed: int = 0, shards: int = 2) -> Path:
    """Write the sample checkpoint into ``folder`` (created) and return it.

    Tensors are split into ``shards`` consecutive groups of about equal size, as ``save_pretrained``
    does with a ``max_shard_size``; ``config.json`` and ``generation_config.json`` are written too.
    """
    from safetensors.torch import save_file

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    sd = sample_state_dict(seed)
    sizes = {k: t.numel() * t.element_size() for k, t in sd.items()}
    total = sum(sizes.values())
    groups: list[list[str]] = [[]]
    acc = 0
    for k in sd:
        if groups[-1] and acc >= total * len(groups) / shards and len(groups) < shards:
            groups.append([])
        groups[-1].append(k)
        acc += sizes[k]
    n = len(groups)
    weight_map: dict[str, str] = {}
    for i, keys in enumerate(groups, 1):
        name = "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
        save_file({k: sd[k] for k in keys}, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, name))
    if n > 1:
        index = {
            "metadata": {"total_parameters": sum(t.numel() for t in sd.values()), "total_size": total},
            "weight_map": weight_map,
        }
        (out / SAFETENSOR_INDEX_FNAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    (out / "config.json").write_text(json.dumps(SAMPLE_CONFIG, indent=2, sort_keys=True) + "\n")
    generation = {"bos_token_id": 1, "eos_token_id": 2, "do_sample": True, "temperature": 0.6, "top_p": 0.9}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2, sort_keys=True) + "\n")
    return out
