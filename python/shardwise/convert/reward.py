"""REWARD: a Llama/Mistral sequence classifier with one label. ``score.weight`` is torchtune's
``output.weight``; ``score.bias`` and ``rotary_emb.inv_freq`` are kept aside and written back
(torchtune 0.6.1 drops the first and mis-assigns the second); ``head_dim`` from config is honoured."""

from __future__ import annotations

from .base import KeyTable
from .llama import LlamaConverter

__all__ = ["REWARD_TABLE", "RewardConverter"]

REWARD_TABLE = KeyTable(
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
        ("model.layers.{n}.post_attention_layernorm.weight", "layers.{n}.mlp_norm.scale"),
        ("model.norm.weight", "norm.scale"),
        ("score.weight", "output.weight"),
        ("score.bias", None),
    ]
)


class RewardConverter(LlamaConverter):
    """HF ``*ForSequenceClassification`` (Llama/Mistral) keys ⇄ torchtune reward-model keys."""

    family = "reward"

    def __init__(self) -> None:
        super().__init__(REWARD_TABLE)
