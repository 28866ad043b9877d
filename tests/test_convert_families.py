"""Converter properties per model family: HF → tune → HF is exact (every key, dtype, shape, bit), the
torchtune keys are the builders' names, nothing is lost, save ops are lazy and honest about their
dtype/shape, fine-tuned tied copies follow the trained tensor, and config errors name the field.

The random HF state dicts are built by the ``make_*`` functions below (also used by the torchtune
differential tests)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardwise.config import ModelConfig
from shardwise.constants import ModelType
from shardwise.convert import get_converter
from shardwise.convert.base import LoadResult, Op
from shardwise.convert.llama3_vision import VisionDims, tiles_hf_to_tune, tiles_tune_to_hf
from shardwise.errors import ConfigError, ConversionError

Tensor = torch.Tensor
HF = dict[str, Tensor]


# ----------------------------------------------------------------------------------------------------
# random HF checkpoints
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class P:
    """Structural parameters of a random checkpoint (values come from ``seed``)."""

    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 8
    hidden: int = 16
    inter: int = 24
    vocab: int = 32
    dtype: torch.dtype = torch.float32
    tied: bool = False
    lm_head: bool = True  # for tied models: whether the file still has lm_head.weight
    inv_freq: bool = False
    bias: bool = False  # qwen3 q/k/v biases, reward score.bias
    explicit_head_dim: bool = True  # write head_dim into config.json
    seed: int = 0
    extra: tuple[tuple[str, Any], ...] = ()

    def x(self, key: str, default: Any = None) -> Any:
        return dict(self.extra).get(key, default)


class _Rand:
    def __init__(self, p: P) -> None:
        self.g = torch.Generator().manual_seed(p.seed)
        self.dtype = p.dtype

    def __call__(self, *shape: int, dtype: torch.dtype | None = None) -> Tensor:
        return torch.randn(shape, generator=self.g).to(dtype or self.dtype)


def _base_cfg(p: P) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "num_attention_heads": p.heads,
        "num_key_value_heads": p.kv_heads,
        "hidden_size": p.hidden,
        "vocab_size": p.vocab,
        "num_hidden_layers": p.layers,
    }
    if p.explicit_head_dim:
        cfg["head_dim"] = p.head_dim
    return cfg


def _inv_freq(r: _Rand, p: P) -> Tensor:
    return r(p.head_dim // 2, dtype=torch.float32)


def make_llama_like(p: P, *, qkv_bias: bool = False, qk_norm: bool = False, gemma2: bool = False,
                    score: bool = False) -> tuple[HF, dict[str, Any]]:
    """Generic / Gemma2 / Qwen2 / Qwen3 / reward checkpoints in HF's natural key order."""
    r = _Rand(p)
    hd, h, kv, d = p.head_dim, p.heads, p.kv_heads, p.hidden
    sd: HF = {"model.embed_tokens.weight": r(p.vocab, d)}
    for n in range(p.layers):
        pre = f"model.layers.{n}."
        sd[pre + "input_layernorm.weight"] = r(d)
        sd[pre + "mlp.down_proj.weight"] = r(d, p.inter)
        sd[pre + "mlp.gate_proj.weight"] = r(p.inter, d)
        sd[pre + "mlp.up_proj.weight"] = r(p.inter, d)
        sd[pre + "post_attention_layernorm.weight"] = r(d)
        if gemma2:
            sd[pre + "post_feedforward_layernorm.weight"] = r(d)
            sd[pre + "pre_feedforward_layernorm.weight"] = r(d)
        sd[pre + "self_attn.k_proj.weight"] = r(kv * hd, d)
        if qkv_bias:
            sd[pre + "self_attn.k_proj.bias"] = r(kv * hd)
        if qk_norm:
            sd[pre + "self_attn.k_norm.weight"] = r(hd)
            sd[pre + "self_attn.q_norm.weight"] = r(hd)
        sd[pre + "self_attn.o_proj.weight"] = r(d, h * hd)
        sd[pre + "self_attn.q_proj.weight"] = r(h * hd, d)
        if qkv_bias:
            sd[pre + "self_attn.q_proj.bias"] = r(h * hd)
        if p.inv_freq:
            sd[pre + "self_attn.rotary_emb.inv_freq"] = _inv_freq(r, p)
        sd[pre + "self_attn.v_proj.weight"] = r(kv * hd, d)
        if qkv_bias:
            sd[pre + "self_attn.v_proj.bias"] = r(kv * hd)
    sd["model.norm.weight"] = r(d)
    if score:
        sd["score.weight"] = r(1, d)
        if p.bias:
            sd["score.bias"] = r(1)
    elif p.lm_head:
        # a tied file's lm_head is normally a copy; sometimes make it differ to prove exactness anyway
        if p.tied and p.x("same_head", True):
            sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
        else:
            sd["lm_head.weight"] = r(p.vocab, d)
    cfg = _base_cfg(p)
    cfg["tie_word_embeddings"] = p.tied
    return sd, cfg


def make_generic(p: P) -> tuple[HF, dict[str, Any]]:
    return make_llama_like(p)


def make_gemma2(p: P) -> tuple[HF, dict[str, Any]]:
    return make_llama_like(p, gemma2=True)


def make_qwen2(p: P) -> tuple[HF, dict[str, Any]]:
    return make_llama_like(p, qkv_bias=True)


def make_qwen3(p: P) -> tuple[HF, dict[str, Any]]:
    return make_llama_like(p, qkv_bias=p.bias, qk_norm=True)


def make_reward(p: P) -> tuple[HF, dict[str, Any]]:
    return make_llama_like(p, score=True)


def make_phi3(p: P) -> tuple[HF, dict[str, Any]]:
    r = _Rand(p)
    hd, h, kv, d = p.head_dim, p.heads, p.kv_heads, p.hidden
    sd: HF = {"model.embed_tokens.weight": r(p.vocab, d)}
    for n in range(p.layers):
        pre = f"model.layers.{n}."
        sd[pre + "input_layernorm.weight"] = r(d)
        sd[pre + "mlp.down_proj.weight"] = r(d, p.inter)
        sd[pre + "mlp.gate_up_proj.weight"] = r(2 * p.inter, d)
        sd[pre + "post_attention_layernorm.weight"] = r(d)
        sd[pre + "self_attn.o_proj.weight"] = r(d, h * hd)
        sd[pre + "self_attn.qkv_proj.weight"] = r((h + 2 * kv) * hd, d)
        if p.inv_freq:
            sd[pre + "self_attn.rotary_emb.inv_freq"] = _inv_freq(r, p)
    sd["model.norm.weight"] = r(d)
    if p.lm_head:
        sd["lm_head.weight"] = r(p.vocab, d)
    return sd, _base_cfg(p)


