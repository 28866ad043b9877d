"""torchtune LoRA/DoRA adapters ⇄ PEFT adapter weights and ``adapter_config.json``.

torchtune names an adapter by its module: ``layers.{n}.attn.q_proj.lora_a.weight`` ``[r, in]``,
``...lora_b.weight`` ``[out, r]`` and, for DoRA, ``...magnitude`` ``[out]``. PEFT names it by the HF
module path: ``base_model.model.<hf module>.lora_A.weight`` / ``lora_B.weight`` /
``lora_magnitude_vector``. The HF module path of each family comes from its converter's key table,
so adapters follow the base weights exactly:

- q/k ``lora_B`` rows and DoRA magnitudes are RoPE-permuted back to HF row order only for families
  whose base q/k weights are permuted on load (Llama, Mistral, Gemma, Gemma2, reward models and the
  Llama-3.2-Vision self-attention layers), never for Qwen2/Qwen3 or Phi.
- Phi's fused ``qkv_proj`` / ``gate_up_proj``: separate q/k/v (w1/w3) LoRAs of rank r are exactly one
  LoRA of rank k·r on the fused module, with ``A = cat(A_q, A_k, A_v)`` and ``B = blockdiag(B_q, B_k,
  B_v)`` (a part without LoRA is a zero block); ``rank_pattern``/``alpha_pattern`` give that module
  rank k·r and alpha k·alpha, so the scaling alpha/r is unchanged. DoRA magnitudes concatenate too
  (the norm is per output row), but only when every part of the fused module has one.
- Llama-3.2-Vision: torchtune puts LoRA on some of the modules sharing a short name (e.g. the
  cross-attention and vision-encoder ``q_proj`` but not the self-attention ones), so
  ``target_modules`` is a regular expression naming exactly the adapted modules, under both the
  checkpoint's names and those of transformers ≥ 4.52 (``model.language_model...``); the weight keys
  use the latter, as PEFT itself writes them for those versions.

Anything else that has no exact PEFT equivalent raises ``PeftExportError``; the checkpointer then
saves the torchtune format only, with a warning (as torchtune does for Phi and Vision).
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import ModelConfig
from ..constants import ModelType
from ..convert import get_converter
from ..convert.base import KeyTable, permute_to_hf, permute_to_tune
from ..convert.llama import attention_dims
from ..convert.phi3 import PHI3_TABLE
from ..errors import ConversionError

__all__ = [
    "FUSED_METADATA_KEY",
    "PEFT_PREFIX",
    "TARGET_MODULES_TO_PEFT",
    "PeftAdapter",
    "PeftExportError",
    "peft_to_tune_adapter_weights",
    "supports_peft",
    "tune_to_peft_adapter",
    "tune_to_peft_adapter_config",
    "tune_to_peft_adapter_weights",
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

_A, _B, _MAG = "lora_a.weight", "lora_b.weight", "magnitude"
_TUNE_TO_PEFT_SUFFIX = {_A: "lora_A.weight", _B: "lora_B.weight", _MAG: "lora_magnitude_vector"}
_PEFT_TO_TUNE_SUFFIX = {
    "lora_A.weight": _A,
    "lora_B.weight": _B,
    "lora_magnitude_vector": _MAG,
    "lora_magnitude_vector.weight": _MAG,
}
#: the torchtune modules that LoRA/DoRA can wrap (the last segment of the module name)
_LORA_LEAVES = {"q_proj", "k_proj", "v_proj", "output_proj", "w1", "w2", "w3", "output"}

Tensor = torch.Tensor


class PeftExportError(ConversionError):
    """The adapter has no exact PEFT equivalent (it is then saved in torchtune format only)."""


@dataclass(frozen=True)
class _Target:
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


# ---------------------------------------------------------------------------------------------- families
class _Family:
    """Module-name mapping of a family whose LoRA modules map 1:1 through its converter's key table."""

    def __init__(
        self, table: KeyTable, cfg: ModelConfig, permute: bool, output: str = "lm_head", use_head_dim: bool = True
    ) -> None:
        self.table = table
        self.inverse = table.inverse()
        self.output = output
        self.heads: tuple[int, int, int] | None = attention_dims(cfg, use_head_dim) if permute else None

    def short_names(self, module: str) -> list[str]:
        """PEFT ``target_modules`` name(s) of a torchtune ``target_modules`` entry."""
        if module == "output":
            return [self.output]
        if module not in TARGET_MODULES_TO_PEFT:
            raise ValueError(f"Unknown target module {module}")
        return [TARGET_MODULES_TO_PEFT[module]]

    def _rope_heads(self, module: str) -> int | None:
        if self.heads is None:
            return None
        if module.endswith("attn.q_proj"):
            return self.heads[0]
        if module.endswith("attn.k_proj"):
            return self.heads[1]
        return None

    def target(self, module: str) -> _Target | None:
        """The HF module of a torchtune LoRA module (None when the family has no such module)."""
        if module.rpartition(".")[2] not in _LORA_LEAVES:
            return None
        found, hf = self.inverse.lookup(f"{module}.weight")
        if not found or hf is None or not hf.endswith(".weight"):
            return None
        return _Target(hf[: -len(".weight")], self._rope_heads(module))

    def parts_of(self, hf_module: str) -> tuple[str, ...]:
        """The torchtune module(s) behind an HF module, in row order (empty when unknown)."""
        found, tune = self.table.lookup(f"{hf_module}.weight")
        if not found or tune is None or not tune.endswith(".weight"):
            return ()
        module = tune[: -len(".weight")]
        return (module,) if module.rpartition(".")[2] in _LORA_LEAVES else ()

    def head_dim(self) -> int:
        assert self.heads is not None
        return self.heads[2]

    def module_pattern(self, hf_module: str) -> str:
        """A PEFT ``rank_pattern``/``target_modules`` regex matching exactly this module."""
        return re.escape(hf_module)

    def peft_name(self, hf_module: str) -> str:
        """The module's name in the PEFT weight keys (the HF checkpoint name, unless the model class
        names it differently at run time)."""
        return hf_module


