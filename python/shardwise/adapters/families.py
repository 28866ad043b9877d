"""Per-family module names: where each torchtune LoRA module lives in the HF model (its converter's key
table), which q/k rows are RoPE-permuted, and the fused modules (Phi's ``qkv_proj`` / ``gate_up_proj``)
and renumbered layers (Llama-3.2-Vision) that need more than a table."""

from __future__ import annotations

import re

from ..config import ModelConfig
from ..constants import ModelType
from ..convert import get_converter
from ..convert.base import KeyTable
from ..convert.llama import attention_dims
from ..convert.phi3 import PHI3_TABLE
from ..errors import ConversionError
from .naming import LORA_LEAVES, TARGET_MODULES_TO_PEFT, PeftExportError, Target

__all__ = ["TABLE_FAMILIES", "Family", "PhiFamily", "VisionFamily", "family_for", "supports_peft"]


class Family:
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

    def target(self, module: str) -> Target | None:
        """The HF module of a torchtune LoRA module (None when the family has no such module)."""
        if module.rpartition(".")[2] not in LORA_LEAVES:
            return None
        found, hf = self.inverse.lookup(f"{module}.weight")
        if not found or hf is None or not hf.endswith(".weight"):
            return None
        return Target(hf[: -len(".weight")], self._rope_heads(module))

    def parts_of(self, hf_module: str) -> tuple[str, ...]:
        """The torchtune module(s) behind an HF module, in row order (empty when unknown)."""
        found, tune = self.table.lookup(f"{hf_module}.weight")
        if not found or tune is None or not tune.endswith(".weight"):
            return ()
        module = tune[: -len(".weight")]
        return (module,) if module.rpartition(".")[2] in LORA_LEAVES else ()

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


class PhiFamily(Family):
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

    def target(self, module: str) -> Target | None:
        head, _, rest = module.partition(".")
        layer, _, sub = rest.partition(".")
        if head == "layers" and layer.isdigit() and sub in _PHI_FUSED:
            fused, part = _PHI_FUSED[sub]
            parts = tuple(f"layers.{layer}.{p}" for p in _PHI_PARTS[fused])
            rows = self.qkv_rows if fused == "self_attn.qkv_proj" else self.gate_up_rows
            return Target(f"model.layers.{layer}.{fused}", None, part, parts, rows)
        return super().target(module)

    def parts_of(self, hf_module: str) -> tuple[str, ...]:
        m = re.fullmatch(r"model\.layers\.(\d+)\.(self_attn\.qkv_proj|mlp\.gate_up_proj)", hf_module)
        if m:
            return tuple(f"layers.{m.group(1)}.{p}" for p in _PHI_PARTS[m.group(2)])
        return super().parts_of(hf_module)


class VisionFamily(Family):
    """LLAMA3_VISION: decoder layers renumbered around the cross-attention layers, self-attention q/k
    permuted, vision encoder and projector as named by the converter."""

    def __init__(self, cfg: ModelConfig) -> None:
        from ..convert.llama3_vision import CROSS_LAYER_TABLE, LLAMA3_VISION_TABLE, SELF_LAYER_TABLE, VisionDims

        super().__init__(LLAMA3_VISION_TABLE, cfg, permute=False)
        self.dims = VisionDims.from_config(cfg)
        self.heads = (self.dims.n_heads, self.dims.n_kv, self.dims.head_dim)
        self.self_layer, self.cross_layer = SELF_LAYER_TABLE, CROSS_LAYER_TABLE

    def target(self, module: str) -> Target | None:
        if module.rpartition(".")[2] not in LORA_LEAVES:
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
            return Target(f"language_model.model.layers.{n}.{sub[: -len('.weight')]}", heads)
        tgt = super().target(module)
        return None if tgt is None else Target(tgt.hf)  # the vision encoder's q/k are not permuted

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
        return (module,) if module.rpartition(".")[2] in LORA_LEAVES else ()

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
TABLE_FAMILIES = {
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
_FAMILIES = set(TABLE_FAMILIES) | {ModelType.PHI3_MINI, ModelType.PHI4, ModelType.LLAMA3_VISION}


def supports_peft(model_type: ModelType) -> bool:
    """Whether adapters of this family can be exported to PEFT (LLAMA4, CLIP_TEXT, T5_ENCODER cannot)."""
    return model_type in _FAMILIES


def family_for(model_type: ModelType, cfg: ModelConfig) -> Family:
    """The module-name mapping of ``model_type``; ``PeftExportError`` when it has no PEFT equivalent."""
    if model_type in TABLE_FAMILIES:
        converter = get_converter(model_type)
        table = getattr(converter, "table", None)
        if not isinstance(table, KeyTable):
            raise PeftExportError(f"the ModelType.{model_type.name} converter exposes no key table")
        output = "score" if model_type is ModelType.REWARD else "lm_head"
        # the same head_dim rule as the converter that permuted the base weights
        use_head_dim = bool(getattr(converter, "use_head_dim", True))
        return Family(table, cfg, TABLE_FAMILIES[model_type], output, use_head_dim)
    if model_type in (ModelType.PHI3_MINI, ModelType.PHI4):
        return PhiFamily(cfg)
    if model_type is ModelType.LLAMA3_VISION:
        return VisionFamily(cfg)
    raise PeftExportError(f"ModelType.{model_type.name} adapters have no PEFT equivalent")
