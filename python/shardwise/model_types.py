"""Which ``ModelType`` a ``config.json`` describes: a table from HF architectures and ``model_type`` to
the members that can convert it. The checkpointer warns when its ``model_type`` contradicts the config
(e.g. ``QWEN2`` on a ``llama`` config: the q/k permutation would be skipped and the weights silently
wrong); the CLI refuses then, and infers ``--model-type`` from the config when it is omitted."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .constants import ModelType
from .errors import ConfigError

__all__ = [
    "ARCHITECTURES",
    "HF_MODEL_TYPES",
    "UnknownModelTypeError",
    "candidates",
    "infer_model_type",
    "model_type_mismatch",
    "parse_model_type",
]



class UnknownModelTypeError(ConfigError, KeyError):
    """``model_type`` names no ``ModelType`` member (a ``KeyError`` as in torchtune, and a ``ValueError``)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def parse_model_type(value: str | ModelType) -> ModelType:
    """``"LLAMA3"``, ``"llama3"`` or ``ModelType.LLAMA3`` → the member; anything else is an
    ``UnknownModelTypeError`` listing the members."""
    if isinstance(value, ModelType):
        return value
    try:
        return ModelType[value]
    except KeyError:
        for m in ModelType:
            if str(value).lower() in (m.value, m.name.lower()):
                return m
    names = ", ".join(m.name for m in ModelType)
    raise UnknownModelTypeError(f"unknown model_type {value!r}; expected one of: {names}")


M = ModelType
_LLAMA = (M.LLAMA2, M.LLAMA3, M.LLAMA3_2)

#: HF architecture (``config.json`` ``architectures``) -> the members whose converter fits it
ARCHITECTURES: dict[str, tuple[ModelType, ...]] = {
    "LlamaForCausalLM": _LLAMA,
    "LlamaForSequenceClassification": (M.REWARD,),
    "MistralForCausalLM": (M.MISTRAL,),
    "MistralForSequenceClassification": (M.REWARD,),
    "GemmaForCausalLM": (M.GEMMA,),
    "Gemma2ForCausalLM": (M.GEMMA2,),
    "Phi3ForCausalLM": (M.PHI3_MINI, M.PHI4),
    "Qwen2ForCausalLM": (M.QWEN2,),
    "Qwen3ForCausalLM": (M.QWEN3,),
    "MllamaForConditionalGeneration": (M.LLAMA3_VISION,),
    "CLIPModel": (M.CLIP_TEXT,),
    "CLIPTextModel": (M.CLIP_TEXT,),
    "CLIPTextModelWithProjection": (M.CLIP_TEXT,),
    "T5EncoderModel": (M.T5_ENCODER,),
    "T5ForConditionalGeneration": (M.T5_ENCODER,),
    "Llama4ForConditionalGeneration": (M.LLAMA4,),
}

#: HF ``model_type`` -> members, used when no architecture is known
HF_MODEL_TYPES: dict[str, tuple[ModelType, ...]] = {
    "llama": (*_LLAMA, M.REWARD),
    "mistral": (M.MISTRAL, M.REWARD),
    "gemma": (M.GEMMA,),
    "gemma2": (M.GEMMA2,),
    "phi3": (M.PHI3_MINI, M.PHI4),
    "qwen2": (M.QWEN2,),
    "qwen3": (M.QWEN3,),
    "mllama": (M.LLAMA3_VISION,),
    "clip": (M.CLIP_TEXT,),
    "clip_text_model": (M.CLIP_TEXT,),
    "t5": (M.T5_ENCODER,),
    "llama4": (M.LLAMA4,),
}


def _describe(cfg: Mapping[str, Any]) -> str:
    parts = []
    if cfg.get("model_type") is not None:
        parts.append(f"model_type {cfg.get('model_type')!r}")
    if cfg.get("architectures"):
        parts.append(f"architectures {list(cfg.get('architectures') or [])}")
    return ", ".join(parts) or "no model_type or architectures"


def candidates(cfg: Mapping[str, Any]) -> tuple[ModelType, ...] | None:
    """The members that fit the config (architectures first, else ``model_type``); None when the
    config names nothing this table knows (a custom model: nothing to check)."""
    archs = cfg.get("architectures")
    found: list[ModelType] = []
    if isinstance(archs, list):
        for a in archs:
            for m in ARCHITECTURES.get(str(a), ()):
                if m not in found:
                    found.append(m)
    if not found:
        found = list(HF_MODEL_TYPES.get(str(cfg.get("model_type")), ()))
    return tuple(found) or None


def model_type_mismatch(model_type: ModelType, cfg: Mapping[str, Any], source: str = "config.json") -> str | None:
    """A sentence naming both sides when ``model_type`` does not fit the config, else None."""
    fits = candidates(cfg)
    if fits is None or model_type in fits:
        return None
    names = ", ".join(m.name for m in fits)
    return (
        f"model_type {model_type.name} contradicts {source} ({_describe(cfg)}, which is {names}): the "
        "conversion would follow the wrong family's rules (e.g. a missing q/k RoPE permutation), so the "
        "weights would be silently wrong"
    )


def infer_model_type(cfg: Mapping[str, Any], source: str = "config.json") -> ModelType:
    """The one member the config describes; ``ConfigError`` naming the choices when it fits several
    (LLAMA2/LLAMA3/LLAMA3_2, PHI3_MINI/PHI4, ...) or none."""
    fits = candidates(cfg)
    if fits is None:
        raise ConfigError(f"{source}: cannot tell the model type from {_describe(cfg)}; pass --model-type")
    if len(fits) > 1:
        names = ", ".join(m.name for m in fits)
        raise ConfigError(f"{source}: {_describe(cfg)} fits several model types ({names}); pass --model-type")
    return fits[0]
