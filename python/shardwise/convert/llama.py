"""The generic Llama-family mapping (LLAMA2, LLAMA3, LLAMA3_2, MISTRAL, GEMMA): q/k RoPE permutation,
``head_dim`` from config, ``rotary_emb.inv_freq`` kept aside. Tied models (``tie_word_embeddings``)
have no ``output.weight`` in torchtune (``TiedLinear``): a ``lm_head.weight`` stored anyway is kept
aside and written back as the current embedding, so a strict load into a tied model works."""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from ..config import ModelConfig
from .base import Converter, KeyTable, LoadResult, Op, identity_op, permute_to_tune, permuted_op, tied_op

__all__ = ["LLAMA_PAIRS", "LLAMA_TABLE", "LlamaConverter", "attention_dims", "llama_pairs"]

_LM_HEAD = "lm_head.weight"
_EMBED = "model.embed_tokens.weight"

LLAMA_PAIRS: list[tuple[str, str | None]] = [
        ("model.embed_tokens.weight", "tok_embeddings.weight"),
        ("model.layers.{n}.self_attn.q_proj.weight", "layers.{n}.attn.q_proj.weight"),
        ("model.layers.{n}.self_attn.k_proj.weight", "layers.{n}.attn.k_proj.weight"),
        ("model.layers.{n}.self_attn.v_proj.weight", "layers.{n}.attn.v_proj.weight"),
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
LLAMA_TABLE = KeyTable(LLAMA_PAIRS)


def llama_pairs(
    *,
    retarget: Mapping[str, str | None] | None = None,
    remove: Iterable[str] = (),
    add: Iterable[tuple[str, str | None]] = (),
) -> list[tuple[str, str | None]]:
    """The generic Llama key pairs with a family's differences: HF keys mapped elsewhere (``retarget``),
    HF keys the family does not have (``remove``) and extra entries (``add``)."""
    retarget = retarget or {}
    gone = set(remove)
    pairs = [(hf, retarget.get(hf, tune)) for hf, tune in LLAMA_PAIRS if hf not in gone]
    return pairs + list(add)


def attention_dims(cfg: ModelConfig, use_head_dim: bool = True) -> tuple[int, int, int]:
    """``(num_heads, num_kv_heads, head_dim)`` from config; head_dim defaults to hidden/heads."""
    n_heads = cfg.require_int("num_attention_heads")
    n_kv = cfg.require_int("num_key_value_heads")
    dim = cfg.require_int("hidden_size")
    head_dim = cfg.optional_int("head_dim") if use_head_dim else None
    return n_heads, n_kv, head_dim or dim // n_heads


class LlamaConverter(Converter):
    """HF Llama-style keys ⇄ torchtune keys with the q/k RoPE row permutation."""

    family = "llama"

    def __init__(self, table: KeyTable = LLAMA_TABLE, use_head_dim: bool = True) -> None:
        self.table = table
        self.inverse_table = table.inverse()
        self.use_head_dim = use_head_dim

    def validate_config(self, cfg: ModelConfig) -> None:
        attention_dims(cfg, self.use_head_dim)

    def _heads_for(self, key: str, n_heads: int, n_kv: int) -> int | None:
        """How many heads to permute a tune key's rows with (None: not permuted)."""
        if key.endswith("attn.q_proj.weight"):
            return n_heads
        if key.endswith("attn.k_proj.weight"):
            return n_kv
        return None

    def hf_to_tune(self, hf: Mapping[str, torch.Tensor], cfg: ModelConfig) -> LoadResult:
        n_heads, n_kv, head_dim = attention_dims(cfg, self.use_head_dim)
        out = LoadResult({})
        tied = cfg.get("tie_word_embeddings") is True
        for key, t in hf.items():
            new = None if tied and key == _LM_HEAD else self.table.map(key, self.family)
            if new is None:
                out.aside[key] = t
                continue
            heads = self._heads_for(new, n_heads, n_kv)
            out.tune[new] = t if heads is None else permute_to_tune(t, heads, head_dim, key)
        if _LM_HEAD in out.aside and _EMBED in hf:
            out.aside[_EMBED] = hf[_EMBED]  # tells "unchanged" from "fine-tuned" on save
        return out

    def tune_to_hf_ops(
        self, tune: Mapping[str, torch.Tensor], cfg: ModelConfig, aside: Mapping[str, torch.Tensor]
    ) -> list[Op]:
        n_heads, n_kv, head_dim = attention_dims(cfg, self.use_head_dim)
        ops: list[Op] = []
        for key, t in tune.items():
            new = self.inverse_table.map(key, self.family)
            assert new is not None
            heads = self._heads_for(key, n_heads, n_kv)
            if heads is None:
                ops.append(identity_op(new, t))
            else:
                ops.append(permuted_op(new, t, heads, head_dim, key))
        if _LM_HEAD in aside and "output.weight" not in tune and "tok_embeddings.weight" in tune:
            ops.append(tied_op(_LM_HEAD, tune["tok_embeddings.weight"], aside[_LM_HEAD], aside.get(_EMBED)))
        return self.append_aside(ops, aside)
