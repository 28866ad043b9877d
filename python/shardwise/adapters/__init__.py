"""torchtune LoRA/DoRA adapters ⇄ PEFT adapter weights and ``adapter_config.json``.

torchtune names an adapter by its module: ``layers.{n}.attn.q_proj.lora_a.weight`` ``[r, in]``,
``...lora_b.weight`` ``[out, r]`` and, for DoRA, ``...magnitude`` ``[out]``. PEFT names it by the HF
module path: ``base_model.model.<hf module>.lora_A.weight`` / ``lora_B.weight`` /
``lora_magnitude_vector``. The HF module path of each family comes from its converter's key table,
so adapters follow the base weights exactly:

- q/k ``lora_B`` rows and DoRA magnitudes are RoPE-permuted back to HF row order only for families
  whose base q/k weights are permuted on load (Llama, Mistral, Gemma, Gemma2, reward models and the
  Llama-3.2-Vision self-attention layers), never for Qwen2/Qwen3 or Phi.
- Phi's fused ``qkv_proj`` / ``gate_up_proj``: separate q/k/v (w1/w3) LoRAs of rank r are exactly one
  LoRA of rank k·r on the fused module, with ``A = cat(A_q, A_k, A_v)`` and ``B = blockdiag(B_q, B_k,
  B_v)`` (a part without LoRA is a zero block); ``rank_pattern``/``alpha_pattern`` give that module
  rank k·r and alpha k·alpha, so the scaling alpha/r is unchanged. DoRA magnitudes concatenate too
  (the norm is per output row), but only when every part of the fused module has one.
- Llama-3.2-Vision: torchtune puts LoRA on some of the modules sharing a short name (e.g. the
  cross-attention and vision-encoder ``q_proj`` but not the self-attention ones), so
  ``target_modules`` is a regular expression naming exactly the adapted modules, under both the
  checkpoint's names and those of transformers ≥ 4.52 (``model.language_model...``); the weight keys
  use the latter, as PEFT itself writes them for those versions.

Anything else that has no exact PEFT equivalent raises ``PeftExportError``; the checkpointer then
saves the torchtune format only, with a warning (as torchtune does for Phi and Vision).
"""

from .export import (
    peft_to_tune_adapter_weights,
    tune_to_peft_adapter,
    tune_to_peft_adapter_config,
    tune_to_peft_adapter_weights,
)
from .families import supports_peft
from .naming import FUSED_METADATA_KEY, PEFT_PREFIX, TARGET_MODULES_TO_PEFT, PeftAdapter, PeftExportError

__all__ = [
    "FUSED_METADATA_KEY",
    "PEFT_PREFIX",
    "TARGET_MODULES_TO_PEFT",
    "PeftAdapter",
    "PeftExportError",
    "peft_to_tune_adapter_weights",
    "supports_peft",
    "tune_to_peft_adapter",
    "tune_to_peft_adapter_config",
    "tune_to_peft_adapter_weights",
]
