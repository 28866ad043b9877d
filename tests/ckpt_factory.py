"""Builders of synthetic HF checkpoints for the tests (random tensors, written by the real libraries)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file


@dataclass
class LlamaSpec:
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    hidden: int = 48
    intermediate: int = 40
    vocab: int = 37
    dtype: torch.dtype = torch.bfloat16
    inv_freq: bool = False
    lm_head: bool = True
    extra_config: dict = field(default_factory=dict)

    def config(self) -> dict:
        cfg = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "vocab_size": self.vocab,
            "tie_word_embeddings": not self.lm_head,
        }
        cfg.update(self.extra_config)
        return cfg


def _rand(shape: Sequence[int], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float32).to(dtype)


def llama_state_dict(spec: LlamaSpec, seed: int = 0) -> dict[str, torch.Tensor]:
    """An HF Llama state dict in HF key order (embed, layers, norm, lm_head)."""
    g = torch.Generator().manual_seed(seed)
    d, hd = spec.hidden, spec.head_dim
    sd: dict[str, torch.Tensor] = {"model.embed_tokens.weight": _rand((spec.vocab, d), spec.dtype, g)}
    for n in range(spec.layers):
        p = f"model.layers.{n}."
        sd[p + "self_attn.q_proj.weight"] = _rand((spec.heads * hd, d), spec.dtype, g)
        sd[p + "self_attn.k_proj.weight"] = _rand((spec.kv_heads * hd, d), spec.dtype, g)
        sd[p + "self_attn.v_proj.weight"] = _rand((spec.kv_heads * hd, d), spec.dtype, g)
        sd[p + "self_attn.o_proj.weight"] = _rand((d, spec.heads * hd), spec.dtype, g)
        if spec.inv_freq:
            sd[p + "self_attn.rotary_emb.inv_freq"] = torch.rand(hd // 2, generator=g)
        sd[p + "mlp.gate_proj.weight"] = _rand((spec.intermediate, d), spec.dtype, g)
        sd[p + "mlp.up_proj.weight"] = _rand((spec.intermediate, d), spec.dtype, g)
        sd[p + "mlp.down_proj.weight"] = _rand((d, spec.intermediate), spec.dtype, g)
        sd[p + "input_layernorm.weight"] = _rand((d,), spec.dtype, g)
        sd[p + "post_attention_layernorm.weight"] = _rand((d,), spec.dtype, g)
    sd["model.norm.weight"] = _rand((d,), spec.dtype, g)
    if spec.lm_head:
        sd["lm_head.weight"] = _rand((spec.vocab, d), spec.dtype, g)
    return sd


def split_keys(keys: Sequence[str], cuts: Sequence[int]) -> list[list[str]]:
    """Split ``keys`` into consecutive non-empty groups at the given cut positions."""
    bounds = [0, *sorted(set(c for c in cuts if 0 < c < len(keys))), len(keys)]
    return [list(keys[a:b]) for a, b in zip(bounds, bounds[1:])]


def write_hf_checkpoint(
    folder: Path,
    sd: Mapping[str, torch.Tensor],
    groups: Sequence[Sequence[str]],
    config: Mapping,
    metadata: Mapping[str, str] | None = None,
    index: bool | None = None,
) -> list[str]:
    """Write shards like ``save_pretrained`` does (``model-0000k-of-0000n.safetensors`` + index sorted,
    indent 2, trailing newline); a single group becomes ``model.safetensors`` without an index."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(dict(config), indent=2))
    n = len(groups)
    names = []
    weight_map = {}
    total = 0
    for i, keys in enumerate(groups, 1):
        name = "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
        save_file({k: sd[k].contiguous() for k in keys}, str(folder / name), metadata=dict(metadata or {}) or None)
        names.append(name)
        for k in keys:
            weight_map[k] = name
            total += sd[k].numel() * sd[k].element_size()
    if index if index is not None else n > 1:
        content = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
    return names
