"""PHI3_MINI and PHI4: fused ``qkv_proj`` split into q/k/v (MHA or GQA) and fused ``gate_up_proj``
split into w1/w3. No RoPE permutation: torchtune's Phi3 uses HF's rotate-half layout."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..config import ModelConfig
from ..errors import ConversionError
from .base import Converter, KeyTable, LoadResult, Op, concat_rows_op, identity_op
from .llama import attention_dims

__all__ = ["PHI3_TABLE", "Phi3Converter"]

_QKV = "model.layers.{n}.self_attn.qkv_proj.weight"
_GATE_UP = "model.layers.{n}.mlp.gate_up_proj.weight"

#: plain 1:1 entries; the two fused keys are split by hand (their tune names are listed in ``_FUSED``)
PHI3_TABLE = KeyTable(
    [
        ("model.embed_tokens.weight", "tok_embeddings.weight"),
        ("model.layers.{n}.self_attn.o_proj.weight", "layers.{n}.attn.output_proj.weight"),
        ("model.layers.{n}.self_attn.rotary_emb.inv_freq", None),
        ("model.layers.{n}.mlp.down_proj.weight", "layers.{n}.mlp.w2.weight"),
        ("model.layers.{n}.input_layernorm.weight", "layers.{n}.sa_norm.scale"),
        ("model.layers.{n}.post_attention_layernorm.weight", "layers.{n}.mlp_norm.scale"),
        ("model.norm.weight", "norm.scale"),
        ("lm_head.weight", "output.weight"),
        (_QKV, "layers.{n}.attn.qkv"),
        (_GATE_UP, "layers.{n}.mlp.gate_up"),
    ]
)

#: fused HF key (abstract tune marker) → the torchtune parts, in concatenation order
_FUSED = {
    "attn.qkv": ("attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight"),
    "mlp.gate_up": ("mlp.w1.weight", "mlp.w3.weight"),
}
_PART_OF = {part: (marker, i) for marker, parts in _FUSED.items() for i, part in enumerate(parts)}


def _split(key: str, t: torch.Tensor, sizes: list[int]) -> tuple[torch.Tensor, ...]:
    if t.dim() < 1 or t.shape[0] != sum(sizes):
        raise ConversionError(
            f'"{key}": shape {tuple(t.shape)} does not split into rows {sizes} '
            "(check num_attention_heads / num_key_value_heads / hidden_size / head_dim in config.json)"
        )
    return torch.split(t, sizes, dim=0)


class Phi3Converter(Converter):
    """HF Phi-3 / Phi-4 keys ⇄ torchtune keys; fused projections become views on load, ``cat`` on save."""

    family = "phi3"

    def validate_config(self, cfg: ModelConfig) -> None:
        attention_dims(cfg)

    def hf_to_tune(self, hf: Mapping[str, torch.Tensor], cfg: ModelConfig) -> LoadResult:
        n_heads, n_kv, head_dim = attention_dims(cfg)
        out = LoadResult({})
        for key, t in hf.items():
            new = PHI3_TABLE.map(key, self.family)
            if new is None:
                out.aside[key] = t
                continue
            prefix, _, rest = new.partition(".")
            layer, _, marker = rest.partition(".")
            if prefix == "layers" and marker == "attn.qkv":
                q, k, v = _split(key, t, [n_heads * head_dim, n_kv * head_dim, n_kv * head_dim])
                for part, value in zip(_FUSED[marker], (q, k, v)):
                    out.tune[f"layers.{layer}.{part}"] = value
            elif prefix == "layers" and marker == "mlp.gate_up":
                if t.dim() < 1 or t.shape[0] % 2:
                    raise ConversionError(f'"{key}": shape {tuple(t.shape)} has an odd number of rows')
                w1, w3 = t.chunk(2, dim=0)
                out.tune[f"layers.{layer}.mlp.w1.weight"] = w1
                out.tune[f"layers.{layer}.mlp.w3.weight"] = w3
            else:
                out.tune[new] = t
        return out

    def tune_to_hf_ops(
        self, tune: Mapping[str, torch.Tensor], cfg: ModelConfig, aside: Mapping[str, torch.Tensor]
    ) -> list[Op]:
        inverse = PHI3_TABLE.inverse()
        ops: list[Op] = []
        done: set[str] = set()
        for key, t in tune.items():
            prefix, _, rest = key.partition(".")
            layer, _, suffix = rest.partition(".")
            if prefix == "layers" and suffix in _PART_OF:
                marker, _ = _PART_OF[suffix]
                fused_tune = f"layers.{layer}.{marker}"
                if fused_tune in done:
                    continue
                done.add(fused_tune)
                names = [f"layers.{layer}.{p}" for p in _FUSED[marker]]
                missing = [n for n in names if n not in tune]
                if missing:
                    raise ConversionError(
                        f'"{key}": its fused partner(s) {missing} are missing from the state dict'
                    )
                parts = [tune[n] for n in names]
                _check_fusable(names, parts)
                new = inverse.map(fused_tune, self.family)
                assert new is not None
                ops.append(concat_rows_op(new, parts))
                continue
            new = inverse.map(key, self.family)
            assert new is not None
            ops.append(identity_op(new, t))
        return self.append_aside(ops, aside)


def _check_fusable(names: list[str], parts: list[torch.Tensor]) -> None:
    """Parts of one fused tensor must agree in dtype and trailing shape (checked without reading data)."""
    first = parts[0]
    for name, p in zip(names, parts):
        if p.dtype != first.dtype or p.dim() != first.dim() or p.shape[1:] != first.shape[1:]:
            raise ConversionError(
                f'"{name}": dtype {p.dtype} / shape {tuple(p.shape)} cannot be concatenated with '
                f'"{names[0]}" ({first.dtype} / {tuple(first.shape)})'
            )
