"""The names on both sides: torchtune's LoRA/DoRA parameter suffixes and PEFT's, the PEFT key prefix,
``PeftAdapter`` (an adapter in PEFT form) and the per-module grouping both directions start from."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from ..errors import ConversionError

__all__ = [
    "FUSED_METADATA_KEY",
    "LORA_A",
    "LORA_B",
    "LORA_LEAVES",
    "MAGNITUDE",
    "PEFT_PREFIX",
    "PEFT_TO_TUNE_SUFFIX",
    "TARGET_MODULES_TO_PEFT",
    "TUNE_TO_PEFT_SUFFIX",
    "PeftAdapter",
    "PeftExportError",
    "Target",
    "group_modules",
    "split_peft_key",
    "split_tune_key",
]

PEFT_PREFIX = "base_model.model."

#: safetensors metadata key recording which torchtune modules make up each fused PEFT module
FUSED_METADATA_KEY = "shardwise.fused_modules"

#: torchtune ``target_modules`` entries → PEFT names (the generic table; families adjust it)
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

LORA_A, LORA_B, MAGNITUDE = "lora_a.weight", "lora_b.weight", "magnitude"
TUNE_TO_PEFT_SUFFIX = {LORA_A: "lora_A.weight", LORA_B: "lora_B.weight", MAGNITUDE: "lora_magnitude_vector"}
PEFT_TO_TUNE_SUFFIX = {
    "lora_A.weight": LORA_A,
    "lora_B.weight": LORA_B,
    "lora_magnitude_vector": MAGNITUDE,
    "lora_magnitude_vector.weight": MAGNITUDE,
}
#: the torchtune modules that LoRA/DoRA can wrap (the last segment of the module name)
LORA_LEAVES = {"q_proj", "k_proj", "v_proj", "output_proj", "w1", "w2", "w3", "output"}

Tensor = torch.Tensor


class PeftExportError(ConversionError):
    """The adapter has no exact PEFT equivalent (it is then saved in torchtune format only)."""


@dataclass(frozen=True)
class Target:
    """Where a torchtune LoRA module lives in HF: module path, RoPE heads, place in a fused module."""

    hf: str
    heads: int | None = None  # rows RoPE-permuted with this many heads (None: not permuted)
    part: int = 0
    parts: tuple[str, ...] = ()  # every torchtune module of the fused HF module, in row order
    rows: tuple[int | None, ...] = ()  # their row counts (None: same as the others)


@dataclass
class PeftAdapter:
    """An adapter in PEFT form, with what its ``adapter_config.json`` must say about it."""

    weights: dict[str, Tensor]
    #: HF module path (checkpoint names) → (rank, alpha multiplier) of that PEFT module
    modules: dict[str, tuple[int, int]] = field(default_factory=dict)
    #: fused HF module → the torchtune modules present in it, in block order
    fused: dict[str, list[str]] = field(default_factory=dict)
    use_dora: bool = False
    #: PEFT ``target_modules`` for exactly these modules when short names would be ambiguous
    target_regex: str | None = None

    def metadata(self) -> dict[str, str]:
        """safetensors metadata: ``{"format": "pt"}`` plus the fused layout (needed to resume from it)."""
        meta = {"format": "pt"}
        if self.fused:
            meta[FUSED_METADATA_KEY] = json.dumps(self.fused, sort_keys=True)
        return meta


def split_tune_key(key: str) -> tuple[str, str]:
    for suffix in (LORA_A, LORA_B, MAGNITUDE):
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    raise PeftExportError(f'adapter key "{key}" is not a LoRA/DoRA parameter (lora_a, lora_b, magnitude)')


def group_modules(adapter: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    modules: dict[str, dict[str, Tensor]] = {}
    for key, t in adapter.items():
        if not isinstance(t, Tensor):
            raise ConversionError(f'adapter value for "{key}" is a {type(t).__name__}, not a tensor')
        module, suffix = split_tune_key(key)
        modules.setdefault(module, {})[suffix] = t
    for module, parts in modules.items():
        if LORA_A not in parts or LORA_B not in parts:
            raise PeftExportError(f'adapter module "{module}" needs both lora_a.weight and lora_b.weight')
        a, b = parts[LORA_A], parts[LORA_B]
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
            raise PeftExportError(
                f'adapter module "{module}": lora_a {tuple(a.shape)} and lora_b {tuple(b.shape)} '
                "are not [r, in], [out, r]"
            )
        if MAGNITUDE in parts and tuple(parts[MAGNITUDE].shape) != (b.shape[0],):
            raise PeftExportError(
                f'adapter module "{module}": magnitude {tuple(parts[MAGNITUDE].shape)} is not [{b.shape[0]}]'
            )
    return modules


def split_peft_key(key: str) -> tuple[str, str]:
    body = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
    for suffix in PEFT_TO_TUNE_SUFFIX:
        if body.endswith("." + suffix):
            return body[: -len(suffix) - 1], suffix
    raise ConversionError(
        f'PEFT adapter key "{key}" is not a LoRA/DoRA parameter (lora_A, lora_B, lora_magnitude_vector)'
    )
