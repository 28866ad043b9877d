"""torchtune LoRA/DoRA adapters ⇄ PEFT adapter weights and ``adapter_config.json``."""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from typing import Any

import torch

from .config import ModelConfig
from .constants import ModelType
from .convert.base import KeyTable, permute_to_hf, permute_to_tune
from .convert.llama import attention_dims
from .errors import ConversionError

__all__ = [
    "PEFT_PREFIX",
    "TARGET_MODULES_TO_PEFT",
    "peft_to_tune_adapter_weights",
    "supports_peft",
    "tune_to_peft_adapter_config",
    "tune_to_peft_adapter_weights",
]

logger = logging.getLogger("shardwise")

PEFT_PREFIX = "base_model.model."

TARGET_MODULES_TO_PEFT = {
    "q_proj": "q_proj",
    "k_proj": "k_proj",
    "v_proj": "v_proj",
    "output_proj": "o_proj",
    "w1": "gate_proj",
    "w2": "down_proj",
    "w3": "up_proj",
    "output": "lm_head",
}

_MODULES = [
    ("layers.{n}.attn.q_proj", "model.layers.{n}.self_attn.q_proj"),
    ("layers.{n}.attn.k_proj", "model.layers.{n}.self_attn.k_proj"),
    ("layers.{n}.attn.v_proj", "model.layers.{n}.self_attn.v_proj"),
    ("layers.{n}.attn.output_proj", "model.layers.{n}.self_attn.o_proj"),
    ("layers.{n}.mlp.w1", "model.layers.{n}.mlp.gate_proj"),
    ("layers.{n}.mlp.w2", "model.layers.{n}.mlp.down_proj"),
    ("layers.{n}.mlp.w3", "model.layers.{n}.mlp.up_proj"),
    ("output", "lm_head"),
]
_SUFFIXES = [
    ("lora_a.weight", "lora_A.weight"),
    ("lora_b.weight", "lora_B.weight"),
    ("magnitude", "lora_magnitude_vector"),
]


def _table(output_module: str = "lm_head") -> KeyTable:
    pairs = []
    for tune_mod, hf_mod in _MODULES:
        if tune_mod == "output":
            hf_mod = output_module
        for ts, ps in _SUFFIXES:
            pairs.append((f"{tune_mod}.{ts}", f"{PEFT_PREFIX}{hf_mod}.{ps}"))
    return KeyTable(pairs)


_NO_PEFT = {ModelType.PHI3_MINI, ModelType.PHI4, ModelType.LLAMA3_VISION, ModelType.LLAMA4}
# families whose base q/k weights are RoPE-permuted on load (so adapters must be permuted back)
_PERMUTED = {
    ModelType.LLAMA2,
    ModelType.LLAMA3,
    ModelType.LLAMA3_2,
    ModelType.MISTRAL,
    ModelType.GEMMA,
    ModelType.GEMMA2,
    ModelType.REWARD,
}


def supports_peft(model_type: ModelType) -> bool:
    """Whether the adapter of this family can be exported exactly in PEFT format."""
    return model_type not in _NO_PEFT and model_type not in (ModelType.CLIP_TEXT, ModelType.T5_ENCODER)


def _output_module(model_type: ModelType) -> str:
    return "score" if model_type is ModelType.REWARD else "lm_head"


def _dims(cfg: ModelConfig, model_type: ModelType) -> tuple[int, int, int]:
    return attention_dims(cfg, use_head_dim=True)


def tune_to_peft_adapter_weights(
    adapter: Mapping[str, torch.Tensor], model_type: ModelType, cfg: ModelConfig
) -> dict[str, torch.Tensor]:
    """torchtune adapter keys → PEFT keys; q/k ``lora_B`` rows (and DoRA magnitudes) are put back in
    HF row order only for families whose base weights were permuted (not Qwen2/Qwen3)."""
    table = _table(_output_module(model_type))
    permute = model_type in _PERMUTED
    n_heads, n_kv, head_dim = _dims(cfg, model_type) if permute else (0, 0, 0)
    out: dict[str, torch.Tensor] = {}
    for key, t in adapter.items():
        if not isinstance(t, torch.Tensor):
            raise ConversionError(f'adapter value for "{key}" is a {type(t).__name__}, not a tensor')
        new = table.map(key, f"{model_type.name} adapter")
        assert new is not None
        if permute and (key.endswith("lora_b.weight") or key.endswith("magnitude")):
            if ".attn.q_proj." in key:
                t = permute_to_hf(t, n_heads, head_dim, key)
            elif ".attn.k_proj." in key:
                t = permute_to_hf(t, n_kv, head_dim, key)
        out[new] = t
    return out


def peft_to_tune_adapter_weights(
    adapter: Mapping[str, torch.Tensor], model_type: ModelType, cfg: ModelConfig
) -> dict[str, torch.Tensor]:
    """The inverse of ``tune_to_peft_adapter_weights`` (used to resume from a PEFT adapter)."""
    table = _table(_output_module(model_type)).inverse()
    permute = model_type in _PERMUTED
    n_heads, n_kv, head_dim = _dims(cfg, model_type) if permute else (0, 0, 0)
    out: dict[str, torch.Tensor] = {}
    for key, t in adapter.items():
        new = table.map(key, f"{model_type.name} PEFT adapter")
        assert new is not None
        if permute and (new.endswith("lora_b.weight") or new.endswith("magnitude")):
            if ".attn.q_proj." in new:
                t = permute_to_tune(t, n_heads, head_dim, key)
            elif ".attn.k_proj." in new:
                t = permute_to_tune(t, n_kv, head_dim, key)
        out[new] = t
    return out


def tune_to_peft_adapter_config(
    adapter_config: Mapping[str, Any],
    model_type: ModelType,
    base_model_name_or_path: str | None = None,
    adapter: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """A new PEFT ``adapter_config`` (the caller's dict is not mutated): ``target_modules`` in HF
    names, ``base_model_name_or_path`` when known, ``use_dora`` when DoRA magnitudes are present."""
    required = ["target_modules", "r", "lora_alpha"]
    if not all(k in adapter_config for k in required):
        raise ValueError(f"PEFT adapter config requires {required}, found {adapter_config.keys()}")
    cfg = copy.deepcopy(dict(adapter_config))
    mapping = dict(TARGET_MODULES_TO_PEFT, output=_output_module(model_type))
    targets = []
    for m in cfg["target_modules"]:
        if m not in mapping:
            raise ValueError(f"Unknown target module {m}")
        targets.append(mapping[m])
    cfg["target_modules"] = targets
    cfg.setdefault("peft_type", "LORA")
    if base_model_name_or_path:
        cfg["base_model_name_or_path"] = base_model_name_or_path
    if adapter is not None and any(k.endswith("magnitude") for k in adapter):
        cfg["use_dora"] = True
    return cfg
