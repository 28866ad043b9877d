"""torchtune adapters <-> PEFT: LoRA/DoRA weight names, fused projections, ``adapter_config.json``."""
