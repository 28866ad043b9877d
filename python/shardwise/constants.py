"""State-dict keys, file names and ``ModelType``: the same names and values as torchtune 0.6.1."""

from __future__ import annotations

from enum import Enum

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_CONFIG_FNAME",
    "ADAPTER_KEY",
    "ADAPTER_MODEL_FNAME",
    "DATALOADER_KEY",
    "EPOCHS_KEY",
    "MAX_STEPS_KEY",
    "MODEL_KEY",
    "OPT_KEY",
    "RECIPE_STATE_DIRNAME",
    "REPO_ID_FNAME",
    "RNG_KEY",
    "SAFETENSOR_INDEX_FNAME",
    "SEED_KEY",
    "SHARD_FNAME",
    "STEPS_KEY",
    "SUFFIXES_TO_NOT_COPY",
    "TORCH_INDEX_FNAME",
    "TOTAL_EPOCHS_KEY",
    "VAL_DATALOADER_KEY",
    "ModelType",
]

# state-dict keys
ADAPTER_CONFIG = "adapter_config"
ADAPTER_KEY = "adapter"
EPOCHS_KEY = "epochs_run"
MAX_STEPS_KEY = "max_steps_per_epoch"
MODEL_KEY = "model"
OPT_KEY = "optimizer"
SEED_KEY = "seed"
TOTAL_EPOCHS_KEY = "total_epochs"
STEPS_KEY = "steps_run"
RNG_KEY = "rng_state"
DATALOADER_KEY = "dataloader"
VAL_DATALOADER_KEY = "val_dataloader"

# file names
ADAPTER_CONFIG_FNAME = "adapter_config"
ADAPTER_MODEL_FNAME = "adapter_model"
SAFETENSOR_INDEX_FNAME = "model.safetensors.index.json"
TORCH_INDEX_FNAME = "pytorch_model.bin.index.json"
SHARD_FNAME = "model-{cpt_idx}-of-{num_shards}"
RECIPE_STATE_DIRNAME = "recipe_state"
REPO_ID_FNAME = "original_repo_id"

SUFFIXES_TO_NOT_COPY = [
    ".pt",
    ".pth",
    ".bin",
    ".safetensors",
    SAFETENSOR_INDEX_FNAME,
    TORCH_INDEX_FNAME,
    ADAPTER_CONFIG_FNAME,
    ADAPTER_MODEL_FNAME,
]

# keys of the state dict that are not recipe state
NON_RECIPE_KEYS = (MODEL_KEY, ADAPTER_KEY, ADAPTER_CONFIG)


class ModelType(Enum):
    """Model families; looked up by member *name* (``ModelType["LLAMA3"]``), as torchtune does."""

    GEMMA = "gemma"
    GEMMA2 = "gemma2"
    LLAMA2 = "llama2"
    LLAMA3 = "llama3"
    LLAMA3_2 = "llama3_2"
    LLAMA3_VISION = "llama3_vision"
    MISTRAL = "mistral"
    PHI3_MINI = "phi3_mini"
    PHI4 = "phi4"
    REWARD = "reward"
    QWEN2 = "qwen2"
    QWEN3 = "qwen3"
    CLIP_TEXT = "clip_text"
    T5_ENCODER = "t5_encoder"
    LLAMA4 = "llama4"
