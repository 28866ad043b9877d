"""LLAMA3_VISION (HF ``MllamaForConditionalGeneration``): text decoder with interleaved
cross-attention layers, the tiled CLIP vision encoder and its projection.

- HF numbers cross-attention layers among the decoder layers; torchtune wraps each one with the
  self-attention layer that follows it (``FusionLayer``), so layers are renumbered.
- HF's token embedding holds the text vocabulary and the extra image tokens in one table; torchtune
  splits it into ``tok_embeddings`` and ``tok_embeddings.fusion_embedding``.
- HF stores tile position tables per supported aspect ratio (row 0 padding); torchtune stores one
  ``[tiles, tiles, embeds, dim]`` grid. That reshape is lossy when HF's padding row or unused slots
  are non-zero, so the original tables are kept aside and written back while unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..config import ModelConfig
from ..errors import ConfigError, ConversionError
from .base import (
    Converter,
    KeyTable,
    LoadResult,
    Op,
    concat_rows_op,
    equal_values,
    identity_op,
    permute_to_tune,
    permuted_op,
)

__all__ = ["CROSS_LAYER_TABLE", "LLAMA3_VISION_TABLE", "SELF_LAYER_TABLE", "Llama3VisionConverter", "VisionDims"]

_TEXT = "language_model.model."
_LAYER = "language_model.model.layers."
_EMBED = "language_model.model.embed_tokens.weight"
_TOK = "decoder.tok_embeddings.weight"
_FUSION_TOK = "decoder.tok_embeddings.fusion_embedding.weight"

#: HF sub-keys of a self-attention decoder layer → torchtune sub-keys of ``decoder.layers.{m}``
SELF_LAYER_TABLE = KeyTable(
    [
        ("self_attn.q_proj.weight", "attn.q_proj.weight"),
        ("self_attn.k_proj.weight", "attn.k_proj.weight"),
        ("self_attn.v_proj.weight", "attn.v_proj.weight"),
        ("self_attn.o_proj.weight", "attn.output_proj.weight"),
        ("self_attn.rotary_emb.inv_freq", None),
        ("mlp.gate_proj.weight", "mlp.w1.weight"),
        ("mlp.up_proj.weight", "mlp.w3.weight"),
        ("mlp.down_proj.weight", "mlp.w2.weight"),
        ("input_layernorm.weight", "sa_norm.scale"),
        ("post_attention_layernorm.weight", "mlp_norm.scale"),
    ]
)

#: HF sub-keys of a cross-attention decoder layer → torchtune sub-keys of ``decoder.layers.{m}.fusion_layer``
CROSS_LAYER_TABLE = KeyTable(
    [
        ("cross_attn.q_proj.weight", "attn.q_proj.weight"),
        ("cross_attn.k_proj.weight", "attn.k_proj.weight"),
        ("cross_attn.v_proj.weight", "attn.v_proj.weight"),
        ("cross_attn.o_proj.weight", "attn.output_proj.weight"),
        ("cross_attn.q_norm.weight", "attn.q_norm.scale"),
        ("cross_attn.k_norm.weight", "attn.k_norm.scale"),
        ("cross_attn_attn_gate", "ca_scale.scale"),
        ("cross_attn_mlp_gate", "mlp_scale.scale"),
        ("self_attn.rotary_emb.inv_freq", None),
        ("mlp.gate_proj.weight", "mlp.w1.weight"),
        ("mlp.up_proj.weight", "mlp.w3.weight"),
        ("mlp.down_proj.weight", "mlp.w2.weight"),
        ("input_layernorm.weight", "ca_norm.scale"),
        ("post_attention_layernorm.weight", "mlp_norm.scale"),
    ]
)


def _encoder_layer_pairs(hf: str, tune: str, gated: bool) -> list[tuple[str, str | None]]:
    pairs: list[tuple[str, str | None]] = [
        (f"{hf}.layers.{{n}}.self_attn.{p}_proj.weight", f"{tune}.layers.{{n}}.attn.{q}_proj.weight")
        for p, q in (("q", "q"), ("k", "k"), ("v", "v"), ("o", "output"))
    ]
    for p in ("weight", "bias"):
        pairs += [
            (f"{hf}.layers.{{n}}.mlp.fc1.{p}", f"{tune}.layers.{{n}}.mlp.w1.{p}"),
            (f"{hf}.layers.{{n}}.mlp.fc2.{p}", f"{tune}.layers.{{n}}.mlp.w2.{p}"),
            (f"{hf}.layers.{{n}}.input_layernorm.{p}", f"{tune}.layers.{{n}}.sa_norm.{p}"),
            (f"{hf}.layers.{{n}}.post_attention_layernorm.{p}", f"{tune}.layers.{{n}}.mlp_norm.{p}"),
        ]
    if gated:
        pairs += [
            (f"{hf}.layers.{{n}}.gate_attn", f"{tune}.layers.{{n}}.sa_scale.scale"),
            (f"{hf}.layers.{{n}}.gate_ffn", f"{tune}.layers.{{n}}.mlp_scale.scale"),
        ]
    return pairs


_GLOBAL_POS = "encoder.clip.token_pos_embedding.global_token_positional_embedding"
_PRE_TILE = "encoder.clip.pre_tile_pos_embed.embedding"
_POST_TILE = "encoder.clip.post_tile_pos_embed.embedding"
_TILE_TABLES = {_GLOBAL_POS, _PRE_TILE, _POST_TILE}

#: every key outside the text decoder's layers (and outside the split embedding)
LLAMA3_VISION_TABLE = KeyTable(
    [
        ("language_model.model.norm.weight", "decoder.norm.scale"),
        ("language_model.lm_head.weight", "decoder.output.weight"),
        ("vision_model.patch_embedding.weight", "encoder.clip.conv.weight"),
        ("vision_model.class_embedding", "encoder.clip.cls_token_embedding.weight"),
        (
            "vision_model.gated_positional_embedding.embedding",
            "encoder.clip.token_pos_embedding.local_token_positional_embedding",
        ),
        ("vision_model.gated_positional_embedding.tile_embedding.weight", _GLOBAL_POS),
        ("vision_model.gated_positional_embedding.gate", "encoder.clip.token_pos_embedding.gate"),
        ("vision_model.layernorm_pre.weight", "encoder.clip.ln_pre.weight"),
        ("vision_model.layernorm_pre.bias", "encoder.clip.ln_pre.bias"),
        ("vision_model.layernorm_post.weight", "encoder.clip.ln_post.weight"),
        ("vision_model.layernorm_post.bias", "encoder.clip.ln_post.bias"),
        ("vision_model.pre_tile_positional_embedding.embedding.weight", _PRE_TILE),
        ("vision_model.pre_tile_positional_embedding.gate", "encoder.clip.pre_tile_pos_embed.gate"),
        ("vision_model.post_tile_positional_embedding.embedding.weight", _POST_TILE),
        ("vision_model.post_tile_positional_embedding.gate", "encoder.clip.post_tile_pos_embed.gate"),
        ("multi_modal_projector.weight", "encoder.projection.output.weight"),
        ("multi_modal_projector.bias", "encoder.projection.output.bias"),
    ]
    + _encoder_layer_pairs("vision_model.transformer", "encoder.clip", gated=False)
    + _encoder_layer_pairs("vision_model.global_transformer", "encoder.projection", gated=True)
)


@dataclass(frozen=True)
class VisionDims:
    """Everything the conversion needs from ``text_config`` / ``vision_config``."""

    n_heads: int
    n_kv: int
    head_dim: int
    vocab_size: int
    cross_layers: tuple[int, ...]
    encoder_dim: int
    num_tiles: int
    aspect_ratios: tuple[tuple[int, int], ...]

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> VisionDims:
        text = cfg.sub("text_config")
        vision = cfg.sub("vision_config")
        n_heads = text.require_int("num_attention_heads")
        n_kv = text.require_int("num_key_value_heads")
        dim = text.require_int("hidden_size")
        head_dim = text.optional_int("head_dim") or dim // n_heads
        vocab = text.require_int("vocab_size")
        cal = text.get("cross_attention_layers", [])
        if not isinstance(cal, list) or not all(isinstance(c, int) and c >= 0 for c in cal):
            raise ConfigError(
                f"{cfg.source}: field 'text_config.cross_attention_layers' must be a list of layer "
                f"indices, got {cal!r}"
            )
        cross = tuple(sorted(set(cal)))
        if any(b == a + 1 for a, b in zip(cross, cross[1:])):
            raise ConfigError(
                f"{cfg.source}: 'text_config.cross_attention_layers' {list(cross)} has adjacent layers; "
                "each cross-attention layer must be followed by a self-attention layer"
            )
        encoder_dim = vision.require_int("hidden_size")
        vision.require_int("image_size")
        num_tiles = vision.require_int("max_num_tiles")
        ratios = vision.require("supported_aspect_ratios", list)
        if not all(
            isinstance(r, (list, tuple)) and len(r) == 2 and all(isinstance(x, int) and x > 0 for x in r)
            for r in ratios
        ):
            raise ConfigError(
                f"{cfg.source}: field 'vision_config.supported_aspect_ratios' must be a list of "
                f"[height, width] pairs, got {ratios!r}"
            )
        pairs = tuple((int(h), int(w)) for h, w in ratios)
        if any(h * w > num_tiles for h, w in pairs):
            raise ConfigError(
                f"{cfg.source}: 'vision_config.supported_aspect_ratios' {ratios} has a ratio with more "
                f"than max_num_tiles={num_tiles} tiles"
            )
        return cls(n_heads, n_kv, head_dim, vocab, cross, encoder_dim, num_tiles, pairs)

    def hf_to_tune_layer(self, n: int) -> tuple[int, bool]:
        """HF decoder layer → (torchtune layer, is it the fusion layer)."""
        return n - sum(1 for c in self.cross_layers if c < n), n in self.cross_layers

    def tune_to_hf_layer(self, m: int, fusion: bool) -> int:
        """Inverse of ``hf_to_tune_layer``."""
        if fusion:
            for i, c in enumerate(self.cross_layers):
                if c - i == m:
                    return c
            raise ConversionError(
                f"decoder layer {m} has a fusion_layer but text_config.cross_attention_layers "
                f"{list(self.cross_layers)} puts no cross-attention layer there"
            )
        return m + sum(1 for i, c in enumerate(self.cross_layers) if c - i <= m)


def tiles_hf_to_tune(value: torch.Tensor, dims: VisionDims, key: str = "") -> torch.Tensor:
    """HF per-aspect-ratio table ``[ratios+1, tiles*embeds*dim]`` → torchtune grid ``[tiles, tiles, embeds, dim]``.

    Only ratios that use every tile fill the grid (a later ratio overwrites overlapping slots);
    row 0 (padding) and slots no such ratio reaches are not represented.
    """
    t, d = dims.num_tiles, dims.encoder_dim
    rows = len(dims.aspect_ratios) + 1
    if value.dim() != 2 or value.shape[0] != rows or value.shape[1] % (t * d):
        raise ConversionError(
            f'"{key}": shape {tuple(value.shape)} does not fit {rows} rows of max_num_tiles={t} × '
            f"embeds × hidden_size={d} (check vision_config)"
        )
    e = value.shape[1] // (t * d)
    out = torch.zeros(t, t, e, d, dtype=value.dtype)
    for i, (h, w) in enumerate(dims.aspect_ratios):
        if h * w == t:
            out[:h, :w] = value[i + 1].reshape(h, w, e, d)
    return out


def tiles_tune_to_hf(value: torch.Tensor, dims: VisionDims, key: str = "") -> torch.Tensor:
    """torchtune grid ``[tiles, tiles, embeds, dim]`` → HF table ``[ratios+1, tiles*embeds*dim]`` (row 0 zero)."""
    t = dims.num_tiles
    if value.dim() != 4 or value.shape[0] != t or value.shape[1] != t:
        raise ConversionError(
            f'"{key}": shape {tuple(value.shape)} is not [max_num_tiles={t}, {t}, embeds, dim]'
        )
    e, d = value.shape[2], value.shape[3]
    out = torch.zeros(len(dims.aspect_ratios) + 1, t, e, d, dtype=value.dtype)
    for i, (h, w) in enumerate(dims.aspect_ratios):
        out[i + 1, : h * w] = value[:h, :w].reshape(h * w, e, d)
    return out.reshape(out.shape[0], -1)


def _tiles_op(key: str, value: torch.Tensor, kept: torch.Tensor | None, dims: VisionDims) -> Op:
    """Rebuild an HF tile table, or emit the kept original while ``value`` is still what load made of it."""
    t = dims.num_tiles
    if value.dim() != 4 or value.shape[0] != t or value.shape[1] != t:
        tiles_tune_to_hf(value, dims, key)  # raises the shape error now, not inside make()
    shape = (len(dims.aspect_ratios) + 1, t * value.shape[2] * value.shape[3])

    def make() -> torch.Tensor:
        if kept is not None and kept.dtype == value.dtype and tuple(kept.shape) == shape:
            if equal_values(tiles_hf_to_tune(kept, dims, key), value):
                return kept
        return tiles_tune_to_hf(value, dims, key)

    return Op(key, value.dtype, shape, make)


class Llama3VisionConverter(Converter):
    """HF Mllama keys ⇄ torchtune ``llama3_2_vision`` keys (see the module docstring)."""

    family = "llama3_vision"

    def validate_config(self, cfg: ModelConfig) -> None:
        VisionDims.from_config(cfg)

    def _layer_to_tune(self, key: str, t: torch.Tensor, dims: VisionDims) -> tuple[str | None, torch.Tensor]:
        num, _, rest = key[len(_LAYER):].partition(".")
        if not num.isdigit():
            raise ConversionError(f'unexpected key "{key}" for {self.family}: not in the key table')
        m, fusion = dims.hf_to_tune_layer(int(num))
        table = CROSS_LAYER_TABLE if fusion else SELF_LAYER_TABLE
        found, sub = table.lookup(rest)
        if not found:
            raise ConversionError(
                f'unexpected key "{key}" for {self.family}: not in the key table '
                f"(layer {num} is a {'cross' if fusion else 'self'}-attention layer per "
                "text_config.cross_attention_layers)"
            )
        if sub is None:
            return None, t
        if not fusion and sub == "attn.q_proj.weight":
            t = permute_to_tune(t, dims.n_heads, dims.head_dim, key)
        elif not fusion and sub == "attn.k_proj.weight":
            t = permute_to_tune(t, dims.n_kv, dims.head_dim, key)
        return f"decoder.layers.{m}.{'fusion_layer.' if fusion else ''}{sub}", t

    def hf_to_tune(self, hf: Mapping[str, torch.Tensor], cfg: ModelConfig) -> LoadResult:
        dims = VisionDims.from_config(cfg)
        out = LoadResult({})
        for key, t in hf.items():
            if key.startswith(_LAYER):
                new, value = self._layer_to_tune(key, t, dims)
                if new is None:
                    out.aside[key] = t
                else:
                    out.tune[new] = value
                continue
            if key == _EMBED:
                if t.dim() != 2 or t.shape[0] < dims.vocab_size:
                    raise ConversionError(
                        f'"{key}": shape {tuple(t.shape)} has fewer rows than '
                        f"text_config.vocab_size={dims.vocab_size}"
                    )
                out.tune[_TOK] = t[: dims.vocab_size]
                out.tune[_FUSION_TOK] = t[dims.vocab_size:]
                continue
            new = LLAMA3_VISION_TABLE.map(key, self.family)
            if new is None:
                out.aside[key] = t
            elif new in _TILE_TABLES:
                out.tune[new] = tiles_hf_to_tune(t, dims, key)
                out.aside[key] = t  # the original, emitted again on save while unchanged
            else:
                out.tune[new] = t
        return out

    def _layer_to_hf(self, key: str, t: torch.Tensor, dims: VisionDims) -> Op:
        num, _, rest = key[len("decoder.layers."):].partition(".")
        fusion = rest.startswith("fusion_layer.")
        sub = rest[len("fusion_layer."):] if fusion else rest
        table = (CROSS_LAYER_TABLE if fusion else SELF_LAYER_TABLE).inverse()
        if not num.isdigit() or not table.lookup(sub)[0]:
            raise ConversionError(f'unexpected key "{key}" for {self.family}: not in the key table')
        n = dims.tune_to_hf_layer(int(num), fusion)
        hf_sub = table.map(sub)
        new = f"{_LAYER}{n}.{hf_sub}"
        heads = None
        if not fusion and sub == "attn.q_proj.weight":
            heads = dims.n_heads
        elif not fusion and sub == "attn.k_proj.weight":
            heads = dims.n_kv
        if heads is None:
            return identity_op(new, t)
        return permuted_op(new, t, heads, dims.head_dim, key)

    def tune_to_hf_ops(
        self, tune: Mapping[str, torch.Tensor], cfg: ModelConfig, aside: Mapping[str, torch.Tensor]
    ) -> list[Op]:
        dims = VisionDims.from_config(cfg)
        inverse = LLAMA3_VISION_TABLE.inverse()
        ops: list[Op] = []
        for key, t in tune.items():
            if key.startswith("decoder.layers."):
                ops.append(self._layer_to_hf(key, t, dims))
            elif key == _TOK:
                fusion = tune.get(_FUSION_TOK)
                if fusion is None:
                    ops.append(identity_op(_EMBED, t))
                else:
                    if fusion.dtype != t.dtype or fusion.shape[1:] != t.shape[1:]:
                        raise ConversionError(
                            f'"{_FUSION_TOK}": dtype {fusion.dtype} / shape {tuple(fusion.shape)} cannot '
                            f'be concatenated with "{_TOK}" ({t.dtype} / {tuple(t.shape)})'
                        )
                    ops.append(concat_rows_op(_EMBED, [t, fusion]))
            elif key == _FUSION_TOK:
                if _TOK not in tune:
                    raise ConversionError(f'"{key}" is in the state dict without "{_TOK}"')
            else:
                new = inverse.map(key, self.family)
                assert new is not None
                if key in _TILE_TABLES:
                    ops.append(_tiles_op(new, t, aside.get(new), dims))
                else:
                    ops.append(identity_op(new, t))
        return self.append_aside(ops, aside)
