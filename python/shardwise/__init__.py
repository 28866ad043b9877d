"""shardwise: a fast, exact, drop-in ``FullModelHFCheckpointer`` for Hugging Face checkpoints.

Same constructor and state-dict contract as torchtune 0.6.1's checkpointer; unchanged weights are
written back byte for byte; the bulk I/O runs in a Rust core (``shardwise._core``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .constants import (
    ADAPTER_CONFIG,
    ADAPTER_KEY,
    DATALOADER_KEY,
    EPOCHS_KEY,
    MAX_STEPS_KEY,
    MODEL_KEY,
    OPT_KEY,
    RNG_KEY,
    SEED_KEY,
    STEPS_KEY,
    TOTAL_EPOCHS_KEY,
    VAL_DATALOADER_KEY,
    ModelType,
)
from .errors import CheckpointError, CheckpointIOError, ConfigError, ConversionError, HeaderError
from .lazy import lazy_names

if TYPE_CHECKING:
    from .checkpointer import FullModelHFCheckpointer
    from .checkpointer.files import FormattedCheckpointFiles, get_largest_iter_folder
    from .config import ModelConfig
    from .model_types import UnknownModelTypeError
    from .report import Problem, Report, compare, roundtrip, verify
    from .units import parse_size

from .version import __version__ as __version__

#: loaded on first use: the checkpointer imports torch (``shardwise --version``, ``inspect``, ``verify``
#: and ``compare`` of headers start without the seconds that takes), the reports numpy; the command
#: line starts handling Ctrl-C as early as it can
_LAZY = {
    "ModelConfig": "config",
    **dict.fromkeys(("FormattedCheckpointFiles", "get_largest_iter_folder"), "checkpointer.files"),
    "FullModelHFCheckpointer": "checkpointer",
    "UnknownModelTypeError": "model_types",
    "parse_size": "units",
    **dict.fromkeys(("Problem", "Report", "compare", "roundtrip", "verify"), "report"),
}


__getattr__, __dir__ = lazy_names(__name__, _LAZY, globals())

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_KEY",
    "DATALOADER_KEY",
    "EPOCHS_KEY",
    "MAX_STEPS_KEY",
    "MODEL_KEY",
    "OPT_KEY",
    "RNG_KEY",
    "SEED_KEY",
    "STEPS_KEY",
    "TOTAL_EPOCHS_KEY",
    "VAL_DATALOADER_KEY",
    "CheckpointError",
    "CheckpointIOError",
    "ConfigError",
    "ConversionError",
    "FormattedCheckpointFiles",
    "FullModelHFCheckpointer",
    "HeaderError",
    "ModelConfig",
    "ModelType",
    "Problem",
    "Report",
    "UnknownModelTypeError",
    "compare",
    "get_largest_iter_folder",
    "parse_size",
    "roundtrip",
    "verify",
]