def make_clip(p: P) -> tuple[HF, dict[str, Any]]:
    """A ``CLIPModel`` checkpoint: text tower + (optionally) vision tower, projections, logit_scale."""
    r = _Rand(p)
    d, pos = p.hidden, p.x("positions", 8)
    sd: HF = {}
    if p.x("vision", True):
        sd["logit_scale"] = r(dtype=torch.float32)  # a 0-dim tensor
    sd["text_model.embeddings.position_embedding.weight"] = r(pos, d)
    if p.x("position_ids", True):
        sd["text_model.embeddings.position_ids"] = torch.arange(pos).unsqueeze(0)
    sd["text_model.embeddings.token_embedding.weight"] = r(p.vocab, d)
    for n in range(p.layers):
        pre = f"text_model.encoder.layers.{n}."
        for name, shape in [
            ("layer_norm1", (d,)), ("layer_norm2", (d,)), ("mlp.fc1", (p.inter, d)), ("mlp.fc2", (d, p.inter)),
            ("self_attn.k_proj", (d, d)), ("self_attn.out_proj", (d, d)), ("self_attn.q_proj", (d, d)),
            ("self_attn.v_proj", (d, d)),
        ]:
            sd[pre + name + ".bias"] = r(shape[0])
            sd[pre + name + ".weight"] = r(*shape)
    sd["text_model.final_layer_norm.bias"] = r(d)
    sd["text_model.final_layer_norm.weight"] = r(d)
    if p.x("vision", True):
        sd["text_projection.weight"] = r(8, d)
        sd["vision_model.embeddings.class_embedding"] = r(d)
        sd["vision_model.embeddings.patch_embedding.weight"] = r(d, 3, 2, 2)
        sd["vision_model.encoder.layers.0.mlp.fc1.weight"] = r(p.inter, d)
        sd["vision_model.post_layernorm.weight"] = r(d)
        sd["visual_projection.weight"] = r(8, d)
    return sd, {"text_config": {"hidden_size": d, "num_attention_heads": p.heads}, "projection_dim": 8}


def make_t5(p: P) -> tuple[HF, dict[str, Any]]:
    """A T5 encoder (``T5EncoderModel``), optionally with a decoder and ``lm_head`` (seq2seq)."""
    r = _Rand(p)
    d, inner = p.hidden, p.heads * p.head_dim
    embed = r(p.vocab, d)
    sd: HF = {}
    seq2seq = p.x("decoder", False)
    if seq2seq:
        sd["decoder.block.0.layer.0.SelfAttention.q.weight"] = r(inner, d)
        sd["decoder.block.0.layer.2.DenseReluDense.wo.weight"] = r(d, p.inter)
        sd["decoder.embed_tokens.weight"] = embed.clone()
        sd["decoder.final_layer_norm.weight"] = r(d)
    for n in range(p.layers):
        pre = f"encoder.block.{n}.layer."
        sd[pre + "0.SelfAttention.k.weight"] = r(inner, d)
        sd[pre + "0.SelfAttention.o.weight"] = r(d, inner)
        sd[pre + "0.SelfAttention.q.weight"] = r(inner, d)
        if n == 0:
            sd[pre + "0.SelfAttention.relative_attention_bias.weight"] = r(32, p.heads)
        sd[pre + "0.SelfAttention.v.weight"] = r(inner, d)
        sd[pre + "0.layer_norm.weight"] = r(d)
        sd[pre + "1.DenseReluDense.wi_0.weight"] = r(p.inter, d)
        sd[pre + "1.DenseReluDense.wi_1.weight"] = r(p.inter, d)
        sd[pre + "1.DenseReluDense.wo.weight"] = r(d, p.inter)
        sd[pre + "1.layer_norm.weight"] = r(d)
    if p.x("embed_tokens", True):
        sd["encoder.embed_tokens.weight"] = embed
    sd["encoder.final_layer_norm.weight"] = r(d)
    if seq2seq and p.lm_head:
        sd["lm_head.weight"] = r(p.vocab, d)
    if p.x("shared", True) or not p.x("embed_tokens", True):
        sd["shared.weight"] = embed.clone()
    cfg = {"d_model": d, "num_heads": p.heads, "d_kv": p.head_dim, "num_layers": p.layers,
           "tie_word_embeddings": p.tied}
    return sd, cfg


def _vision_ratios(tiles: int) -> list[list[int]]:
    return [[h, w] for h in range(1, tiles + 1) for w in range(1, tiles + 1) if h * w <= tiles]


def make_llama3_vision(p: P) -> tuple[HF, dict[str, Any]]:
    """An HF Mllama checkpoint; ``extra``: cross (HF layer indices), tiles, vdim, vlayers, glayers, patches."""
    r = _Rand(p)
    hd, h, kv, d = p.head_dim, p.heads, p.kv_heads, p.hidden
    cross: list[int] = list(p.x("cross", [1]))
    tiles, vd, k = p.x("tiles", 2), p.x("vdim", 8), p.x("patches", 2)
    ratios = _vision_ratios(tiles)
    embeds = k * k + 1
    sd: HF = {
        "language_model.lm_head.weight": r(p.vocab, d),
        "language_model.model.embed_tokens.weight": r(p.vocab + 8, d),
    }
    for n in range(p.layers):
        pre = f"language_model.model.layers.{n}."
        if n in cross:
            sd[pre + "cross_attn.k_norm.weight"] = r(hd)
            sd[pre + "cross_attn.k_proj.weight"] = r(kv * hd, d)
            sd[pre + "cross_attn.o_proj.weight"] = r(d, h * hd)
            sd[pre + "cross_attn.q_norm.weight"] = r(hd)
            sd[pre + "cross_attn.q_proj.weight"] = r(h * hd, d)
            sd[pre + "cross_attn.v_proj.weight"] = r(kv * hd, d)
            sd[pre + "cross_attn_attn_gate"] = r(1)
            sd[pre + "cross_attn_mlp_gate"] = r(1)
        sd[pre + "input_layernorm.weight"] = r(d)
        sd[pre + "mlp.down_proj.weight"] = r(d, p.inter)
        sd[pre + "mlp.gate_proj.weight"] = r(p.inter, d)
        sd[pre + "mlp.up_proj.weight"] = r(p.inter, d)
        sd[pre + "post_attention_layernorm.weight"] = r(d)
        if n not in cross:
            sd[pre + "self_attn.k_proj.weight"] = r(kv * hd, d)
            sd[pre + "self_attn.o_proj.weight"] = r(d, h * hd)
            sd[pre + "self_attn.q_proj.weight"] = r(h * hd, d)
            if p.inv_freq:
                sd[pre + "self_attn.rotary_emb.inv_freq"] = _inv_freq(r, p)
            sd[pre + "self_attn.v_proj.weight"] = r(kv * hd, d)
    sd["language_model.model.norm.weight"] = r(d)
    n_hidden = len(p.x("intermediate", [0]))
    sd["multi_modal_projector.bias"] = r(d)
    sd["multi_modal_projector.weight"] = r(d, vd * (n_hidden + 1))
    sd["vision_model.class_embedding"] = r(vd)
    sd["vision_model.gated_positional_embedding.embedding"] = r(embeds, vd)
    sd["vision_model.gated_positional_embedding.gate"] = r(1)
    sd["vision_model.gated_positional_embedding.tile_embedding.weight"] = r(len(ratios) + 1, tiles * embeds * vd)

    def enc_layer(pre: str, gated: bool) -> None:
        if gated:
            sd[pre + "gate_attn"] = r(1)
            sd[pre + "gate_ffn"] = r(1)
        for name, shape in [("input_layernorm", (vd,)), ("mlp.fc1", (2 * vd, vd)), ("mlp.fc2", (vd, 2 * vd)),
                            ("post_attention_layernorm", (vd,))]:
            sd[pre + name + ".bias"] = r(shape[0])
            sd[pre + name + ".weight"] = r(*shape)
        for proj in "kovq":
            sd[pre + f"self_attn.{proj}_proj.weight"] = r(vd, vd)

    for n in range(p.x("glayers", 1)):
        enc_layer(f"vision_model.global_transformer.layers.{n}.", gated=True)
    sd["vision_model.layernorm_post.bias"] = r(vd)
    sd["vision_model.layernorm_post.weight"] = r(vd)
    sd["vision_model.layernorm_pre.bias"] = r(vd)
    sd["vision_model.layernorm_pre.weight"] = r(vd)
    sd["vision_model.patch_embedding.weight"] = r(vd, 3, 2, 2)
    for which in ("post", "pre"):
        sd[f"vision_model.{which}_tile_positional_embedding.embedding.weight"] = r(len(ratios) + 1, tiles * vd)
        sd[f"vision_model.{which}_tile_positional_embedding.gate"] = r(1)
    for n in range(p.x("vlayers", 1)):
        enc_layer(f"vision_model.transformer.layers.{n}.", gated=False)
    text = _base_cfg(p)
    text["cross_attention_layers"] = cross
    cfg = {
        "text_config": text,
        "vision_config": {"hidden_size": vd, "image_size": 2 * k, "patch_size": 2, "max_num_tiles": tiles,
                          "supported_aspect_ratios": ratios, "intermediate_layers_indices": [0]},
    }
    return sd, cfg


