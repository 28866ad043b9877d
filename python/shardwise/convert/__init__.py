"""Model-family converters, one module per family, registered by ``ModelType``. No I/O here."""

from __future__ import annotations

from collections.abc import Callable

from ..constants import ModelType
from .base import Converter, KeyTable, LoadResult, Op, materialize, permute_to_hf, permute_to_tune
from .llama import LlamaConverter

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
