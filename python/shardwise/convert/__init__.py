"""Model-family converters, one module per family, registered by ``ModelType``. No I/O here."""

from __future__ import annotations

from collections.abc import Callable

from ..constants import ModelType
from .base import Converter, KeyTable, LoadResult, Op, materialize, permute_to_hf, permute_to_tune
from .clip import ClipTextConverter
from .gemma2 import Gemma2Converter
from .llama import LlamaConverter
from .llama3_vision import Llama3VisionConverter
from .llama4 import Llama4Converter
from .phi3 import Phi3Converter
from .qwen2 import Qwen2Converter
from .qwen3 import Qwen3Converter
from .reward import RewardConverter
from .t5 import T5EncoderConverter

__all__ = [
    "Converter",
    "KeyTable",
    "LoadResult",
    "Op",
    "get_converter",
    "materialize",
    "permute_to_hf",
    "permute_to_tune",
    "register",
]

_REGISTRY: dict[ModelType, Callable[[], Converter]] = {
    ModelType.LLAMA2: LlamaConverter,
    ModelType.LLAMA3: LlamaConverter,
    ModelType.LLAMA3_2: LlamaConverter,
    ModelType.MISTRAL: LlamaConverter,
    ModelType.GEMMA: LlamaConverter,
    ModelType.GEMMA2: Gemma2Converter,
    ModelType.PHI3_MINI: Phi3Converter,
    ModelType.PHI4: Phi3Converter,
    ModelType.QWEN2: Qwen2Converter,
    ModelType.QWEN3: Qwen3Converter,
    ModelType.LLAMA3_VISION: Llama3VisionConverter,
    ModelType.CLIP_TEXT: ClipTextConverter,
    ModelType.T5_ENCODER: T5EncoderConverter,
    ModelType.REWARD: RewardConverter,
    ModelType.LLAMA4: Llama4Converter,
}


def register(model_type: ModelType, factory: Callable[[], Converter]) -> None:
    """Register (or replace) the converter factory of a model type."""
    _REGISTRY[model_type] = factory


def get_converter(model_type: ModelType) -> Converter:
    """The converter of ``model_type``; ``NotImplementedError`` naming the member if there is none."""
    try:
        factory = _REGISTRY[model_type]
    except KeyError:
        raise NotImplementedError(
            f"ModelType.{model_type.name} is not supported by this version of shardwise yet"
        ) from None
    return factory()
