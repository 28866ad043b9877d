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
    "pick_model_type",
    "SAME_CONVERSION",
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


#: members whose converters are one and the same (tests/test_model_types.py checks it against
#: ``convert``): whichever of a group is picked, a checkpoint converts to the same bytes
SAME_CONVERSION: tuple[frozenset[ModelType], ...] = (
    frozenset({M.LLAMA2, M.LLAMA3, M.LLAMA3_2}),
    frozenset({M.PHI3_MINI, M.PHI4}),
)


def _rope_type(cfg: Mapping[str, Any]) -> str | None:
    rope = cfg.get("rope_scaling")
    if not isinstance(rope, Mapping):
        return None
    kind = rope.get("rope_type", rope.get("type"))
    return str(kind) if kind is not None else None


def _by_hints(cfg: Mapping[str, Any], fits: tuple[ModelType, ...]) -> tuple[ModelType, str]:
    """The member the config's hints point to, and the hints, for a group of ``SAME_CONVERSION``."""
    vocab = cfg.get("vocab_size")
    if M.PHI4 in fits or M.PHI3_MINI in fits:
        if vocab == 100352 and M.PHI4 in fits:
            return M.PHI4, f"vocab_size {vocab}"
        return (M.PHI3_MINI if M.PHI3_MINI in fits else fits[0]), f"vocab_size {vocab}"
    rope, tied = _rope_type(cfg), bool(cfg.get("tie_word_embeddings", False))
    if rope == "llama3":
        wanted = M.LLAMA3_2 if tied else M.LLAMA3
        why = f"rope_scaling {rope}, {'tied' if tied else 'untied'} embeddings"
    elif isinstance(vocab, int) and vocab >= 128000:
        wanted, why = M.LLAMA3, f"vocab_size {vocab}"
    else:
        wanted, why = M.LLAMA2, f"vocab_size {vocab}, no llama3 rope scaling"
    return (wanted if wanted in fits else fits[0]), why


def pick_model_type(cfg: Mapping[str, Any], source: str = "config.json") -> tuple[ModelType, str | None]:
    """The member for ``cfg`` when none was given: the only one that fits; or, when several fit that
    convert identically (LLAMA2/LLAMA3/LLAMA3_2, PHI3_MINI/PHI4), the one the config's hints point to,
    with a line saying which and why. ``ConfigError`` naming the choices when the choice would change
    the bytes written (e.g. a ``llama`` config without architectures: also REWARD)."""
    fits = candidates(cfg)
    if fits is None or len(fits) == 1:
        return infer_model_type(cfg, source), None
    if not any(set(fits) <= group for group in SAME_CONVERSION):
        return infer_model_type(cfg, source), None  # raises, naming the choices
    chosen, why = _by_hints(cfg, fits)
    others = ", ".join(m.name for m in fits if m is not chosen)
    return chosen, f"model type {chosen.name} ({source}: {why}; {others} would convert identically)"

