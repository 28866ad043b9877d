"""CLIP_TEXT: the text tower of an HF CLIP checkpoint, load and save, in either key layout:

- ``text_model.*``: ``CLIPModel`` (whose vision tower, ``logit_scale``, ``position_ids`` and two
  projections are not part of torchtune's text encoder: kept aside, written back unchanged),
  ``CLIPTextModelWithProjection``, and ``CLIPTextModel`` up to transformers 4.x;
- bare (``embeddings.*``, ``encoder.layers.*``, ``final_layer_norm.*``): ``CLIPTextModel`` from
  transformers 5.

Load reads whichever layout the keys have; save writes the layout that was read (or, for a converter
that did not load, the one the config's writer uses). No permutation."""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from ..config import ModelConfig
from ..errors import ConversionError
from .base import Converter, KeyTable, LoadResult, Op, identity_op

__all__ = ["CLIP_TEXT_TABLE", "CLIP_TEXT_TABLES", "ClipTextConverter"]

PREFIX = "text_model."
_BARE_ROOTS = ("embeddings.", "encoder.", "final_layer_norm.")


def _pairs(p: str) -> list[tuple[str, str | None]]:
    """The text-tower key pairs with the HF keys under prefix ``p`` (``text_model.`` or bare)."""
    layer = f"{p}encoder.layers.{{n}}"
    return [
        (f"{p}embeddings.token_embedding.weight", "token_embedding.weight"),
        (f"{p}embeddings.position_embedding.weight", "position_embedding"),
        (f"{p}embeddings.position_ids", None),
        (f"{p}final_layer_norm.weight", "final_norm.weight"),
        (f"{p}final_layer_norm.bias", "final_norm.bias"),
        ("logit_scale", None),
        ("text_projection.weight", None),
        ("visual_projection.weight", None),
    ] + [
        (f"{layer}.{hf}.{w}", f"layers.{{n}}.{tune}.{w}")
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
        for w in ("weight", "bias")
    ]


#: the key table of each layout: ``text_model.``-prefixed, and bare
CLIP_TEXT_TABLES: dict[str, KeyTable] = {PREFIX: KeyTable(_pairs(PREFIX)), "": KeyTable(_pairs(""))}
CLIP_TEXT_TABLE = CLIP_TEXT_TABLES[PREFIX]


def layout_of_keys(keys: Mapping[str, object]) -> str | None:
    """``"text_model."`` or ``""`` (bare) from the HF keys; None when no text-tower key says."""
    prefixed = any(k.startswith(PREFIX) for k in keys)
    bare = any(k.startswith(_BARE_ROOTS) for k in keys)
    if prefixed and bare:
        raise ConversionError(
            'the checkpoint mixes "text_model."-prefixed and bare CLIP text keys (e.g. "embeddings..."); '
            "it must use one layout"
        )
    return PREFIX if prefixed else "" if bare else None


def layout_of_config(cfg: ModelConfig) -> str:
    """The layout the config's writer uses: transformers 5 saves ``CLIPTextModel`` bare; everything
    else (``CLIPModel``, ``...WithProjection``, transformers 4.x) is ``text_model.``-prefixed."""
    archs = cfg.get("architectures") or []
    major = re.match(r"\s*(\d+)", str(cfg.get("transformers_version") or ""))
    if "CLIPTextModel" in archs and major is not None and int(major.group(1)) >= 5:
        return ""
    return PREFIX


class ClipTextConverter(Converter):
    """HF CLIP text-tower keys (either layout) ⇄ torchtune ``clip_text_encoder`` keys; everything else
    kept aside. Remembers the layout it loaded, to save in it."""

    family = "clip_text"

    def __init__(self) -> None:
        self.layout: str | None = None

    def hf_to_tune(self, hf: Mapping[str, torch.Tensor], cfg: ModelConfig) -> LoadResult:
        layout = layout_of_keys(hf)
        if layout is None:
            layout = layout_of_config(cfg)
        self.layout = layout
        table = CLIP_TEXT_TABLES[layout]
        out = LoadResult({})
        for key, t in hf.items():
            if key.startswith("vision_model."):
                out.aside[key] = t
                continue
            new = table.map(key, self.family)
            if new is None:
                out.aside[key] = t
            else:
                out.tune[new] = t
        return out

    def tune_to_hf_ops(
        self, tune: Mapping[str, torch.Tensor], cfg: ModelConfig, aside: Mapping[str, torch.Tensor]
    ) -> list[Op]:
        layout = self.layout
        if layout is None:  # not loaded by this converter: the kept-aside keys, else the config, say
            layout = layout_of_keys(aside)
            if layout is None:
                layout = PREFIX if any(k.startswith("vision_model.") for k in aside) else layout_of_config(cfg)
        inverse = CLIP_TEXT_TABLES[layout].inverse()
        ops: list[Op] = []
        for key, t in tune.items():
            new = inverse.map(key, self.family)
            assert new is not None
            ops.append(identity_op(new, t))
        return self.append_aside(ops, aside)
