"""What a load reads besides the shards: the original index (reused byte for byte on save when it
still describes the files) and an adapter file in torchtune or PEFT form."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .. import adapters as peft
from ..config import ModelConfig
from ..constants import ADAPTER_MODEL_FNAME, ModelType
from ..errors import CheckpointError, ConversionError
from ..format.layout import index_name, read_index
from ..format.shards import SourceFile
from .recipe_state import load_recipe_state

__all__ = ["load_adapter", "matching_index"]


def matching_index(sources: Sequence[SourceFile]) -> tuple[Path, bytes, dict[str, Any]] | None:
    """The index next to ``sources`` when it lists exactly these files (else None)."""
    folders = {s.path.parent for s in sources}
    if len(folders) != 1:
        return None
    kinds = {s.is_safetensors for s in sources}
    if len(kinds) != 1:
        return None
    found = read_index(next(iter(folders)), index_name(kinds.pop()))  # the loaded format's index
    if found is None:
        return None
    files = set(found[2]["weight_map"].values())
    return found if files == {s.name for s in sources} else None



def load_adapter(path: Path, model_type: ModelType, config: ModelConfig) -> dict[str, torch.Tensor]:
    """A torchtune ``adapter_model.pt``, or a PEFT ``adapter_model.safetensors``/``.bin`` (written by
    shardwise or by PEFT) converted back to torchtune keys."""
    metadata: dict[str, str] | None = None
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                metadata = f.metadata()
                state: dict[str, Any] = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"Unable to load checkpoint from {path}. ({e})") from e
    else:
        state = load_recipe_state(path)
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{path}: adapter value for {k!r} is a {type(v).__name__}, not a tensor")
    if not any(k.startswith(peft.PEFT_PREFIX) for k in state):
        return state
    try:
        return peft.peft_to_tune_adapter_weights(state, model_type, config, metadata)
    except (ConversionError, peft.PeftExportError) as e:
        raise ConversionError(
            f"{path}: this PEFT adapter cannot be converted back to torchtune keys ({e}). Pass "
            f"adapter_checkpoint='<epoch_N>/{ADAPTER_MODEL_FNAME}.pt' (relative to output_dir), the "
            "torchtune-format adapter saved next to it"
        ) from e

