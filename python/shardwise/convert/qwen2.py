"""QWEN2 (and, with q/k norms, QWEN3): generic names plus q/k/v biases, no RoPE permutation
(torchtune's Qwen uses rotate-half like HF). A tied ``lm_head.weight`` is kept aside on load and
written back on save only if the input had it, as a copy of the current token embedding."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..config import ModelConfig
from .base import Converter, KeyTable, LoadResult, Op, identity_op, tied_op
from .llama import attention_dims

__all__ = ["QWEN2_TABLE", "QWEN3_TABLE", "Qwen2Converter", "Qwen3Converter"]

_QWEN2_PAIRS: list[tuple[str, str | None]] = [
    ("model.embed_tokens.weight", "tok_embeddings.weight"),
    ("model.layers.{n}.self_attn.q_proj.weight", "layers.{n}.attn.q_proj.weight"),
    ("model.layers.{n}.self_attn.q_proj.bias", "layers.{n}.attn.q_proj.bias"),
    ("model.layers.{n}.self_attn.k_proj.weight", "layers.{n}.attn.k_proj.weight"),
    ("model.layers.{n}.self_attn.k_proj.bias", "layers.{n}.attn.k_proj.bias"),
    ("model.layers.{n}.self_attn.v_proj.weight", "layers.{n}.attn.v_proj.weight"),
    ("model.layers.{n}.self_attn.v_proj.bias", "layers.{n}.attn.v_proj.bias"),
    ("model.layers.{n}.self_attn.o_proj.weight", "layers.{n}.attn.output_proj.weight"),
    ("model.layers.{n}.self_attn.rotary_emb.inv_freq", None),
    ("model.layers.{n}.mlp.gate_proj.weight", "layers.{n}.mlp.w1.weight"),
    ("model.layers.{n}.mlp.up_proj.weight", "layers.{n}.mlp.w3.weight"),
    ("model.layers.{n}.mlp.down_proj.weight", "layers.{n}.mlp.w2.weight"),
    ("model.layers.{n}.input_layernorm.weight", "layers.{n}.sa_norm.scale"),
    ("model.layers.{n}.post_attention_layernorm.weight", "layers.{n}.mlp_norm.scale"),
    ("model.norm.weight", "norm.scale"),
    ("lm_head.weight", "output.weight"),
]

QWEN2_TABLE = KeyTable(_QWEN2_PAIRS)
QWEN3_TABLE = KeyTable(
    _QWEN2_PAIRS
    + [
        ("model.layers.{n}.self_attn.q_norm.weight", "layers.{n}.attn.q_norm.scale"),
        ("model.layers.{n}.self_attn.k_norm.weight", "layers.{n}.attn.k_norm.scale"),
    ]
)

_EMBED = "model.embed_tokens.weight"
_LM_HEAD = "lm_head.weight"


class Qwen2Converter(Converter):
    """HF Qwen2 keys ⇄ torchtune keys (no permutation; ``tie_word_embeddings`` decides the lm_head)."""

    family = "qwen2"
    table = QWEN2_TABLE

    def validate_config(self, cfg: ModelConfig) -> None:
        attention_dims(cfg)
        cfg.require("tie_word_embeddings", bool)

    def hf_to_tune(self, hf: Mapping[str, torch.Tensor], cfg: ModelConfig) -> LoadResult:
        self.validate_config(cfg)
        tied = cfg.require("tie_word_embeddings", bool)
        out = LoadResult({})
        for key, t in hf.items():
            if tied and key == _LM_HEAD:
                out.aside[key] = t
                continue
            new = self.table.map(key, self.family)
            if new is None:
                out.aside[key] = t
            else:
                out.tune[new] = t
        if _LM_HEAD in out.aside and _EMBED in hf:
            # the source of the tied copy: lets the save tell "unchanged" from "fine-tuned"
            out.aside[_EMBED] = hf[_EMBED]
        return out

    def tune_to_hf_ops(
        self, tune: Mapping[str, torch.Tensor], cfg: ModelConfig, aside: Mapping[str, torch.Tensor]
    ) -> list[Op]:
        inverse = self.table.inverse()
        ops = [identity_op(inverse.map(k, self.family) or k, t) for k, t in tune.items()]
        if _LM_HEAD in aside and "output.weight" not in tune and "tok_embeddings.weight" in tune:
            ops.append(tied_op(_LM_HEAD, tune["tok_embeddings.weight"], aside[_LM_HEAD], aside.get(_EMBED)))
        return self.append_aside(ops, aside)


class Qwen3Converter(Qwen2Converter):
    """Qwen2 plus ``q_norm``/``k_norm``; a tied ``lm_head.weight`` mirrors the input (kept iff it was there)."""

    family = "qwen3"
    table = QWEN3_TABLE
