"""torchtune adapters <-> PEFT: LoRA/DoRA weight names, fused projections, ``adapter_config.json``."""

from .peft import (
    PEFT_PREFIX,
    PeftAdapter,
    PeftExportError,
    peft_to_tune_adapter_weights,
    supports_peft,
    tune_to_peft_adapter,
    tune_to_peft_adapter_config,
    tune_to_peft_adapter_weights,
)

__all__ = [
    "PEFT_PREFIX",
    "PeftAdapter",
    "PeftExportError",
    "peft_to_tune_adapter_weights",
    "supports_peft",
    "tune_to_peft_adapter",
    "tune_to_peft_adapter_config",
    "tune_to_peft_adapter_weights",
]
