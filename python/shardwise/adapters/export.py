"""torchtune adapter → PEFT: ``adapter_model`` weights (``tune_to_peft_adapter``) and
``adapter_config.json`` (``tune_to_peft_adapter_config``); and back (``peft_to_tune_adapter_weights``,
for resuming from a PEFT adapter)."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from ..config import ModelConfig
from ..constants import ModelType
from ..convert.base import permute_to_hf, permute_to_tune
from ..errors import ConversionError
from .families import Family, VisionFamily, family_for
from .fusing import fuse, unfuse
from .naming import (
    FUSED_METADATA_KEY,
    LORA_A,
    LORA_B,
    MAGNITUDE,
    PEFT_PREFIX,
    PEFT_TO_TUNE_SUFFIX,
    TUNE_TO_PEFT_SUFFIX,
    PeftAdapter,
    PeftExportError,
    Target,
    group_modules,
    split_peft_key,
)

__all__ = [
    "peft_to_tune_adapter_weights",
    "tune_to_peft_adapter",
    "tune_to_peft_adapter_config",
    "tune_to_peft_adapter_weights",
]

Tensor = torch.Tensor


def _permuted(t: Tensor, tgt: Target, fam: Family, key: str, to_hf: bool) -> Tensor:
    if tgt.heads is None:
        return t
    fn = permute_to_hf if to_hf else permute_to_tune
    return fn(t, tgt.heads, fam.head_dim(), key)


def tune_to_peft_adapter(adapter: Mapping[str, Tensor], model_type: ModelType, cfg: ModelConfig) -> PeftAdapter:
    """The PEFT form of a torchtune adapter (new tensors; ``adapter`` is not modified).

    Raises ``PeftExportError`` when PEFT cannot represent the adapter exactly.
    """
    fam = family_for(model_type, cfg)
    modules = group_modules(adapter)
    out = PeftAdapter({})
    fused: dict[str, list[tuple[Target, str, dict[str, Tensor]]]] = {}
    for module, parts in modules.items():
        tgt = fam.target(module)
        if tgt is None:
            raise PeftExportError(f'adapter module "{module}" has no PEFT equivalent for ModelType.{model_type.name}')
        if tgt.parts:
            fused.setdefault(tgt.hf, []).append((tgt, module, parts))
            continue
        prefix = f"{PEFT_PREFIX}{fam.peft_name(tgt.hf)}."
        out.weights[prefix + TUNE_TO_PEFT_SUFFIX[LORA_A]] = parts[LORA_A]
        out.weights[prefix + TUNE_TO_PEFT_SUFFIX[LORA_B]] = _permuted(
            parts[LORA_B], tgt, fam, module + "." + LORA_B, True
        )
        if MAGNITUDE in parts:
            out.weights[prefix + TUNE_TO_PEFT_SUFFIX[MAGNITUDE]] = _permuted(
                parts[MAGNITUDE], tgt, fam, module + "." + MAGNITUDE, True
            )
            out.use_dora = True
        out.modules[tgt.hf] = (parts[LORA_A].shape[0], 1)
    for hf, members in fused.items():
        fuse(hf, sorted(members, key=lambda m: m[0].part), out)
    if isinstance(fam, VisionFamily) and out.modules:
        out.target_regex = _modules_regex(out.modules, fam)
    return out


def _modules_regex(modules: Iterable[str], fam: Family) -> str:
    """A regex (PEFT full-matches it) naming exactly ``modules``; layer numbers grouped per sub-module."""
    groups: dict[tuple[str, str], list[str]] = {}
    singles: list[str] = []
    for hf in sorted(modules):
        m = re.fullmatch(r"(.*?\blayers)\.(\d+)\.(.+)", hf)
        if m:
            groups.setdefault((m.group(1), m.group(3)), []).append(m.group(2))
        else:
            singles.append(fam.module_pattern(hf))
    alts = []
    for (head, tail), layers in groups.items():
        nums = sorted(set(layers), key=int)
        num = nums[0] if len(nums) == 1 else "(?:" + "|".join(nums) + ")"
        alts.append(f"{fam.module_pattern(head)}\\.{num}\\.{re.escape(tail)}")
    return "(?:" + "|".join(alts + singles) + ")"


def tune_to_peft_adapter_weights(
    adapter: Mapping[str, Tensor], model_type: ModelType, cfg: ModelConfig
) -> dict[str, Tensor]:
    """torchtune adapter keys → PEFT keys (see ``tune_to_peft_adapter``)."""
    return tune_to_peft_adapter(adapter, model_type, cfg).weights


# ---------------------------------------------------------------------------------------------- config
def tune_to_peft_adapter_config(
    adapter_config: Mapping[str, Any],
    model_type: ModelType,
    base_model_name_or_path: str | None = None,
    export: PeftAdapter | None = None,
    cfg: ModelConfig | None = None,
) -> dict[str, Any]:
    """A new PEFT ``adapter_config`` (the caller's dict is not modified): ``target_modules`` in HF names,
    ``base_model_name_or_path`` when known, ``use_dora`` when the adapter has DoRA magnitudes, and
    ``rank_pattern``/``alpha_pattern`` for modules whose PEFT rank is not ``r`` (fused Phi modules).

    ``export`` is the ``tune_to_peft_adapter`` result of the adapter saved alongside, if any.
    """
    required = ["target_modules", "r", "lora_alpha"]
    if not all(k in adapter_config for k in required):
        raise ValueError(f"PEFT adapter config requires {required}, found {adapter_config.keys()}")
    out = copy.deepcopy(dict(adapter_config))
    fam = family_for(model_type, cfg if cfg is not None else ModelConfig(_DUMMY_DIMS))
    raw = out["target_modules"]
    if isinstance(raw, str):
        raw = [raw]
    targets: list[str] = []
    for m in raw:
        for name in fam.short_names(m):
            if name not in targets:
                targets.append(name)
    if isinstance(fam, VisionFamily):
        if export is None or export.target_regex is None:
            raise PeftExportError(
                "Llama-3.2-Vision: target_modules can be written for PEFT only together with the adapter "
                "weights (they tell which of the same-named modules are adapted)"
            )
        out["target_modules"] = export.target_regex
    else:
        if export is not None:
            for hf in export.modules:
                short = hf.rpartition(".")[2]
                if short not in targets:
                    targets.append(short)
        out["target_modules"] = targets
    out.setdefault("peft_type", "LORA")
    if base_model_name_or_path:
        out["base_model_name_or_path"] = base_model_name_or_path
    if export is not None:
        if export.use_dora:
            out["use_dora"] = True
        _patterns(out, export, fam)
    return out


#: stand-in dimensions when only the config (no weights) is converted: no permutation happens there
_DUMMY_DIMS = {"num_attention_heads": 1, "num_key_value_heads": 1, "hidden_size": 2}


def _patterns(out: dict[str, Any], export: PeftAdapter, fam: Family) -> None:
    r, alpha = out["r"], out["lora_alpha"]
    wanted = {hf: (rank, alpha * mult) for hf, (rank, mult) in export.modules.items() if rank != r or mult != 1}
    if not wanted:
        return
    rank_pattern = dict(out.get("rank_pattern") or {})
    alpha_pattern = dict(out.get("alpha_pattern") or {})
    by_short: dict[str, set[tuple[int, Any]]] = {}
    for hf, value in export.modules.items():
        rank, mult = value
        by_short.setdefault(hf.rpartition(".")[2], set()).add((rank, alpha * mult))
    for hf, (rank, a) in wanted.items():
        short = hf.rpartition(".")[2]
        key = short if len(by_short[short]) == 1 else fam.module_pattern(hf)
        if rank != r:
            rank_pattern[key] = rank
        if a != alpha:
            alpha_pattern[key] = a
    out["rank_pattern"] = rank_pattern
    out["alpha_pattern"] = alpha_pattern


def peft_to_tune_adapter_weights(
    weights: Mapping[str, Tensor],
    model_type: ModelType,
    cfg: ModelConfig,
    metadata: Mapping[str, str] | None = None,
) -> dict[str, Tensor]:
    """The inverse of ``tune_to_peft_adapter``: a PEFT adapter (as written by shardwise or by PEFT)
    back in torchtune keys, for resuming. ``metadata`` is the safetensors metadata of the file (it
    records the layout of fused modules). ``ConversionError`` when a tensor has no torchtune form."""
    fam = family_for(model_type, cfg)
    fused_meta: dict[str, list[str]] = {}
    if metadata and FUSED_METADATA_KEY in metadata:
        try:
            fused_meta = json.loads(metadata[FUSED_METADATA_KEY])
        except json.JSONDecodeError as e:
            raise ConversionError(f"adapter metadata {FUSED_METADATA_KEY!r} is not valid JSON ({e})") from e
    modules: dict[str, dict[str, Tensor]] = {}
    for key, t in weights.items():
        hf, suffix = split_peft_key(key)
        modules.setdefault(hf, {})[PEFT_TO_TUNE_SUFFIX[suffix]] = t
    out: dict[str, Tensor] = {}
    for hf, parts in modules.items():
        tune_modules = fam.parts_of(hf)
        if not tune_modules:
            raise ConversionError(
                f'PEFT adapter module "{hf}" has no torchtune equivalent for ModelType.{model_type.name}'
            )
        if LORA_A not in parts or LORA_B not in parts:
            raise ConversionError(f'PEFT adapter module "{hf}" needs both lora_A and lora_B')
        if len(tune_modules) == 1:
            module = tune_modules[0]
            tgt = fam.target(module)
            assert tgt is not None
            out[f"{module}.{LORA_A}"] = parts[LORA_A]
            out[f"{module}.{LORA_B}"] = _permuted(parts[LORA_B], tgt, fam, f"{module}.{LORA_B}", False)
            if MAGNITUDE in parts:
                out[f"{module}.{MAGNITUDE}"] = _permuted(parts[MAGNITUDE], tgt, fam, f"{module}.{MAGNITUDE}", False)
            continue
        out.update(unfuse(hf, tune_modules, parts, fused_meta.get(hf), fam))
    return out