def make_llama4(p: P) -> tuple[HF, dict[str, Any]]:
    """An HF Llama4ForConditionalGeneration checkpoint; ``extra``: moe (layer indices), experts, vdim, vlayers."""
    r = _Rand(p)
    hd, h, kv, d = p.head_dim, p.heads, p.kv_heads, p.hidden
    moe: list[int] = list(p.x("moe", [1]))
    experts, vd, patch = p.x("experts", 2), p.x("vdim", 8), p.x("patch", 2)
    sd: HF = {}
    if p.lm_head:
        sd["language_model.lm_head.weight"] = r(p.vocab, d)
    sd["language_model.model.embed_tokens.weight"] = r(p.vocab, d)
    for n in range(p.layers):
        pre = f"language_model.model.layers.{n}."
        if n in moe:
            sd[pre + "feed_forward.experts.down_proj"] = r(experts, p.inter, d)
            sd[pre + "feed_forward.experts.gate_up_proj"] = r(experts, d, 2 * p.inter)
            sd[pre + "feed_forward.router.weight"] = r(experts, d)
            sd[pre + "feed_forward.shared_expert.down_proj.weight"] = r(d, p.inter)
            sd[pre + "feed_forward.shared_expert.gate_proj.weight"] = r(p.inter, d)
            sd[pre + "feed_forward.shared_expert.up_proj.weight"] = r(p.inter, d)
        else:
            sd[pre + "feed_forward.down_proj.weight"] = r(d, 2 * p.inter)
            sd[pre + "feed_forward.gate_proj.weight"] = r(2 * p.inter, d)
            sd[pre + "feed_forward.up_proj.weight"] = r(2 * p.inter, d)
        sd[pre + "input_layernorm.weight"] = r(d)
        sd[pre + "post_attention_layernorm.weight"] = r(d)
        sd[pre + "self_attn.k_proj.weight"] = r(kv * hd, d)
        sd[pre + "self_attn.o_proj.weight"] = r(d, h * hd)
        sd[pre + "self_attn.q_proj.weight"] = r(h * hd, d)
        if p.inv_freq:
            sd[pre + "self_attn.rotary_emb.inv_freq"] = _inv_freq(r, p)
        sd[pre + "self_attn.v_proj.weight"] = r(kv * hd, d)
    sd["language_model.model.norm.weight"] = r(d)
    sd["multi_modal_projector.linear_1.weight"] = r(d, vd)
    sd["vision_model.class_embedding"] = r(vd)
    sd["vision_model.layernorm_post.bias"] = r(vd)
    sd["vision_model.layernorm_post.weight"] = r(vd)
    sd["vision_model.layernorm_pre.bias"] = r(vd)
    sd["vision_model.layernorm_pre.weight"] = r(vd)
    for n in range(p.x("vlayers", 1)):
        pre = f"vision_model.model.layers.{n}."
        for name, shape in [("input_layernorm", (vd,)), ("mlp.fc1", (2 * vd, vd)), ("mlp.fc2", (vd, 2 * vd)),
                            ("post_attention_layernorm", (vd,)), ("self_attn.k_proj", (vd, vd)),
                            ("self_attn.o_proj", (vd, vd)), ("self_attn.q_proj", (vd, vd)),
                            ("self_attn.v_proj", (vd, vd))]:
            sd[pre + name + ".bias"] = r(shape[0])
            sd[pre + name + ".weight"] = r(*shape)
    sd["vision_model.patch_embedding.linear.weight"] = r(vd, 3 * patch * patch)
    sd["vision_model.positional_embedding_vlm"] = r(5, vd)
    sd["vision_model.vision_adapter.mlp.fc1.weight"] = r(vd, 2 * vd)
    sd["vision_model.vision_adapter.mlp.fc2.weight"] = r(vd, vd)
    text = _base_cfg(p)
    text["moe_layers"] = moe
    vision: dict[str, Any] = {"hidden_size": vd, "num_channels": 3}
    if p.x("patch_in_config", True):
        vision["patch_size"] = patch
    return sd, {"text_config": text, "vision_config": vision}


@dataclass(frozen=True)
class Family:
    model_type: ModelType
    make: Callable[[P], tuple[HF, dict[str, Any]]]


FAMILIES: dict[str, Family] = {
    "LLAMA2": Family(ModelType.LLAMA2, make_generic),
    "LLAMA3": Family(ModelType.LLAMA3, make_generic),
    "LLAMA3_2": Family(ModelType.LLAMA3_2, make_generic),
    "MISTRAL": Family(ModelType.MISTRAL, make_generic),
    "GEMMA": Family(ModelType.GEMMA, make_generic),
    "GEMMA2": Family(ModelType.GEMMA2, make_gemma2),
    "PHI3_MINI": Family(ModelType.PHI3_MINI, make_phi3),
    "PHI4": Family(ModelType.PHI4, make_phi3),
    "QWEN2": Family(ModelType.QWEN2, make_qwen2),
    "QWEN3": Family(ModelType.QWEN3, make_qwen3),
    "REWARD": Family(ModelType.REWARD, make_reward),
    "CLIP_TEXT": Family(ModelType.CLIP_TEXT, make_clip),
    "T5_ENCODER": Family(ModelType.T5_ENCODER, make_t5),
    "LLAMA3_VISION": Family(ModelType.LLAMA3_VISION, make_llama3_vision),
    "LLAMA4": Family(ModelType.LLAMA4, make_llama4),
}

#: head/permutation layouts each family allows (phi3/clip/t5 need no RoPE-compatible head_dim)
_DTYPES = st.sampled_from([torch.float32, torch.bfloat16, torch.float16])


