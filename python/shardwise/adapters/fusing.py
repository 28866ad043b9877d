"""Fused HF modules ⇄ separate torchtune LoRAs: k LoRAs of rank r on the parts of a fused module are
exactly one LoRA of rank k·r on it (``A`` stacked, ``B`` block-diagonal, a part without LoRA a zero
block); ``unfuse`` splits one back and refuses a ``B`` that is not block-diagonal."""

from __future__ import annotations

import torch

from ..errors import ConversionError
from .families import Family
from .naming import LORA_A, LORA_B, MAGNITUDE, PEFT_PREFIX, TUNE_TO_PEFT_SUFFIX, PeftAdapter, PeftExportError, Target

__all__ = ["fuse", "unfuse"]

Tensor = torch.Tensor


def fuse(hf: str, members: list[tuple[Target, str, dict[str, Tensor]]], out: PeftAdapter) -> None:
    """One block LoRA on a fused HF module from the LoRAs of some of its parts."""
    tgt0 = members[0][0]
    ranks = {p[LORA_A].shape[0] for _, _, p in members}
    a_dtypes = {p[LORA_A].dtype for _, _, p in members}
    b_dtypes = {p[LORA_B].dtype for _, _, p in members}
    names = [m for _, m, _ in members]
    if len(ranks) != 1 or len(a_dtypes) != 1 or len(b_dtypes) != 1:
        raise PeftExportError(f"the LoRAs of {names} (fused into {hf}) differ in rank or dtype")
    if len({p[LORA_A].shape[1] for _, _, p in members}) != 1:
        raise PeftExportError(f"the LoRAs of {names} (fused into {hf}) differ in input size")
    with_mag = [m for _, m, p in members if MAGNITUDE in p]
    if with_mag and (len(with_mag) != len(tgt0.parts)):
        raise PeftExportError(
            f"DoRA on {with_mag} cannot be expressed on the fused {hf}: PEFT needs a magnitude for every "
            f"row of it, i.e. DoRA on all of {list(tgt0.parts)}"
        )
    present = {t.part: p for t, _, p in members}
    seen_rows = {p[LORA_B].shape[0] for p in present.values()}
    rows: list[int] = []
    for i, expected in enumerate(tgt0.rows):
        if i in present:
            got = present[i][LORA_B].shape[0]
            if expected is not None and got != expected:
                raise PeftExportError(
                    f'"{tgt0.parts[i]}.lora_b.weight" has {got} rows, but its part of {hf} has {expected} '
                    "(check num_attention_heads / num_key_value_heads / head_dim / intermediate_size)"
                )
            rows.append(got)
        elif expected is not None:
            rows.append(expected)
        elif len(seen_rows) == 1:
            rows.append(next(iter(seen_rows)))
        else:
            raise PeftExportError(f"cannot tell the row count of {tgt0.parts[i]} inside {hf}")
    r = next(iter(ranks))
    k = len(members)
    first = members[0][2]
    a = torch.cat([p[LORA_A] for _, _, p in members], dim=0)
    b = torch.zeros(sum(rows), k * r, dtype=first[LORA_B].dtype)
    offsets = [sum(rows[:i]) for i in range(len(rows))]
    for slot, (t, _, p) in enumerate(members):
        b[offsets[t.part] : offsets[t.part] + rows[t.part], slot * r : (slot + 1) * r] = p[LORA_B]
    prefix = f"{PEFT_PREFIX}{hf}."
    out.weights[prefix + TUNE_TO_PEFT_SUFFIX[LORA_A]] = a
    out.weights[prefix + TUNE_TO_PEFT_SUFFIX[LORA_B]] = b
    if with_mag:
        out.weights[prefix + TUNE_TO_PEFT_SUFFIX[MAGNITUDE]] = torch.cat([p[MAGNITUDE] for _, _, p in members], dim=0)
        out.use_dora = True
    out.modules[hf] = (k * r, k)
    out.fused[hf] = [".".join(m.split(".")[-2:]) for _, m, _ in members]


def unfuse(
    hf: str, tune_modules: tuple[str, ...], parts: dict[str, Tensor], present_names: list[str] | None, fam: Family
) -> dict[str, Tensor]:
    """The torchtune LoRAs of the parts of fused module ``hf`` (``present_names``: the parts that had
    one, as the safetensors metadata records them; None: all)."""
    tgt0 = fam.target(tune_modules[0])
    assert tgt0 is not None
    a, b = parts[LORA_A], parts[LORA_B]
    if present_names is None:
        present = list(range(len(tune_modules)))
    else:
        suffixes = [".".join(m.split(".")[-2:]) for m in tune_modules]
        unknown = [n for n in present_names if n not in suffixes]
        if unknown:
            raise ConversionError(f"{hf}: adapter metadata names unknown parts {unknown}")
        present = sorted(suffixes.index(n) for n in present_names)
    k = len(present)
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] % k or b.shape[1] != a.shape[0]:
        raise ConversionError(
            f"{hf}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not split into {k} LoRAs; resume "
            "from the torchtune adapter instead (adapter_checkpoint='epoch_N/adapter_model.pt')"
        )
    r = a.shape[0] // k
    if all(x is not None for x in tgt0.rows):
        rows = [int(x) for x in tgt0.rows if x is not None]
    elif any(x is not None for x in tgt0.rows) or b.shape[0] % len(tgt0.rows):
        raise ConversionError(f"{hf}: cannot tell the row split of lora_B {tuple(b.shape)}")
    else:  # equal parts (gate_up_proj without intermediate_size in config.json)
        rows = [b.shape[0] // len(tgt0.rows)] * len(tgt0.rows)
    if sum(rows) != b.shape[0]:
        raise ConversionError(f"{hf}: lora_B has {b.shape[0]} rows, expected {sum(rows)} (check config.json)")
    offsets = [sum(rows[:i]) for i in range(len(rows))]
    out: dict[str, Tensor] = {}
    check = b.clone()
    for slot, i in enumerate(present):
        lo, hi = offsets[i], offsets[i] + rows[i]
        module = tune_modules[i]
        out[f"{module}.{LORA_A}"] = a[slot * r : (slot + 1) * r].clone()
        out[f"{module}.{LORA_B}"] = b[lo:hi, slot * r : (slot + 1) * r].clone()
        check[lo:hi, slot * r : (slot + 1) * r] = 0
    if torch.count_nonzero(check):
        raise ConversionError(
            f"{hf}: lora_B is not block-diagonal over {[tune_modules[i] for i in present]}, so it is not a set "
            "of torchtune LoRAs; resume from the torchtune adapter instead "
            "(adapter_checkpoint='epoch_N/adapter_model.pt')"
        )
    if MAGNITUDE in parts:
        if k != len(tune_modules):
            raise ConversionError(f"{hf}: a DoRA magnitude on a partly adapted fused module has no torchtune form")
        mag = parts[MAGNITUDE]
        for i, module in enumerate(tune_modules):
            out[f"{module}.{MAGNITUDE}"] = mag[offsets[i] : offsets[i] + rows[i]].clone()
    return out
