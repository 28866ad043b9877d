"""CLIP_TEXT: the text tower of an HF ``CLIPModel`` checkpoint (keys ``text_model.*``), load and
save. The vision tower, ``logit_scale``, ``position_ids`` and the two projections are not part of
torchtune's text encoder: they are kept aside and written back unchanged. No permutation."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..config import ModelConfig
from .base import Converter, KeyTable, LoadResult, Op, identity_op

__all__ = ["CLIP_TEXT_TABLE", "ClipTextConverter"]

_L = "text_model.encoder.layers.{n}"

CLIP_TEXT_TABLE = KeyTable(
    [
        ("text_model.embeddings.token_embedding.weight", "token_embedding.weight"),
        ("text_model.embeddings.position_embedding.weight", "position_embedding"),
        ("text_model.embeddings.position_ids", None),
        ("text_model.final_layer_norm.weight", "final_norm.weight"),
        ("text_model.final_layer_norm.bias", "final_norm.bias"),
        ("logit_scale", None),
        ("text_projection.weight", None),
        ("visual_projection.weight", None),
    ]
    + [
        (f"{_L}.{hf}.{p}", f"layers.{{n}}.{tune}.{p}")
        for hf, tune in [
            ("layer_norm1", "sa_norm"),
            ("layer_norm2", "mlp_norm"),
            ("mlp.fc1", "mlp.w1"),
            ("mlp.fc2", "mlp.w2"),
            ("self_attn.q_proj", "attn.q_proj"),
            ("self_attn.k_proj", "attn.k_proj"),
            ("self_attn.v_proj", "attn.v_proj"),
            ("self_attn.out_proj", "attn.output_proj"),
        ]
        for p in ("weight", "bias")
    ]
)


class ClipTextConverter(Converter):
    """HF CLIP text-tower keys ⇄ torchtune ``clip_text_encoder`` keys; everything else kept aside."""

    family = "clip_text"

    def hf_to_tune(self, hf: Mapping[str, torch.Tensor], cfg: ModelConfig) -> LoadResult:
        out = LoadResult({})
        for key, t in hf.items():
            if key.startswith("vision_model."):
                out.aside[key] = t
                continue
            new = CLIP_TEXT_TABLE.map(key, self.family)
            if new is None:
                out.aside[key] = t
            else:
                out.tune[new] = t
        return out

    def tune_to_hf_ops(
        self, tune: Mapping[str, torch.Tensor], cfg: ModelConfig, aside: Mapping[str, torch.Tensor]
    ) -> list[Op]:
        inverse = CLIP_TEXT_TABLE.inverse()
        ops: list[Op] = []
        for key, t in tune.items():
            new = inverse.map(key, self.family)
            assert new is not None
            ops.append(identity_op(new, t))
        return self.append_aside(ops, aside)