@st.composite
def params(draw: st.DrawFn, family: str) -> P:
    """Random structure for ``family``: layers, heads incl. GQA, head_dim, dtype, tied, inv_freq, extras."""
    kv = draw(st.integers(1, 3))
    heads = kv * draw(st.integers(1, 3))
    head_dim = 2 * draw(st.integers(1, 5))
    explicit = draw(st.booleans())
    hidden = draw(st.integers(1, 4)) * 4 if explicit else heads * head_dim
    if not explicit:
        pass  # head_dim comes from hidden // heads
    p = P(
        layers=draw(st.integers(1, 3)), heads=heads, kv_heads=kv, head_dim=head_dim, hidden=hidden,
        inter=draw(st.integers(1, 6)) * 2, vocab=draw(st.integers(4, 24)), dtype=draw(_DTYPES),
        tied=draw(st.booleans()), lm_head=draw(st.booleans()), inv_freq=draw(st.booleans()),
        bias=draw(st.booleans()), explicit_head_dim=explicit, seed=draw(st.integers(0, 2**31 - 1)),
    )
    extra: dict[str, Any] = {"same_head": draw(st.booleans())}
    if family == "PHI3_MINI" or family == "PHI4":
        p = replace(p, explicit_head_dim=False, hidden=heads * head_dim)
    if family == "CLIP_TEXT":
        extra.update(vision=draw(st.booleans()), position_ids=draw(st.booleans()), positions=draw(st.integers(1, 8)))
    if family == "T5_ENCODER":
        extra.update(decoder=draw(st.booleans()), embed_tokens=draw(st.booleans()), shared=draw(st.booleans()))
    if family == "LLAMA3_VISION":
        layers = draw(st.integers(2, 5))
        candidates = draw(st.lists(st.integers(0, layers - 2), max_size=2, unique=True))
        cross: list[int] = []
        for c in sorted(candidates):
            if not cross or c > cross[-1] + 1:
                cross.append(c)
        extra.update(cross=cross, tiles=draw(st.sampled_from([1, 2, 4])), vdim=draw(st.sampled_from([4, 8])),
                     vlayers=draw(st.integers(1, 2)), glayers=draw(st.integers(0, 2)),
                     patches=draw(st.integers(1, 2)))
        p = replace(p, layers=layers)
    if family == "LLAMA4":
        moe = draw(st.lists(st.integers(0, p.layers - 1), unique=True))
        extra.update(moe=moe, experts=draw(st.integers(1, 3)), patch=draw(st.integers(1, 3)),
                     patch_in_config=draw(st.booleans()), vlayers=draw(st.integers(0, 2)))
    return replace(p, extra=tuple(extra.items()))


# ----------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------


def convert(family: str, p: P) -> tuple[HF, ModelConfig, LoadResult, list[Op]]:
    hf, cfg_dict = FAMILIES[family].make(p)
    cfg = ModelConfig(cfg_dict, "config.json")
    conv = get_converter(FAMILIES[family].model_type)
    conv.validate_config(cfg)
    res = conv.hf_to_tune(hf, cfg)
    ops = conv.tune_to_hf_ops(res.tune, cfg, res.aside)
    return hf, cfg, res, ops


def assert_same(out: HF, hf: HF) -> None:
    assert set(out) == set(hf), (sorted(set(hf) - set(out)), sorted(set(out) - set(hf)))
    for k, t in hf.items():
        o = out[k]
        assert o.dtype == t.dtype and o.shape == t.shape, (k, o.dtype, t.dtype, o.shape, t.shape)
        assert torch.equal(o, t), k


def run_ops(ops: list[Op]) -> HF:
    """Materialise ops, checking that each one announced its dtype/shape truthfully."""
    out: HF = {}
    for op in ops:
        assert op.key not in out, f"duplicate output key {op.key}"
        t = op.make()
        assert t.dtype == op.dtype and tuple(t.shape) == op.shape, (op.key, t.dtype, op.dtype, t.shape, op.shape)
        out[op.key] = t
    return out


# ----------------------------------------------------------------------------------------------------
# round trips
# ----------------------------------------------------------------------------------------------------

_SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("family", sorted(FAMILIES))
@_SETTINGS
@given(data=st.data())
def test_round_trip_exact(family: str, data: st.DataObject) -> None:
    p = data.draw(params(family))
    hf, _, res, ops = convert(family, p)
    assert_same(run_ops(ops), hf)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_trained_weights_are_written(family: str, data: st.DataObject) -> None:
    """Doubling every torchtune tensor doubles exactly the HF tensors it came from (the conversion commutes
    with elementwise edits): nothing stale is written back once a weight changed. Tied copies follow the
    embedding, tile tables are rebuilt, and keys only kept aside stay as they were."""
    p = data.draw(params(family))
    hf, cfg, res, _ = convert(family, p)
    conv = get_converter(FAMILIES[family].model_type)
    out = conv.tune_to_hf({k: v * 2 for k, v in res.tune.items()}, cfg, res.aside)
    assert set(out) == set(hf)
    tied: dict[str, str] = {}
    tying = ("QWEN2", "QWEN3", "LLAMA2", "LLAMA3", "LLAMA3_2", "MISTRAL", "GEMMA", "GEMMA2")
    if family in tying and cfg.get("tie_word_embeddings") and "lm_head.weight" in hf:
        same = hf["lm_head.weight"].shape == hf["model.embed_tokens.weight"].shape
        if same:
            tied["lm_head.weight"] = "model.embed_tokens.weight"
    if family == "T5_ENCODER":
        src = "encoder.embed_tokens.weight" if "encoder.embed_tokens.weight" in hf else "shared.weight"
        for k in ("shared.weight", "decoder.embed_tokens.weight") + (
                ("lm_head.weight",) if cfg.get("tie_word_embeddings", True) else ()):
            if k != src:
                tied[k] = src
    dims = VisionDims.from_config(cfg) if family == "LLAMA3_VISION" else None

    def aside_only(k: str) -> bool:
        if "inv_freq" in k or k == "score.bias":
            return True
        if family == "CLIP_TEXT":
            return not k.startswith("text_model.") or k.endswith("position_ids")
        if family == "T5_ENCODER":
            return k.startswith("decoder.") or k == "lm_head.weight"
        return False

    for k, t in hf.items():
        if k in tied:
            expect = hf[tied[k]] * 2
        elif dims is not None and k.endswith(("tile_embedding.weight", "tile_positional_embedding.embedding.weight")):
            expect = tiles_tune_to_hf(tiles_hf_to_tune(t, dims) * 2, dims)
        elif aside_only(k):
            expect = t
        else:
            expect = t * 2
        assert out[k].dtype == t.dtype and torch.equal(out[k], expect), k


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_save_ops_are_lazy(family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Building the ops runs no transform (no concatenation, permutation, table rebuild): ``make`` does."""
    from shardwise.convert import base, llama3_vision

    hf, cfg_dict = FAMILIES[family].make(P(layers=3, inv_freq=True, bias=True, extra=(("moe", [1]),)))
    cfg = ModelConfig(cfg_dict)
    conv = get_converter(FAMILIES[family].model_type)
    res = conv.hf_to_tune(hf, cfg)
    calls: list[str] = []

    def spy(name: str, fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        def wrapped(*a: Any, **k: Any) -> Tensor:
            calls.append(name)
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(torch, "cat", spy("cat", torch.cat))
    monkeypatch.setattr(base, "permute_to_hf", spy("permute", base.permute_to_hf))  # every permuted_op's
    monkeypatch.setattr(llama3_vision, "tiles_tune_to_hf", spy("tiles", llama3_vision.tiles_tune_to_hf))
    ops = conv.tune_to_hf_ops(res.tune, cfg, res.aside)
    assert calls == []
    out = run_ops(ops)
    assert_same(out, hf)
    transforms = {"LLAMA2", "LLAMA3", "LLAMA3_2", "MISTRAL", "GEMMA", "GEMMA2", "REWARD", "PHI3_MINI", "PHI4",
                  "LLAMA3_VISION", "LLAMA4"}
    assert bool(calls) == (family in transforms)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_caller_dicts_not_mutated(family: str) -> None:
    hf, cfg_dict = FAMILIES[family].make(P(layers=2, inv_freq=True, bias=True, tied=True))
    cfg = ModelConfig(cfg_dict)
    conv = get_converter(FAMILIES[family].model_type)

    def snapshot(d: HF) -> list[tuple[str, int, Tensor]]:
        return [(k, id(v), v.clone()) for k, v in d.items()]

    def same(d: HF, snap: list[tuple[str, int, Tensor]]) -> bool:
        return [(k, id(v)) for k, v in d.items()] == [(k, i) for k, i, _ in snap] and all(
            torch.equal(d[k], c) for k, _, c in snap)

    hf_snap = snapshot(hf)
    res = conv.hf_to_tune(hf, cfg)
    tune_snap, aside_snap = snapshot(res.tune), snapshot(res.aside)
    conv.tune_to_hf(res.tune, cfg, res.aside)
    assert same(hf, hf_snap) and same(res.tune, tune_snap) and same(res.aside, aside_snap)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_unknown_key_names_the_key(family: str) -> None:
    hf, cfg_dict = FAMILIES[family].make(P())
    hf = dict(hf)
    bad = "model.layers.0.self_attn.mystery_proj.weight"
    hf[bad] = torch.zeros(2)
    with pytest.raises(ConversionError, match=re.escape(bad)):
        get_converter(FAMILIES[family].model_type).hf_to_tune(hf, ModelConfig(cfg_dict))


def test_unknown_tune_key_on_save_names_the_key() -> None:
    for family in FAMILIES:
        hf, cfg_dict = FAMILIES[family].make(P())
        cfg = ModelConfig(cfg_dict)
        conv = get_converter(FAMILIES[family].model_type)
        res = conv.hf_to_tune(hf, cfg)
        tune = dict(res.tune)
        tune["layers.0.attn.mystery.weight"] = torch.zeros(1)
        with pytest.raises(ConversionError, match=r"layers\.0\.attn\.mystery\.weight"):
            conv.tune_to_hf_ops(tune, cfg, res.aside)


# ----------------------------------------------------------------------------------------------------
# the torchtune names, listed explicitly for a small fixed config (2 layers)
# ----------------------------------------------------------------------------------------------------

_GENERIC_LAYER = [
    "attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight", "attn.output_proj.weight",
    "mlp.w1.weight", "mlp.w2.weight", "mlp.w3.weight", "sa_norm.scale", "mlp_norm.scale",
]
_QWEN2_LAYER = _GENERIC_LAYER + ["attn.q_proj.bias", "attn.k_proj.bias", "attn.v_proj.bias"]
_QWEN3_LAYER = _GENERIC_LAYER + ["attn.q_norm.scale", "attn.k_norm.scale"]
_GEMMA2_LAYER = _GENERIC_LAYER + ["sa_scale.scale", "mlp_scale.scale"]
_CLIP_LAYER = [f"{m}.{p}" for m in ("sa_norm", "mlp_norm", "mlp.w1", "mlp.w2", "attn.q_proj", "attn.k_proj",
                                     "attn.v_proj", "attn.output_proj") for p in ("weight", "bias")]
_T5_LAYER = ["attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight", "attn.output_proj.weight",
             "mlp.w1.weight", "mlp.w2.weight", "mlp.w3.weight", "sa_norm.scale", "mlp_norm.scale"]


def _layers(prefix: str, n: int, names: list[str]) -> set[str]:
    return {f"{prefix}.{i}.{s}" for i in range(n) for s in names}


_VISION_ENC_LAYER = [f"{m}.{p}" for m in ("sa_norm", "mlp_norm", "mlp.w1", "mlp.w2") for p in ("weight", "bias")] + [
    "attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight", "attn.output_proj.weight"]
_FUSION = ["attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight", "attn.output_proj.weight",
           "attn.q_norm.scale", "attn.k_norm.scale", "ca_norm.scale", "ca_scale.scale", "mlp_norm.scale",
           "mlp_scale.scale", "mlp.w1.weight", "mlp.w2.weight", "mlp.w3.weight"]

EXPECTED_TUNE_KEYS: dict[str, set[str]] = {
    "LLAMA3": {"tok_embeddings.weight", "norm.scale", "output.weight"} | _layers("layers", 2, _GENERIC_LAYER),
    "GEMMA2": {"tok_embeddings.weight", "norm.rms_norm.scale"} | _layers("layers", 2, _GEMMA2_LAYER),
    "PHI3_MINI": {"tok_embeddings.weight", "norm.scale", "output.weight"} | _layers("layers", 2, _GENERIC_LAYER),
    "QWEN2": {"tok_embeddings.weight", "norm.scale"} | _layers("layers", 2, _QWEN2_LAYER),
    "QWEN3": {"tok_embeddings.weight", "norm.scale"} | _layers("layers", 2, _QWEN3_LAYER),
    "REWARD": {"tok_embeddings.weight", "norm.scale", "output.weight"} | _layers("layers", 2, _GENERIC_LAYER),
    "CLIP_TEXT": {"token_embedding.weight", "position_embedding", "final_norm.weight", "final_norm.bias"}
    | _layers("layers", 2, _CLIP_LAYER),
    "T5_ENCODER": {"token_embedding.weight", "relative_position_bias.embedding.weight", "final_norm.scale"}
    | _layers("layers", 2, _T5_LAYER),
    # HF layers 0 (self), 1 (cross), 2 (self): torchtune layer 0, and layer 1 = fusion(HF1) + HF2
    "LLAMA3_VISION": {
        "decoder.tok_embeddings.weight", "decoder.tok_embeddings.fusion_embedding.weight", "decoder.norm.scale",
        "decoder.output.weight",
        "encoder.clip.conv.weight", "encoder.clip.cls_token_embedding.weight",
        "encoder.clip.token_pos_embedding.local_token_positional_embedding",
        "encoder.clip.token_pos_embedding.global_token_positional_embedding",
        "encoder.clip.token_pos_embedding.gate", "encoder.clip.ln_pre.weight", "encoder.clip.ln_pre.bias",
        "encoder.clip.ln_post.weight", "encoder.clip.ln_post.bias",
        "encoder.clip.pre_tile_pos_embed.embedding", "encoder.clip.pre_tile_pos_embed.gate",
        "encoder.clip.post_tile_pos_embed.embedding", "encoder.clip.post_tile_pos_embed.gate",
        "encoder.projection.output.weight", "encoder.projection.output.bias",
        "encoder.projection.layers.0.sa_scale.scale", "encoder.projection.layers.0.mlp_scale.scale",
    }
    | _layers("decoder.layers", 2, _GENERIC_LAYER)
    | {f"decoder.layers.1.fusion_layer.{s}" for s in _FUSION}
    | _layers("encoder.clip.layers", 1, _VISION_ENC_LAYER)
    | _layers("encoder.projection.layers", 1, _VISION_ENC_LAYER),
    # layer 0 dense, layer 1 MoE
    "LLAMA4": {
        "decoder.tok_embeddings.weight", "decoder.norm.scale", "decoder.output.weight",
        "decoder.layers.0.mlp.w1.weight", "decoder.layers.0.mlp.w2.weight", "decoder.layers.0.mlp.w3.weight",
        "decoder.layers.1.mlp.experts.gate_proj", "decoder.layers.1.mlp.experts.up_proj",
        "decoder.layers.1.mlp.experts.down_proj", "decoder.layers.1.mlp.router.gate.weight",
        "decoder.layers.1.mlp.shared_expert.w1.weight", "decoder.layers.1.mlp.shared_expert.w2.weight",
        "decoder.layers.1.mlp.shared_expert.w3.weight",
        "encoders.vision.clip.cls_token_embedding.weight",
        "encoders.vision.clip.token_pos_embedding.positional_embedding", "encoders.vision.clip.conv.weight",
        "encoders.vision.clip.ln_pre.weight", "encoders.vision.clip.ln_pre.bias",
        "encoders.vision.clip.ln_post.weight", "encoders.vision.clip.ln_post.bias",
        "encoders.vision.projection.output.0.weight", "encoders.vision.projection.output.2.weight",
        "encoders.vision.projection.output.4.weight",
    }
    | _layers("decoder.layers", 2, [s for s in _GENERIC_LAYER if not s.startswith("mlp.")])
    | {f"encoders.vision.clip.layers.0.{s}" for s in _VISION_ENC_LAYER}
    | {f"encoders.vision.clip.layers.0.attn.{x}_proj.bias" for x in ("q", "k", "v", "output")},
}

_FIXED = {
    "LLAMA3": P(inv_freq=True),
    "GEMMA2": P(inv_freq=True, lm_head=False, tied=True),
    "PHI3_MINI": P(),
    "QWEN2": P(tied=True, lm_head=True, inv_freq=True),
    "QWEN3": P(tied=True, lm_head=True),
    "REWARD": P(inv_freq=True, bias=True),
    "CLIP_TEXT": P(),
    "T5_ENCODER": P(extra=(("decoder", True),)),
    "LLAMA3_VISION": P(layers=3, inv_freq=True, extra=(("cross", [1]),)),
    "LLAMA4": P(inv_freq=True, extra=(("moe", [1]),)),
}

EXPECTED_ASIDE: dict[str, set[str]] = {
    "LLAMA3": {"model.layers.0.self_attn.rotary_emb.inv_freq", "model.layers.1.self_attn.rotary_emb.inv_freq"},
    "GEMMA2": {"model.layers.0.self_attn.rotary_emb.inv_freq", "model.layers.1.self_attn.rotary_emb.inv_freq"},
    "PHI3_MINI": set(),
    "QWEN2": {"model.layers.0.self_attn.rotary_emb.inv_freq", "model.layers.1.self_attn.rotary_emb.inv_freq",
              "lm_head.weight", "model.embed_tokens.weight"},
    "QWEN3": {"lm_head.weight", "model.embed_tokens.weight"},
    "REWARD": {"model.layers.0.self_attn.rotary_emb.inv_freq", "model.layers.1.self_attn.rotary_emb.inv_freq",
               "score.bias"},
    "CLIP_TEXT": {"logit_scale", "text_model.embeddings.position_ids", "text_projection.weight",
                  "visual_projection.weight", "vision_model.embeddings.class_embedding",
                  "vision_model.embeddings.patch_embedding.weight",
                  "vision_model.encoder.layers.0.mlp.fc1.weight", "vision_model.post_layernorm.weight"},
    "T5_ENCODER": {"decoder.block.0.layer.0.SelfAttention.q.weight", "decoder.block.0.layer.2.DenseReluDense.wo.weight",
                   "decoder.embed_tokens.weight", "decoder.final_layer_norm.weight", "lm_head.weight",
                   "shared.weight", "encoder.embed_tokens.weight"},
    "LLAMA3_VISION": {"language_model.model.layers.0.self_attn.rotary_emb.inv_freq",
                      "language_model.model.layers.2.self_attn.rotary_emb.inv_freq",
                      "vision_model.gated_positional_embedding.tile_embedding.weight",
                      "vision_model.pre_tile_positional_embedding.embedding.weight",
                      "vision_model.post_tile_positional_embedding.embedding.weight"},
    "LLAMA4": {"language_model.model.layers.0.self_attn.rotary_emb.inv_freq",
               "language_model.model.layers.1.self_attn.rotary_emb.inv_freq"},
}


@pytest.mark.parametrize("family", sorted(EXPECTED_TUNE_KEYS))
def test_tune_keys_are_the_builder_names(family: str) -> None:
    hf, _, res, ops = convert(family, _FIXED[family])
    assert set(res.tune) == EXPECTED_TUNE_KEYS[family]
    assert set(res.aside) == EXPECTED_ASIDE[family]
    assert set(res.tune).isdisjoint(hf)  # no HF name leaks through
    assert_same(run_ops(ops), hf)


# ----------------------------------------------------------------------------------------------------
# family specifics
# ----------------------------------------------------------------------------------------------------


def test_gemma2_norms_mapped_correctly() -> None:
    """torchtune 0.6.1 swaps pre/post feed-forward norms; mlp_norm is applied before the MLP, mlp_scale after."""
    hf, _, res, _ = convert("GEMMA2", P(layers=2))
    for n in range(2):
        pre = f"model.layers.{n}."
        assert res.tune[f"layers.{n}.mlp_norm.scale"] is hf[pre + "pre_feedforward_layernorm.weight"]
        assert res.tune[f"layers.{n}.mlp_scale.scale"] is hf[pre + "post_feedforward_layernorm.weight"]
        assert res.tune[f"layers.{n}.sa_scale.scale"] is hf[pre + "post_attention_layernorm.weight"]
        assert res.tune[f"layers.{n}.sa_norm.scale"] is hf[pre + "input_layernorm.weight"]
    assert res.tune["norm.rms_norm.scale"] is hf["model.norm.weight"]


def test_gemma2_permutes_with_config_head_dim() -> None:
    hf, _, res, _ = convert("GEMMA2", P(heads=2, kv_heads=1, head_dim=8, hidden=12))
    q = hf["model.layers.0.self_attn.q_proj.weight"]
    expect = q.view(2, 2, 4, 12).transpose(1, 2).reshape(16, 12)
    assert torch.equal(res.tune["layers.0.attn.q_proj.weight"], expect)


@pytest.mark.parametrize("family", ["QWEN2", "QWEN3", "PHI3_MINI", "LLAMA4", "CLIP_TEXT", "T5_ENCODER"])
def test_no_rope_permutation(family: str) -> None:
    """Families whose torchtune models use HF's rotate-half layout keep q/k rows as they are."""
    hf, _, res, _ = convert(family, P(layers=1))
    checked = 0
    for k, t in res.tune.items():
        if k.endswith(("q_proj.weight", "k_proj.weight")):
            if family == "PHI3_MINI":
                qkv = hf["model.layers.0.self_attn.qkv_proj.weight"]
                start = 0 if "q_proj" in k else res.tune["layers.0.attn.q_proj.weight"].shape[0]
                assert torch.equal(t, qkv[start: start + t.shape[0]])
            else:
                assert any(v is t for v in hf.values()), k
            checked += 1
    assert checked >= 2


def test_phi3_gqa_split_sizes_and_views() -> None:
    hf, _, res, _ = convert("PHI3_MINI", P(heads=6, kv_heads=2, head_dim=4, hidden=24, layers=1))
    qkv = hf["model.layers.0.self_attn.qkv_proj.weight"]
    assert res.tune["layers.0.attn.q_proj.weight"].shape == (24, 24)
    assert res.tune["layers.0.attn.k_proj.weight"].shape == (8, 24)
    assert torch.equal(res.tune["layers.0.attn.v_proj.weight"], qkv[32:])
    assert res.tune["layers.0.attn.q_proj.weight"].untyped_storage().data_ptr() == qkv.untyped_storage().data_ptr()
    gu = hf["model.layers.0.mlp.gate_up_proj.weight"]
    assert torch.equal(res.tune["layers.0.mlp.w1.weight"], gu[: gu.shape[0] // 2])
    assert torch.equal(res.tune["layers.0.mlp.w3.weight"], gu[gu.shape[0] // 2:])


def test_phi3_bad_qkv_shape_names_key() -> None:
    hf, cfg_dict = make_phi3(P(layers=1, heads=4, kv_heads=2, head_dim=4, hidden=16))
    cfg_dict["num_key_value_heads"] = 4
    with pytest.raises(ConversionError, match="qkv_proj"):
        get_converter(ModelType.PHI4).hf_to_tune(hf, ModelConfig(cfg_dict))


def test_phi3_missing_partner_on_save() -> None:
    _, cfg, res, _ = convert("PHI4", P(layers=1))
    tune = dict(res.tune)
    del tune["layers.0.attn.v_proj.weight"]
    with pytest.raises(ConversionError, match="v_proj"):
        get_converter(ModelType.PHI4).tune_to_hf_ops(tune, cfg, res.aside)


@pytest.mark.parametrize("family", ["QWEN2", "QWEN3"])
@pytest.mark.parametrize("had_head", [True, False])
def test_qwen_tied_lm_head_mirrors_input_and_follows_training(family: str, had_head: bool) -> None:
    hf, cfg, res, ops = convert(family, P(tied=True, lm_head=had_head, extra=(("same_head", False),)))
    assert "output.weight" not in res.tune
    out = run_ops(ops)
    assert ("lm_head.weight" in out) is had_head
    assert_same(out, hf)  # exact, even though this file's lm_head differed from the embedding
    conv = get_converter(FAMILIES[family].model_type)
    trained = dict(res.tune)
    trained["tok_embeddings.weight"] = res.tune["tok_embeddings.weight"] + 1
    out = conv.tune_to_hf(trained, cfg, res.aside)
    assert torch.equal(out["model.embed_tokens.weight"], trained["tok_embeddings.weight"])
    if had_head:
        assert torch.equal(out["lm_head.weight"], trained["tok_embeddings.weight"])
    # an untied fine-tune: the new output.weight is written as lm_head.weight
    trained["output.weight"] = torch.ones_like(trained["tok_embeddings.weight"])
    out = conv.tune_to_hf(trained, cfg, res.aside)
    assert torch.equal(out["lm_head.weight"], trained["output.weight"])


def test_qwen2_untied_lm_head_is_output() -> None:
    hf, _, res, _ = convert("QWEN2", P(tied=False, lm_head=True))
    assert res.tune["output.weight"] is hf["lm_head.weight"]


def test_reward_keeps_score_bias_and_inv_freq_and_honours_head_dim() -> None:
    hf, _, res, ops = convert("REWARD", P(heads=2, kv_heads=1, head_dim=8, hidden=12, inv_freq=True, bias=True))
    assert res.tune["output.weight"] is hf["score.weight"]
    assert res.aside["score.bias"] is hf["score.bias"]
    assert res.aside["model.layers.0.self_attn.rotary_emb.inv_freq"] is hf[
        "model.layers.0.self_attn.rotary_emb.inv_freq"]
    # nothing was overwritten by inv_freq (torchtune 0.6.1's bug)
    for k, t in res.tune.items():
        assert t.dtype == hf["model.embed_tokens.weight"].dtype, k
    k = hf["model.layers.0.self_attn.k_proj.weight"]
    assert torch.equal(res.tune["layers.0.attn.k_proj.weight"], k.view(1, 2, 4, 12).transpose(1, 2).reshape(8, 12))
    assert_same(run_ops(ops), hf)


def test_clip_keeps_vision_tower_aside() -> None:
    hf, _, res, ops = convert("CLIP_TEXT", P())
    assert all(k.startswith("vision_model.") or k in {"logit_scale", "text_projection.weight",
               "visual_projection.weight", "text_model.embeddings.position_ids"} for k in res.aside)
    assert res.aside["logit_scale"].dim() == 0
    assert_same(run_ops(ops), hf)


@pytest.mark.parametrize("embed_tokens,shared", [(True, True), (True, False), (False, True)])
def test_t5_shared_embedding(embed_tokens: bool, shared: bool) -> None:
    p = P(extra=(("embed_tokens", embed_tokens), ("shared", shared), ("decoder", True)), tied=True)
    hf, cfg, res, ops = convert("T5_ENCODER", p)
    assert_same(run_ops(ops), hf)
    src = hf["encoder.embed_tokens.weight"] if embed_tokens else hf["shared.weight"]
    assert res.tune["token_embedding.weight"] is src
    trained = dict(res.tune)
    trained["token_embedding.weight"] = src * 2
    out = get_converter(ModelType.T5_ENCODER).tune_to_hf(trained, cfg, res.aside)
    assert set(out) == set(hf)
    for key in ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"):
        if key in out:
            assert torch.equal(out[key], trained["token_embedding.weight"]), key


def test_t5_untied_lm_head_kept_verbatim_after_training() -> None:
    hf, cfg, res, _ = convert("T5_ENCODER", P(tied=False, extra=(("decoder", True),)))
    trained = dict(res.tune)
    trained["token_embedding.weight"] = res.tune["token_embedding.weight"] + 1
    out = get_converter(ModelType.T5_ENCODER).tune_to_hf(trained, cfg, res.aside)
    assert torch.equal(out["lm_head.weight"], hf["lm_head.weight"])


def test_llama3_vision_layer_renumbering() -> None:
    p = P(layers=6, extra=(("cross", [1, 4]),))
    hf, cfg, res, ops = convert("LLAMA3_VISION", p)
    L = "language_model.model.layers."
    expect = {0: "decoder.layers.0.", 1: "decoder.layers.1.fusion_layer.", 2: "decoder.layers.1.",
              3: "decoder.layers.2.", 4: "decoder.layers.3.fusion_layer.", 5: "decoder.layers.3."}
    for n, prefix in expect.items():
        assert res.tune[prefix + "mlp.w2.weight"] is hf[f"{L}{n}.mlp.down_proj.weight"]
    assert res.tune["decoder.layers.1.fusion_layer.ca_norm.scale"] is hf[f"{L}1.input_layernorm.weight"]
    assert res.tune["decoder.layers.3.fusion_layer.ca_scale.scale"] is hf[f"{L}4.cross_attn_attn_gate"]
    # cross-attention projections are not permuted, self-attention ones are
    assert res.tune["decoder.layers.1.fusion_layer.attn.q_proj.weight"] is hf[f"{L}1.cross_attn.q_proj.weight"]
    assert not torch.equal(res.tune["decoder.layers.1.attn.q_proj.weight"], hf[f"{L}2.self_attn.q_proj.weight"])
    assert_same(run_ops(ops), hf)


def test_llama3_vision_embedding_split() -> None:
    hf, _, res, _ = convert("LLAMA3_VISION", P(vocab=10))
    e = hf["language_model.model.embed_tokens.weight"]
    assert torch.equal(res.tune["decoder.tok_embeddings.weight"], e[:10])
    assert torch.equal(res.tune["decoder.tok_embeddings.fusion_embedding.weight"], e[10:])


def test_llama3_vision_tile_tables() -> None:
    """Non-zero padding rows round-trip via the kept original; a changed grid is rebuilt."""
    hf, cfg, res, ops = convert("LLAMA3_VISION", P(extra=(("tiles", 4), ("cross", [1]))))
    key = "vision_model.gated_positional_embedding.tile_embedding.weight"
    tune_key = "encoder.clip.token_pos_embedding.global_token_positional_embedding"
    dims = VisionDims.from_config(cfg)
    grid = res.tune[tune_key]
    assert grid.shape == (4, 4, 5, 8)
    # ratios using all tiles fill the grid from row i+1, later ratios overwrite earlier ones:
    # (1,4) at index 3, then (2,2) at index 5, then (4,1) at index 7
    assert dims.aspect_ratios[3] == (1, 4) and dims.aspect_ratios[5] == (2, 2) and dims.aspect_ratios[7] == (4, 1)
    rows = hf[key].reshape(9, 4, 5, 8)
    assert torch.equal(grid[:4, 0], rows[8])
    assert torch.equal(grid[0, 1], rows[6][1]) and torch.equal(grid[1, 1], rows[6][3])
    assert torch.equal(grid[0, 2:], rows[4][2:])
    assert torch.equal(grid[2:, 1:], torch.zeros_like(grid[2:, 1:]))  # reached by no full ratio
    assert_same(run_ops(ops), hf)
    # a rebuilt table from an edited grid, and what load makes of it again
    trained = dict(res.tune)
    trained[tune_key] = grid * 2  # unreachable slots stay zero
    out = get_converter(ModelType.LLAMA3_VISION).tune_to_hf(trained, cfg, res.aside)
    rebuilt = out[key]
    assert rebuilt.shape == hf[key].shape and torch.equal(rebuilt[0], torch.zeros_like(rebuilt[0]))
    assert torch.equal(rebuilt, tiles_tune_to_hf(grid * 2, dims))
    assert torch.equal(tiles_hf_to_tune(rebuilt, dims), grid * 2)


def test_llama4_experts_split_last_dim() -> None:
    hf, _, res, ops = convert("LLAMA4", P(inter=6, extra=(("moe", [0, 1]), ("experts", 3))))
    gu = hf["language_model.model.layers.1.feed_forward.experts.gate_up_proj"]
    assert torch.equal(res.tune["decoder.layers.1.mlp.experts.gate_proj"], gu[..., :6])
    assert torch.equal(res.tune["decoder.layers.1.mlp.experts.up_proj"], gu[..., 6:])
    conv = res.tune["encoders.vision.clip.conv.weight"]
    assert conv.shape == (8, 3, 2, 2)
    assert_same(run_ops(ops), hf)


# ----------------------------------------------------------------------------------------------------
# config errors
# ----------------------------------------------------------------------------------------------------

_REQUIRED: dict[str, list[str]] = {
    "LLAMA3": ["num_attention_heads", "num_key_value_heads", "hidden_size"],
    "GEMMA2": ["num_attention_heads", "num_key_value_heads", "hidden_size"],
    "PHI3_MINI": ["num_attention_heads", "num_key_value_heads", "hidden_size"],
    "PHI4": ["num_attention_heads", "num_key_value_heads", "hidden_size"],
    "QWEN2": ["num_attention_heads", "num_key_value_heads", "hidden_size", "tie_word_embeddings"],
    "QWEN3": ["num_attention_heads", "num_key_value_heads", "hidden_size", "tie_word_embeddings"],
    "REWARD": ["num_attention_heads", "num_key_value_heads", "hidden_size"],
    "LLAMA3_VISION": [
        "text_config", "vision_config", "text_config.num_attention_heads", "text_config.num_key_value_heads",
        "text_config.hidden_size", "text_config.vocab_size", "vision_config.hidden_size",
        "vision_config.image_size", "vision_config.max_num_tiles", "vision_config.supported_aspect_ratios",
    ],
}


def _without(cfg: dict[str, Any], dotted: str) -> dict[str, Any]:
    import copy

    cfg = copy.deepcopy(cfg)
    *path, last = dotted.split(".")
    node = cfg
    for part in path:
        node = node[part]
    del node[last]
    return cfg


@pytest.mark.parametrize("family,field", [(f, x) for f, xs in _REQUIRED.items() for x in xs])
def test_config_error_names_missing_field(family: str, field: str) -> None:
    _, cfg_dict = FAMILIES[family].make(P())
    cfg = ModelConfig(_without(cfg_dict, field), "/ckpt/config.json")
    conv = get_converter(FAMILIES[family].model_type)
    with pytest.raises(ConfigError, match=re.escape(f"'{field}'")) as e:
        conv.validate_config(cfg)
    assert "/ckpt/config.json" in str(e.value)


@pytest.mark.parametrize("family", ["CLIP_TEXT", "T5_ENCODER", "LLAMA4"])
def test_config_not_needed(family: str) -> None:
    """These conversions are pure renames: an empty config.json is enough."""
    hf, _ = FAMILIES[family].make(P(extra=(("patch_in_config", False),)))
    conv = get_converter(FAMILIES[family].model_type)
    conv.validate_config(ModelConfig({}))
    res = conv.hf_to_tune(hf, ModelConfig({}))
    assert_same(conv.tune_to_hf(res.tune, ModelConfig({}), res.aside), hf)


def test_config_bad_values() -> None:
    _, cfg = make_llama3_vision(P())
    cfg["text_config"]["cross_attention_layers"] = [1, 2]
    with pytest.raises(ConfigError, match="adjacent"):
        get_converter(ModelType.LLAMA3_VISION).validate_config(ModelConfig(cfg))
    cfg["text_config"]["cross_attention_layers"] = [1]
    cfg["vision_config"]["supported_aspect_ratios"] = [[3, 3]]
    with pytest.raises(ConfigError, match="supported_aspect_ratios"):
        get_converter(ModelType.LLAMA3_VISION).validate_config(ModelConfig(cfg))
    _, cfg = make_qwen2(P())
    cfg["tie_word_embeddings"] = "yes"
    with pytest.raises(ConfigError, match="tie_word_embeddings"):
        get_converter(ModelType.QWEN2).validate_config(ModelConfig(cfg))


def test_every_model_type_registered() -> None:
    for mt in ModelType:
        assert get_converter(mt) is not None


def test_tied_copy_with_other_layout_is_written_back_verbatim() -> None:
    """A file's lm_head.weight that cannot be a copy of the embedding (other shape) is never replaced."""
    hf, cfg_dict = make_qwen2(P(tied=True, lm_head=True))
    hf = dict(hf)
    hf["lm_head.weight"] = torch.randn(3, 5)
    cfg = ModelConfig(cfg_dict)
    conv = get_converter(ModelType.QWEN2)
    res = conv.hf_to_tune(hf, cfg)
    trained = {k: v * 2 for k, v in res.tune.items()}
    out = conv.tune_to_hf(trained, cfg, res.aside)
    assert out["lm_head.weight"] is hf["lm_head.weight"]


def test_tied_copy_follows_and_keeps() -> None:
    """``tied_op`` emits the kept bytes while the embedding is unchanged and follows it once trained
    (``equal_values`` also moves a tensor from another device before comparing; no GPU here)."""
    from shardwise.convert.base import equal_values, tied_op

    emb = torch.randn(4, 3)
    kept = emb.clone()
    assert tied_op("lm_head.weight", emb.clone(), kept, emb).make() is kept
    trained = emb + 1
    assert tied_op("lm_head.weight", trained, kept, emb).make() is trained
    assert equal_values(emb, emb.clone()) and not equal_values(emb, emb + 1)
