"""GEMMA2: the Llama-family mapping (q/k RoPE permutation, ``head_dim`` from config) with Gemma2's
four per-layer norms mapped to the torchtune modules that really apply them.

torchtune 0.6.1 swaps the pre- and post-feed-forward norms (a silent numerical bug, fixed upstream
later); here ``pre_feedforward_layernorm`` is ``mlp_norm`` (applied before the MLP) and
``post_feedforward_layernorm`` is ``mlp_scale`` (applied after it)."""

from __future__ import annotations

from .base import KeyTable
from .llama import LlamaConverter

__all__ = ["GEMMA2_TABLE", "Gemma2Converter"]

GEMMA2_TABLE = KeyTable(
    [
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
        ("model.layers.{n}.post_attention_layernorm.weight", "layers.{n}.sa_scale.scale"),
        ("model.layers.{n}.pre_feedforward_layernorm.weight", "layers.{n}.mlp_norm.scale"),
        ("model.layers.{n}.post_feedforward_layernorm.weight", "layers.{n}.mlp_scale.scale"),
        ("model.norm.weight", "norm.rms_norm.scale"),
        ("lm_head.weight", "output.weight"),
    ]
)


class Gemma2Converter(LlamaConverter):
    """HF Gemma2 keys ⇄ torchtune keys, norms mapped correctly (see the module docstring)."""

    family = "gemma2"

    def __init__(self) -> None:
        super().__init__(GEMMA2_TABLE)
