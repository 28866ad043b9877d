"""LLAMA4 (HF ``Llama4ForConditionalGeneration``): text decoder with dense and MoE layers, the vision
encoder and its projector, per the torchtune (post-0.6.1) Llama4 builders. No q/k permutation.

MoE experts: HF fuses gate and up projections as ``experts.gate_up_proj`` ``[experts, dim, 2*hidden]``
(gate first along the last dim); torchtune keeps ``experts.gate_proj`` and ``experts.up_proj``.
The patch embedding is a linear layer over unfolded patches in HF, a conv weight in torchtune."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from ..config import ModelConfig
from ..errors import ConversionError
from .base import Converter, KeyTable, LoadResult, Op, RowSource, identity_op

__all__ = ["LLAMA4_TABLE", "Llama4Converter"]

_L = "language_model.model.layers.{n}"
_D = "decoder.layers.{n}"
_V = "vision_model.model.layers.{n}"
_E = "encoders.vision.clip.layers.{n}"
_GATE_UP = "feed_forward.experts.gate_up_proj"
_GATE = "mlp.experts.gate_proj"
_UP = "mlp.experts.up_proj"
_PATCH_HF = "vision_model.patch_embedding.linear.weight"
_PATCH_TUNE = "encoders.vision.clip.conv.weight"

LLAMA4_TABLE = KeyTable(
    [
        ("language_model.model.embed_tokens.weight", "decoder.tok_embeddings.weight"),
        ("language_model.model.norm.weight", "decoder.norm.scale"),
        ("language_model.lm_head.weight", "decoder.output.weight"),
        (f"{_L}.self_attn.q_proj.weight", f"{_D}.attn.q_proj.weight"),
        (f"{_L}.self_attn.k_proj.weight", f"{_D}.attn.k_proj.weight"),
        (f"{_L}.self_attn.v_proj.weight", f"{_D}.attn.v_proj.weight"),
        (f"{_L}.self_attn.o_proj.weight", f"{_D}.attn.output_proj.weight"),
        (f"{_L}.self_attn.rotary_emb.inv_freq", None),
        (f"{_L}.feed_forward.shared_expert.gate_proj.weight", f"{_D}.mlp.shared_expert.w1.weight"),
        (f"{_L}.feed_forward.shared_expert.up_proj.weight", f"{_D}.mlp.shared_expert.w3.weight"),
        (f"{_L}.feed_forward.shared_expert.down_proj.weight", f"{_D}.mlp.shared_expert.w2.weight"),
        (f"{_L}.{_GATE_UP}", f"{_D}.mlp.experts.gate_up"),  # split by hand into _GATE / _UP
        (f"{_L}.feed_forward.experts.down_proj", f"{_D}.mlp.experts.down_proj"),
        (f"{_L}.feed_forward.router.weight", f"{_D}.mlp.router.gate.weight"),
        (f"{_L}.feed_forward.gate_proj.weight", f"{_D}.mlp.w1.weight"),
        (f"{_L}.feed_forward.up_proj.weight", f"{_D}.mlp.w3.weight"),
        (f"{_L}.feed_forward.down_proj.weight", f"{_D}.mlp.w2.weight"),
        (f"{_L}.input_layernorm.weight", f"{_D}.sa_norm.scale"),
        (f"{_L}.post_attention_layernorm.weight", f"{_D}.mlp_norm.scale"),
        ("vision_model.class_embedding", "encoders.vision.clip.cls_token_embedding.weight"),
        ("vision_model.positional_embedding_vlm", "encoders.vision.clip.token_pos_embedding.positional_embedding"),
        (_PATCH_HF, _PATCH_TUNE),
        ("vision_model.vision_adapter.mlp.fc1.weight", "encoders.vision.projection.output.0.weight"),
        ("vision_model.vision_adapter.mlp.fc2.weight", "encoders.vision.projection.output.2.weight"),
        ("multi_modal_projector.linear_1.weight", "encoders.vision.projection.output.4.weight"),
    ]
    + [
        (f"vision_model.layernorm_{w}.{p}", f"encoders.vision.clip.ln_{w}.{p}")
        for w in ("pre", "post")
        for p in ("weight", "bias")
    ]
    + [
        (f"{_V}.{hf}.{p}", f"{_E}.{tune}.{p}")
        for hf, tune in [
            ("self_attn.q_proj", "attn.q_proj"),
            ("self_attn.k_proj", "attn.k_proj"),
            ("self_attn.v_proj", "attn.v_proj"),
            ("self_attn.o_proj", "attn.output_proj"),
            ("mlp.fc1", "mlp.w1"),
            ("mlp.fc2", "mlp.w2"),
            ("input_layernorm", "sa_norm"),
            ("post_attention_layernorm", "mlp_norm"),
        ]
        for p in ("weight", "bias")
    ]
)


def _patch_dims(cfg: ModelConfig, t: torch.Tensor) -> tuple[int, int]:
    """``(channels, patch)`` for the patch embedding: from ``vision_config`` when given, else from the shape."""
    vision = cfg.sub("vision_config") if "vision_config" in cfg else None
    channels = (vision.optional_int("num_channels") if vision is not None else None) or 3
    patch = vision.get("patch_size") if vision is not None else None
    if not isinstance(patch, int) or isinstance(patch, bool):
        patch = math.isqrt(t.shape[-1] // channels) if t.dim() == 2 else 0
    return channels, patch


class Llama4Converter(Converter):
    """HF Llama4 (multimodal) keys ⇄ torchtune Llama4 keys (see the module docstring)."""

    family = "llama4"

    def hf_to_tune(self, hf: Mapping[str, torch.Tensor], cfg: ModelConfig) -> LoadResult:
        out = LoadResult({})
        for key, t in hf.items():
            new = LLAMA4_TABLE.map(key, self.family)
            if new is None:
                out.aside[key] = t
            elif new.endswith(".mlp.experts.gate_up"):
                if t.dim() != 3 or t.shape[-1] % 2:
                    raise ConversionError(
                        f'"{key}": shape {tuple(t.shape)} is not [experts, dim, 2 * expert_dim]'
                    )
                base = new[: -len("experts.gate_up")]
                gate, up = t.chunk(2, dim=-1)
                out.tune[base + "experts.gate_proj"] = gate
                out.tune[base + "experts.up_proj"] = up
            elif new == _PATCH_TUNE:
                channels, patch = _patch_dims(cfg, t)
                if t.dim() != 2 or t.shape[1] != channels * patch * patch:
                    raise ConversionError(
                        f'"{key}": shape {tuple(t.shape)} is not [hidden, {channels} * patch * patch] '
                        "(check vision_config.patch_size / num_channels)"
                    )
                out.tune[new] = t.reshape(t.shape[0], channels, patch, patch)
            else:
                out.tune[new] = t
        return out

    def tune_to_hf_ops(
        self, tune: Mapping[str, torch.Tensor], cfg: ModelConfig, aside: Mapping[str, torch.Tensor]
    ) -> list[Op]:
        inverse = LLAMA4_TABLE.inverse()
        ops: list[Op] = []
        for key, t in tune.items():
            if key.endswith("." + _UP):
                if key[: -len(_UP)] + _GATE not in tune:
                    raise ConversionError(f'"{key}" is in the state dict without its gate_proj partner')
                continue  # emitted with its gate_proj
            if key.endswith("." + _GATE):
                up_key = key[: -len(_GATE)] + _UP
                up = tune.get(up_key)
                if up is None:
                    raise ConversionError(f'"{key}" is in the state dict without "{up_key}"')
                if up.dtype != t.dtype or up.shape[:-1] != t.shape[:-1]:
                    raise ConversionError(
                        f'"{up_key}": dtype {up.dtype} / shape {tuple(up.shape)} cannot be concatenated '
                        f'with "{key}" ({t.dtype} / {tuple(t.shape)})'
                    )
                new = inverse.map(key[: -len(_GATE)] + "mlp.experts.gate_up", self.family)
                assert new is not None
                shape = (*t.shape[:-1], t.shape[-1] + up.shape[-1])
                ops.append(Op(new, t.dtype, shape, lambda g=t, u=up: torch.cat([g, u], dim=-1)))
                continue
            new = inverse.map(key, self.family)
            assert new is not None
            if key == _PATCH_TUNE and t.dim() == 4:
                ops.append(Op(new, t.dtype, (t.shape[0], math.prod(t.shape[1:])),
                              lambda t=t: t.reshape(t.shape[0], -1), (RowSource(t),)))
            else:
                ops.append(identity_op(new, t))
        return self.append_aside(ops, aside)