_PHI_FUSED = {
    "attn.q_proj": ("self_attn.qkv_proj", 0),
    "attn.k_proj": ("self_attn.qkv_proj", 1),
    "attn.v_proj": ("self_attn.qkv_proj", 2),
    "mlp.w1": ("mlp.gate_up_proj", 0),
    "mlp.w3": ("mlp.gate_up_proj", 1),
}
_PHI_PARTS = {
    "self_attn.qkv_proj": ("attn.q_proj", "attn.k_proj", "attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.w1", "mlp.w3"),
}


class _PhiFamily(_Family):
    """PHI3_MINI / PHI4: q/k/v and w1/w3 LoRAs become block LoRAs of the fused HF modules."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(PHI3_TABLE, cfg, permute=False)
        n_heads, n_kv, head_dim = attention_dims(cfg)
        self.qkv_rows: tuple[int | None, ...] = (n_heads * head_dim, n_kv * head_dim, n_kv * head_dim)
        inter = cfg.get("intermediate_size")
        self.gate_up_rows: tuple[int | None, ...] = (inter, inter) if isinstance(inter, int) else (None, None)

    def short_names(self, module: str) -> list[str]:
        if module in ("q_proj", "k_proj", "v_proj"):
            return ["qkv_proj"]
        if module in ("w1", "w3"):
            return ["gate_up_proj"]
        return super().short_names(module)

    def target(self, module: str) -> _Target | None:
        head, _, rest = module.partition(".")
        layer, _, sub = rest.partition(".")
        if head == "layers" and layer.isdigit() and sub in _PHI_FUSED:
            fused, part = _PHI_FUSED[sub]
            parts = tuple(f"layers.{layer}.{p}" for p in _PHI_PARTS[fused])
            rows = self.qkv_rows if fused == "self_attn.qkv_proj" else self.gate_up_rows
            return _Target(f"model.layers.{layer}.{fused}", None, part, parts, rows)
        return super().target(module)

    def parts_of(self, hf_module: str) -> tuple[str, ...]:
        m = re.fullmatch(r"model\.layers\.(\d+)\.(self_attn\.qkv_proj|mlp\.gate_up_proj)", hf_module)
        if m:
            return tuple(f"layers.{m.group(1)}.{p}" for p in _PHI_PARTS[m.group(2)])
        return super().parts_of(hf_module)


class _VisionFamily(_Family):
    """LLAMA3_VISION: decoder layers renumbered around the cross-attention layers, self-attention q/k
    permuted, vision encoder and projector as named by the converter."""

    def __init__(self, cfg: ModelConfig) -> None:
        from ..convert.llama3_vision import _CROSS_LAYER, _SELF_LAYER, LLAMA3_VISION_TABLE, VisionDims

        super().__init__(LLAMA3_VISION_TABLE, cfg, permute=False)
        self.dims = VisionDims.from_config(cfg)
        self.heads = (self.dims.n_heads, self.dims.n_kv, self.dims.head_dim)
        self.self_layer, self.cross_layer = _SELF_LAYER, _CROSS_LAYER

    def target(self, module: str) -> _Target | None:
        if module.rpartition(".")[2] not in _LORA_LEAVES:
            return None
        m = re.fullmatch(r"decoder\.layers\.(\d+)\.(fusion_layer\.)?(.+)", module)
        if m:
            fusion = m.group(2) is not None
            found, sub = (self.cross_layer if fusion else self.self_layer).inverse().lookup(f"{m.group(3)}.weight")
            if not found or sub is None:
                return None
            try:
                n = self.dims.tune_to_hf_layer(int(m.group(1)), fusion)
            except ConversionError:
                return None
            heads = None if fusion else self._rope_heads(module)
            return _Target(f"language_model.model.layers.{n}.{sub[: -len('.weight')]}", heads)
        tgt = super().target(module)
        return None if tgt is None else _Target(tgt.hf)  # the vision encoder's q/k are not permuted

    _RUNTIME = (
        ("language_model.model.", "model.language_model."),
        ("vision_model.", "model.vision_model."),
        ("multi_modal_projector", "model.multi_modal_projector"),
        ("language_model.lm_head", "lm_head"),
    )

    def peft_name(self, hf_module: str) -> str:
        """transformers ≥ 4.52 names Mllama's modules ``model.language_model.layers...``,
        ``model.vision_model...``, ``model.multi_modal_projector`` and ``lm_head`` (the checkpoint keeps
        the old names); PEFT keys follow the module names, and PEFT 0.21 does not map all old ones."""
        for old, new in self._RUNTIME:
            if hf_module.startswith(old):
                return new + hf_module[len(old):]
        return hf_module

    @staticmethod
    def checkpoint_name(hf_module: str) -> str:
        """transformers 5 module names (``model.language_model.layers...``) → checkpoint names."""
        for new, old in (
            ("model.language_model.", "language_model.model."),
            ("model.vision_model.", "vision_model."),
            ("model.multi_modal_projector", "multi_modal_projector"),
        ):
            if hf_module.startswith(new):
                return old + hf_module[len(new):]
        return "language_model.lm_head" if hf_module == "lm_head" else hf_module

    def parts_of(self, hf_module: str) -> tuple[str, ...]:
        hf_module = self.checkpoint_name(hf_module)
        m = re.fullmatch(r"language_model\.model\.layers\.(\d+)\.(.+)", hf_module)
        if not m:
            return super().parts_of(hf_module)
        mt, fusion = self.dims.hf_to_tune_layer(int(m.group(1)))
        found, sub = (self.cross_layer if fusion else self.self_layer).lookup(f"{m.group(2)}.weight")
        if not found or sub is None:
            return ()
        module = f"decoder.layers.{mt}.{'fusion_layer.' if fusion else ''}{sub[: -len('.weight')]}"
        return (module,) if module.rpartition(".")[2] in _LORA_LEAVES else ()

    def module_pattern(self, hf_module: str) -> str:
        """Matches the module under the checkpoint's names and under transformers 5's."""
        for old, alt in (
            ("language_model.model.", r"(?:language_model\.model|model\.language_model)\."),
            ("vision_model.", r"(?:model\.)?vision_model\."),
            ("multi_modal_projector", r"(?:model\.)?multi_modal_projector"),
            ("language_model.lm_head", r"(?:language_model\.)?lm_head"),
        ):
            if hf_module.startswith(old):
                return alt + re.escape(hf_module[len(old):])
        return re.escape(hf_module)


#: families whose converter maps 1:1 through a key table; True: base q/k rows RoPE-permuted on load
_TABLE_FAMILIES = {
    ModelType.LLAMA2: True,
    ModelType.LLAMA3: True,
    ModelType.LLAMA3_2: True,
    ModelType.MISTRAL: True,
    ModelType.GEMMA: True,
    ModelType.GEMMA2: True,
    ModelType.REWARD: True,
    ModelType.QWEN2: False,
    ModelType.QWEN3: False,
}
_FAMILIES = set(_TABLE_FAMILIES) | {ModelType.PHI3_MINI, ModelType.PHI4, ModelType.LLAMA3_VISION}


def supports_peft(model_type: ModelType) -> bool:
    """Whether adapters of this family can be exported to PEFT (LLAMA4, CLIP_TEXT, T5_ENCODER cannot)."""
    return model_type in _FAMILIES


def _family(model_type: ModelType, cfg: ModelConfig) -> _Family:
    if model_type in _TABLE_FAMILIES:
        converter = get_converter(model_type)
        table = getattr(converter, "table", None)
        if not isinstance(table, KeyTable):
            raise PeftExportError(f"the ModelType.{model_type.name} converter exposes no key table")
        output = "score" if model_type is ModelType.REWARD else "lm_head"
        # the same head_dim rule as the converter that permuted the base weights
        use_head_dim = bool(getattr(converter, "use_head_dim", True))
        return _Family(table, cfg, _TABLE_FAMILIES[model_type], output, use_head_dim)
    if model_type in (ModelType.PHI3_MINI, ModelType.PHI4):
        return _PhiFamily(cfg)
    if model_type is ModelType.LLAMA3_VISION:
        return _VisionFamily(cfg)
    raise PeftExportError(f"ModelType.{model_type.name} adapters have no PEFT equivalent")


# ---------------------------------------------------------------------------------------------- tune → PEFT
def _split_tune_key(key: str) -> tuple[str, str]:
    for suffix in (_A, _B, _MAG):
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    raise PeftExportError(f'adapter key "{key}" is not a LoRA/DoRA parameter (lora_a, lora_b, magnitude)')


def _group(adapter: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    modules: dict[str, dict[str, Tensor]] = {}
    for key, t in adapter.items():
        if not isinstance(t, Tensor):
            raise ConversionError(f'adapter value for "{key}" is a {type(t).__name__}, not a tensor')
        module, suffix = _split_tune_key(key)
        modules.setdefault(module, {})[suffix] = t
    for module, parts in modules.items():
        if _A not in parts or _B not in parts:
            raise PeftExportError(f'adapter module "{module}" needs both lora_a.weight and lora_b.weight')
        a, b = parts[_A], parts[_B]
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
            raise PeftExportError(
                f'adapter module "{module}": lora_a {tuple(a.shape)} and lora_b {tuple(b.shape)} '
                "are not [r, in], [out, r]"
            )
        if _MAG in parts and tuple(parts[_MAG].shape) != (b.shape[0],):
            raise PeftExportError(
                f'adapter module "{module}": magnitude {tuple(parts[_MAG].shape)} is not [{b.shape[0]}]'
            )
    return modules


def _permuted(t: Tensor, tgt: _Target, fam: _Family, key: str, to_hf: bool) -> Tensor:
    if tgt.heads is None:
        return t
    fn = permute_to_hf if to_hf else permute_to_tune
    return fn(t, tgt.heads, fam.head_dim(), key)


def tune_to_peft_adapter(adapter: Mapping[str, Tensor], model_type: ModelType, cfg: ModelConfig) -> PeftAdapter:
    """The PEFT form of a torchtune adapter (new tensors; ``adapter`` is not modified).

    Raises ``PeftExportError`` when PEFT cannot represent the adapter exactly.
    """
    fam = _family(model_type, cfg)
    modules = _group(adapter)
    out = PeftAdapter({})
    fused: dict[str, list[tuple[_Target, str, dict[str, Tensor]]]] = {}
    for module, parts in modules.items():
        tgt = fam.target(module)
        if tgt is None:
            raise PeftExportError(f'adapter module "{module}" has no PEFT equivalent for ModelType.{model_type.name}')
        if tgt.parts:
            fused.setdefault(tgt.hf, []).append((tgt, module, parts))
            continue
        prefix = f"{PEFT_PREFIX}{fam.peft_name(tgt.hf)}."
        out.weights[prefix + _TUNE_TO_PEFT_SUFFIX[_A]] = parts[_A]
        out.weights[prefix + _TUNE_TO_PEFT_SUFFIX[_B]] = _permuted(parts[_B], tgt, fam, module + "." + _B, True)
        if _MAG in parts:
            out.weights[prefix + _TUNE_TO_PEFT_SUFFIX[_MAG]] = _permuted(
                parts[_MAG], tgt, fam, module + "." + _MAG, True
            )
            out.use_dora = True
        out.modules[tgt.hf] = (parts[_A].shape[0], 1)
    for hf, members in fused.items():
        _fuse(hf, sorted(members, key=lambda m: m[0].part), out)
    if isinstance(fam, _VisionFamily) and out.modules:
        out.target_regex = _modules_regex(out.modules, fam)
    return out


def _fuse(hf: str, members: list[tuple[_Target, str, dict[str, Tensor]]], out: PeftAdapter) -> None:
    """One block LoRA on a fused HF module from the LoRAs of some of its parts."""
    tgt0 = members[0][0]
    ranks = {p[_A].shape[0] for _, _, p in members}
    a_dtypes = {p[_A].dtype for _, _, p in members}
    b_dtypes = {p[_B].dtype for _, _, p in members}
    names = [m for _, m, _ in members]
    if len(ranks) != 1 or len(a_dtypes) != 1 or len(b_dtypes) != 1:
        raise PeftExportError(f"the LoRAs of {names} (fused into {hf}) differ in rank or dtype")
    if len({p[_A].shape[1] for _, _, p in members}) != 1:
        raise PeftExportError(f"the LoRAs of {names} (fused into {hf}) differ in input size")
    with_mag = [m for _, m, p in members if _MAG in p]
    if with_mag and (len(with_mag) != len(tgt0.parts)):
        raise PeftExportError(
            f"DoRA on {with_mag} cannot be expressed on the fused {hf}: PEFT needs a magnitude for every "
            f"row of it, i.e. DoRA on all of {list(tgt0.parts)}"
        )
    present = {t.part: p for t, _, p in members}
    seen_rows = {p[_B].shape[0] for p in present.values()}
    rows: list[int] = []
    for i, expected in enumerate(tgt0.rows):
        if i in present:
            got = present[i][_B].shape[0]
            if expected is not None and got != expected:
                raise PeftExportError(
                    f'"{tgt0.parts[i]}.lora_b.weight" has {got} rows, but its part of {hf} has {expected} '
                    "(check num_attention_heads / num_key_value_heads / head_dim / intermediate_size)"
                )
            rows.append(got)
        elif expected is not None:
            rows.append(expected)
        elif len(seen_rows) == 1:
            rows.append(next(iter(seen_rows)))
        else:
            raise PeftExportError(f"cannot tell the row count of {tgt0.parts[i]} inside {hf}")
    r = next(iter(ranks))
    k = len(members)
    first = members[0][2]
    a = torch.cat([p[_A] for _, _, p in members], dim=0)
    b = torch.zeros(sum(rows), k * r, dtype=first[_B].dtype)
    offsets = [sum(rows[:i]) for i in range(len(rows))]
    for slot, (t, _, p) in enumerate(members):
        b[offsets[t.part] : offsets[t.part] + rows[t.part], slot * r : (slot + 1) * r] = p[_B]
    prefix = f"{PEFT_PREFIX}{hf}."
    out.weights[prefix + _TUNE_TO_PEFT_SUFFIX[_A]] = a
    out.weights[prefix + _TUNE_TO_PEFT_SUFFIX[_B]] = b
    if with_mag:
        out.weights[prefix + _TUNE_TO_PEFT_SUFFIX[_MAG]] = torch.cat([p[_MAG] for _, _, p in members], dim=0)
        out.use_dora = True
    out.modules[hf] = (k * r, k)
    out.fused[hf] = [".".join(m.split(".")[-2:]) for _, m, _ in members]


def _modules_regex(modules: Iterable[str], fam: _Family) -> str:
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
    fam = _family(model_type, cfg if cfg is not None else ModelConfig(_DUMMY_DIMS))
    raw = out["target_modules"]
    if isinstance(raw, str):
        raw = [raw]
    targets: list[str] = []
    for m in raw:
        for name in fam.short_names(m):
            if name not in targets:
                targets.append(name)
    if isinstance(fam, _VisionFamily):
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


def _patterns(out: dict[str, Any], export: PeftAdapter, fam: _Family) -> None:
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


# ---------------------------------------------------------------------------------------------- PEFT → tune
def _split_peft_key(key: str) -> tuple[str, str]:
    body = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
    for suffix in _PEFT_TO_TUNE_SUFFIX:
        if body.endswith("." + suffix):
            return body[: -len(suffix) - 1], suffix
    raise ConversionError(
        f'PEFT adapter key "{key}" is not a LoRA/DoRA parameter (lora_A, lora_B, lora_magnitude_vector)'
    )


def peft_to_tune_adapter_weights(
    weights: Mapping[str, Tensor],
    model_type: ModelType,
    cfg: ModelConfig,
    metadata: Mapping[str, str] | None = None,
) -> dict[str, Tensor]:
    """The inverse of ``tune_to_peft_adapter``: a PEFT adapter (as written by shardwise or by PEFT)
    back in torchtune keys, for resuming. ``metadata`` is the safetensors metadata of the file (it
    records the layout of fused modules). ``ConversionError`` when a tensor has no torchtune form."""
    fam = _family(model_type, cfg)
    fused_meta: dict[str, list[str]] = {}
    if metadata and FUSED_METADATA_KEY in metadata:
        try:
            fused_meta = json.loads(metadata[FUSED_METADATA_KEY])
        except json.JSONDecodeError as e:
            raise ConversionError(f"adapter metadata {FUSED_METADATA_KEY!r} is not valid JSON ({e})") from e
    modules: dict[str, dict[str, Tensor]] = {}
    for key, t in weights.items():
        hf, suffix = _split_peft_key(key)
        modules.setdefault(hf, {})[_PEFT_TO_TUNE_SUFFIX[suffix]] = t
    out: dict[str, Tensor] = {}
    for hf, parts in modules.items():
        tune_modules = fam.parts_of(hf)
        if not tune_modules:
            raise ConversionError(
                f'PEFT adapter module "{hf}" has no torchtune equivalent for ModelType.{model_type.name}'
            )
        if _A not in parts or _B not in parts:
            raise ConversionError(f'PEFT adapter module "{hf}" needs both lora_A and lora_B')
        if len(tune_modules) == 1:
            module = tune_modules[0]
            tgt = fam.target(module)
            assert tgt is not None
            out[f"{module}.{_A}"] = parts[_A]
            out[f"{module}.{_B}"] = _permuted(parts[_B], tgt, fam, f"{module}.{_B}", False)
            if _MAG in parts:
                out[f"{module}.{_MAG}"] = _permuted(parts[_MAG], tgt, fam, f"{module}.{_MAG}", False)
            continue
        out.update(_unfuse(hf, tune_modules, parts, fused_meta.get(hf), fam))
    return out


def _unfuse(
    hf: str, tune_modules: tuple[str, ...], parts: dict[str, Tensor], present_names: list[str] | None, fam: _Family
) -> dict[str, Tensor]:
    tgt0 = fam.target(tune_modules[0])
    assert tgt0 is not None
    a, b = parts[_A], parts[_B]
    if present_names is None:
        present = list(range(len(tune_modules)))
    else:
        suffixes = [".".join(m.split(".")[-2:]) for m in tune_modules]
        unknown = [n for n in present_names if n not in suffixes]
        if unknown:
            raise ConversionError(f"{hf}: adapter metadata names unknown parts {unknown}")
        present = sorted(suffixes.index(n) for n in present_names)
    k = len(present)
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] % k or b.shape[1] != a.shape[0]:
        raise ConversionError(
            f"{hf}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not split into {k} LoRAs; resume "
            "from the torchtune adapter instead (adapter_checkpoint='epoch_N/adapter_model.pt')"
        )
    r = a.shape[0] // k
    if all(x is not None for x in tgt0.rows):
        rows = [int(x) for x in tgt0.rows if x is not None]
    elif any(x is not None for x in tgt0.rows) or b.shape[0] % len(tgt0.rows):
        raise ConversionError(f"{hf}: cannot tell the row split of lora_B {tuple(b.shape)}")
    else:  # equal parts (gate_up_proj without intermediate_size in config.json)
        rows = [b.shape[0] // len(tgt0.rows)] * len(tgt0.rows)
    if sum(rows) != b.shape[0]:
        raise ConversionError(f"{hf}: lora_B has {b.shape[0]} rows, expected {sum(rows)} (check config.json)")
    offsets = [sum(rows[:i]) for i in range(len(rows))]
    out: dict[str, Tensor] = {}
    check = b.clone()
    for slot, i in enumerate(present):
        lo, hi = offsets[i], offsets[i] + rows[i]
        module = tune_modules[i]
        out[f"{module}.{_A}"] = a[slot * r : (slot + 1) * r].clone()
        out[f"{module}.{_B}"] = b[lo:hi, slot * r : (slot + 1) * r].clone()
        check[lo:hi, slot * r : (slot + 1) * r] = 0
    if torch.count_nonzero(check):
        raise ConversionError(
            f"{hf}: lora_B is not block-diagonal over {[tune_modules[i] for i in present]}, so it is not a set "
            "of torchtune LoRAs; resume from the torchtune adapter instead "
            "(adapter_checkpoint='epoch_N/adapter_model.pt')"
        )
    if _MAG in parts:
        if k != len(tune_modules):
            raise ConversionError(f"{hf}: a DoRA magnitude on a partly adapted fused module has no torchtune form")
        mag = parts[_MAG]
        for i, module in enumerate(tune_modules):
            out[f"{module}.{_MAG}"] = mag[offsets[i] : offsets[i] + rows[i]].clone()
    return out
