"""GEMMA2: the Llama-family mapping (q/k RoPE permutation, ``head_dim`` from config) with Gemma2's
four per-layer norms mapped to the torchtune modules that really apply them.

torchtune 0.6.1 swaps the pre- and post-feed-forward norms (a silent numerical bug, fixed upstream
later); here ``pre_feedforward_layernorm`` is ``mlp_norm`` (applied before the MLP) and
``post_feedforward_layernorm`` is ``mlp_scale`` (applied after it)."""

from __future__ import annotations

from .base import KeyTable
from .llama import LlamaConverter, llama_pairs

__all__ = ["GEMMA2_TABLE", "Gemma2Converter"]

GEMMA2_TABLE = KeyTable(
    llama_pairs(
        retarget={
            "model.layers.{n}.post_attention_layernorm.weight": "layers.{n}.sa_scale.scale",
            "model.norm.weight": "norm.rms_norm.scale",
        },
        add=[
            ("model.layers.{n}.pre_feedforward_layernorm.weight", "layers.{n}.mlp_norm.scale"),
            ("model.layers.{n}.post_feedforward_layernorm.weight", "layers.{n}.mlp_scale.scale"),
        ],
    )
)


class Gemma2Converter(LlamaConverter):
    """HF Gemma2 keys ⇄ torchtune keys, norms mapped correctly (see the module docstring)."""

    family = "gemma2"

    def __init__(self) -> None:
        super().__init__(GEMMA2_TABLE)
