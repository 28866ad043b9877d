"""QWEN3: the Qwen2 mapping (q/k/v biases when present, no RoPE permutation) plus per-head
``q_norm``/``k_norm``. A tied ``lm_head.weight`` mirrors the input: torchtune (post-0.6.1) always
writes one on save; shardwise writes it only if the loaded files had it (most Qwen3 hub
checkpoints do, the 4B one does not), as a copy of the current token embedding."""

from __future__ import annotations

from .base import KeyTable
from .qwen2 import QWEN2_PAIRS, Qwen2Converter

__all__ = ["QWEN3_TABLE", "Qwen3Converter"]

QWEN3_TABLE = KeyTable(
    QWEN2_PAIRS
    + [
        ("model.layers.{n}.self_attn.q_norm.weight", "layers.{n}.attn.q_norm.scale"),
        ("model.layers.{n}.self_attn.k_norm.weight", "layers.{n}.attn.k_norm.scale"),
    ]
)


class Qwen3Converter(Qwen2Converter):
    """HF Qwen3 keys ⇄ torchtune keys; ``tie_word_embeddings`` decides whether lm_head is kept aside."""

    family = "qwen3"
    table = QWEN3_TABLE
