"""REWARD: a Llama/Mistral sequence classifier with one label. ``score.weight`` is torchtune's
``output.weight``; ``score.bias`` and ``rotary_emb.inv_freq`` are kept aside and written back
(torchtune 0.6.1 drops the first and mis-assigns the second); ``head_dim`` from config is honoured."""

from __future__ import annotations

from .base import KeyTable
from .llama import LlamaConverter, llama_pairs

__all__ = ["REWARD_TABLE", "RewardConverter"]

REWARD_TABLE = KeyTable(
    llama_pairs(remove=["lm_head.weight"], add=[("score.weight", "output.weight"), ("score.bias", None)])
)


class RewardConverter(LlamaConverter):
    """HF ``*ForSequenceClassification`` (Llama/Mistral) keys ⇄ torchtune reward-model keys."""

    family = "reward"

    def __init__(self) -> None:
        super().__init__(REWARD_TABLE)
