"""T5_ENCODER: the encoder of an HF T5 checkpoint (``T5EncoderModel`` or
``T5ForConditionalGeneration``, gated-GELU v1.1 layout), load and save.

The decoder, ``lm_head.weight`` and ``shared.weight`` are not part of torchtune's encoder and are
kept aside. HF ties ``shared.weight`` (and ``decoder.embed_tokens.weight``) to the encoder's token
embedding, so on save those copies follow the current ``token_embedding.weight`` once it changed.
Checkpoints written by recent transformers store only ``shared.weight``; it is then the source of
``token_embedding.weight`` and ``encoder.embed_tokens.weight`` is not invented on save."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..config import ModelConfig
from .base import Converter, KeyTable, LoadResult, Op, identity_op, tied_op

__all__ = ["T5_ENCODER_TABLE", "T5EncoderConverter"]

_B = "encoder.block.{n}.layer"
_EMBED = "encoder.embed_tokens.weight"
_SHARED = "shared.weight"
_TOKEN = "token_embedding.weight"

T5_ENCODER_TABLE = KeyTable(
    [
        (_EMBED, _TOKEN),
        (
            "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            "relative_position_bias.embedding.weight",
        ),
        (f"{_B}.0.SelfAttention.q.weight", "layers.{n}.attn.q_proj.weight"),
        (f"{_B}.0.SelfAttention.k.weight", "layers.{n}.attn.k_proj.weight"),
        (f"{_B}.0.SelfAttention.v.weight", "layers.{n}.attn.v_proj.weight"),
        (f"{_B}.0.SelfAttention.o.weight", "layers.{n}.attn.output_proj.weight"),
        (f"{_B}.0.layer_norm.weight", "layers.{n}.sa_norm.scale"),
        (f"{_B}.1.DenseReluDense.wi_0.weight", "layers.{n}.mlp.w1.weight"),
        (f"{_B}.1.DenseReluDense.wo.weight", "layers.{n}.mlp.w2.weight"),
        (f"{_B}.1.DenseReluDense.wi_1.weight", "layers.{n}.mlp.w3.weight"),
        (f"{_B}.1.layer_norm.weight", "layers.{n}.mlp_norm.scale"),
        ("encoder.final_layer_norm.weight", "final_norm.scale"),
        (_SHARED, None),
        ("lm_head.weight", None),
    ]
)


def _tied_keys(cfg: ModelConfig) -> tuple[str, ...]:
    """HF keys that transformers ties to the encoder embedding (``lm_head`` only when word embeddings are tied)."""
    keys: tuple[str, ...] = (_SHARED, "decoder.embed_tokens.weight")
    if cfg.get("tie_word_embeddings", True) is True:
        keys += ("lm_head.weight",)
    return keys


class T5EncoderConverter(Converter):
    """HF T5 encoder keys ⇄ torchtune ``t5_encoder`` keys; decoder and shared copies kept aside."""

    family = "t5_encoder"

    def hf_to_tune(self, hf: Mapping[str, torch.Tensor], cfg: ModelConfig) -> LoadResult:
        out = LoadResult({})
        for key, t in hf.items():
            if key.startswith("decoder."):
                out.aside[key] = t
                continue
            new = T5_ENCODER_TABLE.map(key, self.family)
            if new is None or new == _TOKEN:
                # the embedding itself is also kept aside: its presence tells the save whether the
                # input had ``encoder.embed_tokens.weight``, and its value whether it was changed
                out.aside[key] = t
            if new is not None:
                out.tune[new] = t
        if _TOKEN not in out.tune and _SHARED in hf:
            out.tune[_TOKEN] = hf[_SHARED]
        return out

    def tune_to_hf_ops(
        self, tune: Mapping[str, torch.Tensor], cfg: ModelConfig, aside: Mapping[str, torch.Tensor]
    ) -> list[Op]:
        inverse = T5_ENCODER_TABLE.inverse()
        ops: list[Op] = []
        token = tune.get(_TOKEN)
        only_shared = _SHARED in aside and _EMBED not in aside
        for key, t in tune.items():
            if key == _TOKEN and only_shared:
                continue  # the input stored the embedding only as ``shared.weight``
            new = inverse.map(key, self.family)
            assert new is not None
            ops.append(identity_op(new, t))
        if token is not None:
            original = aside.get(_EMBED, aside.get(_SHARED))
            for key in _tied_keys(cfg):
                if key in aside:
                    ops.append(tied_op(key, token, aside[key], original))
        return self.append_aside(ops, aside)
