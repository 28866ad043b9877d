"""``save_pretrained`` / ``load_pretrained`` for transformers models sharded with FSDP2 or tensor parallel.

Called on every rank: each rank writes (or reads) only its own rows of the final Hugging Face files
through ``shardwise.dcp`` — nothing is gathered onto rank 0 and there is no consolidation pass. The
files are the ones ``model.save_pretrained`` writes for the same unsharded model: transformers'
tie-weight removal, its shard split (``huggingface_hub``'s, same ``max_shard_size`` default), the
safetensors headers, the index, ``config.json`` and ``generation_config.json``.
"""

from __future__ import annotations

import inspect
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from .errors import CheckpointError, ConfigError
from .store.local import carry_over
from .store.url import local_folder

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = ["default_max_shard_size", "load_pretrained", "save_pretrained"]

_SHARD_NAME = re.compile(r"(.*?)-\d{5}-of-\d{5}")


def default_max_shard_size() -> int | str:
    """The ``max_shard_size`` default of the installed transformers' ``save_pretrained``."""
    from transformers import PreTrainedModel

    return inspect.signature(PreTrainedModel.save_pretrained).parameters["max_shard_size"].default


def _meta(sd: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Global shape and dtype of every tensor (a DTensor's is its full one), no data."""
    return {k: torch.empty(tuple(v.shape), dtype=v.dtype, device="meta") for k, v in sd.items()}


def saved_keys(model: PreTrainedModel, sd: Mapping[str, Any]) -> list[str]:
    """The keys ``save_pretrained`` writes: transformers' own tie-weight removal, run on meta tensors so
    that ties are found by parameter identity (which sharding keeps) rather than by storage."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if len(tensors) != len(sd):
        odd = sorted(set(sd) - set(tensors))
        raise ConfigError(f"the state dict holds non-tensor values {odd[:5]}: save_pretrained writes tensors only")
    try:
        return list(remove_tied_weights_from_state_dict(_meta(tensors), model))
    except AttributeError:  # keys that are not the model's (a state_dict= of its own): ties by object
        seen: set[int] = set()
        keep = []
        for k, v in tensors.items():
            if id(v) not in seen:
                seen.add(id(v))
                keep.append(k)
        return keep


def _refuse_unsupported(model: PreTrainedModel, safe_serialization: bool) -> None:
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import PrefixChange

    name = type(model).__name__.removeprefix("FSDP")
    if not safe_serialization:
        raise ConfigError("save_pretrained(safe_serialization=False): only safetensors files are written collectively")
    if getattr(model, "hf_quantizer", None) is not None:
        raise ConfigError(f"{name} is quantized: save it with model.save_pretrained (quantizers add their own state)")
    if getattr(model, "_hf_peft_config_loaded", False):
        raise ConfigError(f"{name} holds PEFT adapters: save the adapter with PEFT's save_pretrained")
    conversions = getattr(model, "_weight_conversions", None)
    if conversions is None:
        conversions = get_model_conversion_mapping(model, add_legacy=False)
    conversions = [c for c in conversions if not isinstance(c, PrefixChange)]
    if conversions:
        raise ConfigError(
            f"{name}: transformers converts its weights back to the checkpoint format on save "
            f"({type(conversions[0]).__name__}), which is not a row map; use model.save_pretrained"
        )


def _split(model: PreTrainedModel, sd: Mapping[str, Any], keys: list[str], max_shard_size: int | str) -> Any:
    """File name → keys (in file order) and the index bytes, as ``save_pretrained`` decides them."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from transformers.utils import SAFE_WEIGHTS_NAME

    from .dcp.plan import FixedFiles

    pattern = SAFE_WEIGHTS_NAME.replace(".safetensors", "{suffix}.safetensors")
    split = split_torch_state_dict_into_shards(
        _meta({k: sd[k] for k in keys}), filename_pattern=pattern, max_shard_size=max_shard_size
    )
    index = None
    if split.is_sharded:
        content = {
            "metadata": {"total_parameters": model.num_parameters(), **split.metadata},
            "weight_map": split.tensor_to_filename,
        }
        index = (json.dumps(content, indent=2, sort_keys=True) + "\n").encode()
    return FixedFiles(dict(split.filename_to_tensors), index)


def _stale(name: str, written: set[str]) -> bool:
    """An earlier save's model file that this one replaces or makes stale (transformers deletes old
    numbered shards; an old index would name files that are gone)."""
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME

    if name in written or name == SAFE_WEIGHTS_INDEX_NAME:
        return True
    stem = name.replace(".bin", "").replace(".safetensors", "")
    return name.startswith("model") and _SHARD_NAME.fullmatch(stem) is not None


def save_pretrained(
    model: PreTrainedModel,
    save_directory: str | os.PathLike[str],
    *,
    max_shard_size: int | str | None = None,
    safe_serialization: bool = True,
    state_dict: Mapping[str, Any] | None = None,
    process_group: dist.ProcessGroup | None = None,
    fsync: bool = True,
) -> Path:
    """Write ``model`` as ``save_pretrained`` would, from every rank (call it on all of them).

    The model may be sharded with ``fully_shard`` (FSDP2), hold DTensors of any other layout (tensor
    parallel, 2-D meshes), or be a plain model in one process. ``max_shard_size`` defaults to
    transformers' own default. The folder appears complete or not at all; files already in
    ``save_directory`` that are not model files (a tokenizer, training args) are kept. Returns the
    folder."""
    from transformers.modeling_utils import custom_object_save, unwrap_model

    from .dcp import api

    target = local_folder(save_directory, "shardwise.hf.save_pretrained")
    if target.is_file():
        raise ConfigError(f"{target}: save_directory is a file, not a folder")
    model_to_save = unwrap_model(model)
    _refuse_unsupported(model_to_save, safe_serialization)
    # what save_pretrained records in the config (FSDP2 renames the class to FSDP<name>)
    model_to_save.config.dtype = str(model_to_save.dtype).split(".")[1]
    model_to_save.config.architectures = [type(model_to_save).__name__.removeprefix("FSDP")]
    sd = dict(model_to_save.state_dict() if state_dict is None else state_dict)
    for key in model_to_save._keys_to_ignore_on_save or ():
        sd.pop(key, None)
    keys = saved_keys(model_to_save, sd)
    fixed = _split(model_to_save, sd, keys, default_max_shard_size() if max_shard_size is None else max_shard_size)
    written = set(fixed.files) | {"config.json", "generation_config.json"}
    if fixed.index is not None:
        from transformers.utils import SAFE_WEIGHTS_INDEX_NAME

        written.add(SAFE_WEIGHTS_INDEX_NAME)

    def side_files(staging: Path) -> None:  # the coordinator, before the folder is published
        if model_to_save.is_remote_code():
            custom_object_save(model_to_save, str(staging), config=model_to_save.config)
        model_to_save.config.save_pretrained(staging)
        if model_to_save.can_generate():
            model_to_save.generation_config.save_pretrained(staging)
        carry_over(target, staging, lambda name: not _stale(name, written))

    api.save({k: sd[k] for k in keys}, target, fixed=fixed, side_files=side_files,
             process_group=process_group, fsync=fsync)
    return target


def load_pretrained(
    model: PreTrainedModel,
    path: str | os.PathLike[str],
    *,
    process_group: dist.ProcessGroup | None = None,
) -> PreTrainedModel:
    """Load the Hugging Face folder ``path`` into ``model`` in place (call on every rank): each rank
    reads only its own rows. Every weight the model saves must be in the checkpoint and every
    checkpoint tensor must be the model's (a clear error names the others); a tied weight is loaded
    through the weight it is tied to, as in ``from_pretrained``."""
    from transformers.modeling_utils import unwrap_model

    from .dcp import api
    from .dcp.reader import HFStorageReader

    folder = local_folder(path, "shardwise.hf.load_pretrained")
    model = unwrap_model(model)
    sd = model.state_dict()
    keys = saved_keys(model, sd)
    reader = HFStorageReader(folder)
    stored = set(reader.read_metadata().state_dict_metadata)

    def ignored(key: str, patterns: Any) -> bool:
        return any(re.search(p, key) for p in patterns or ())

    missing = [k for k in keys if k not in stored and not ignored(k, model._keys_to_ignore_on_load_missing)]
    unexpected = sorted(k for k in stored - set(sd) if not ignored(k, model._keys_to_ignore_on_load_unexpected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''} ({len(missing)} keys)")
        if unexpected:
            parts.append(f"unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''} ({len(unexpected)} keys)")
        raise CheckpointError(f"{folder}: the checkpoint does not fit {type(model).__name__}: {'; '.join(parts)}")
    api.load({k: sd[k] for k in keys if k in stored}, folder, process_group=process_group)
    return model
