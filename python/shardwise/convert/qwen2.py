"""QWEN2: generic names plus q/k/v biases, no RoPE permutation (torchtune's Qwen2 uses rotate-half
like HF). With ``tie_word_embeddings`` a ``lm_head.weight`` in the files is kept aside on load and
written back on save only if the input had it, as a copy of the current token embedding."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..config import ModelConfig
from .base import Converter, KeyTable, LoadResult, Op, identity_op, tied_op
from .llama import attention_dims, llama_pairs

__all__ = ["QWEN2_PAIRS", "QWEN2_TABLE", "Qwen2Converter"]

QWEN2_PAIRS: list[tuple[str, str | None]] = llama_pairs(
    add=[(f"model.layers.{{n}}.self_attn.{p}_proj.bias", f"layers.{{n}}.attn.{p}_proj.bias") for p in "qkv"]
)

QWEN2_TABLE = KeyTable(QWEN2_PAIRS)

_EMBED = "model.embed_tokens.weight"
_LM_HEAD = "lm_head.weight"


class Qwen2Converter(Converter):
    """HF Qwen2 keys ⇄ torchtune keys (no permutation; ``tie_word_embeddings`` decides the lm_head)."""

    family = "qwen2"
    table: KeyTable = QWEN2_TABLE

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
        ops: list[Op] = []
        for key, t in tune.items():
            new = inverse.map(key, self.family)
            assert new is not None
            ops.append(identity_op(new, t))
        if _LM_HEAD in aside and "output.weight" not in tune and "tok_embeddings.weight" in tune:
            ops.append(tied_op(_LM_HEAD, tune["tok_embeddings.weight"], aside[_LM_HEAD], aside.get(_EMBED)))
        return self.append_aside(ops, aside)

