"""Recipe state (optimizer, seed, epochs, dataloader, rng ...): saved atomically, loaded with
``weights_only=True`` so that nothing in a checkpoint is ever executed."""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..constants import NON_RECIPE_KEYS
from ..errors import CheckpointError, CheckpointIOError

__all__ = [
    "SHARDED_DIR",
    "SHARDED_KEYS",
    "load_recipe_state",
    "recipe_keys",
    "recipe_state_folder",
]


#: recorded inside the recipe state by shardwise: the checkpoint folder (``epoch_N``) it belongs to, so
#: that a resume pairs weights and optimizer state from the same save; removed again on load
CHECKPOINT_FOLDER_KEY = "_shardwise_checkpoint_folder"

#: recorded in ``recipe_state.pt`` by a collective save: the recipe keys saved sharded with DCP, and
#: the folder (relative to ``output_dir``) that holds them
SHARDED_KEYS = "_shardwise_dcp_keys"
SHARDED_DIR = "_shardwise_dcp_dir"


def recipe_keys(state_dict: Mapping[str, Any], folder: str | None = None) -> dict[str, Any]:
    """Everything in a checkpoint dict except the model, adapter and adapter config (and, when given,
    the name of the checkpoint folder saved with it)."""
    state = {k: v for k, v in state_dict.items() if k not in NON_RECIPE_KEYS}
    if folder is not None:
        state[CHECKPOINT_FOLDER_KEY] = folder
    return state


def load_recipe_state(path: Path) -> dict[str, Any]:
    """Load a recipe state written by shardwise or torchtune (``weights_only=True``)."""
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise CheckpointIOError(2, "recipe state file not found", str(path)) from e
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError) as e:
        raise CheckpointError(f"{path}: unable to load the recipe state ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: the recipe state must be a dict, found {type(state).__name__}")
    state.pop(CHECKPOINT_FOLDER_KEY, None)
    return state


def recipe_state_folder(path: Path) -> str | None:
    """The checkpoint folder a shardwise recipe state was saved with (None for torchtune's files or
    anything unreadable); a memory-mapped peek, tensors are not read."""
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - a peek only; load_recipe_state reports real problems
        return None
    folder = state.get(CHECKPOINT_FOLDER_KEY) if isinstance(state, dict) else None
    return folder if isinstance(folder, str) and "/" not in folder and not folder.startswith(".") else None
