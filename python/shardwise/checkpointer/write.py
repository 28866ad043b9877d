"""The files of one checkpoint folder: model shards (through the ``Output``) and the index, the adapter
in torchtune and PEFT form, and the lines the save logs once the folder is published."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .. import adapters as peft
from .._logging import get_logger
from ..config import ModelConfig
from ..constants import ADAPTER_CONFIG, ADAPTER_CONFIG_FNAME, ADAPTER_MODEL_FNAME, ModelType
from ..convert.base import Op
from ..errors import CheckpointIOError, ConversionError
from ..format.layout import (
    SavePlan,
    count_params,
    index_bytes,
    index_name,
    shard_bytes,
    torch_ready,
    write_tensors,
    write_torch_shards,
)
from ..format.shards import SourceFile, check_sources_intact
from ..format.torchfile import save_torch_file
from ..store.output import Output
from ..units import gib

__all__ = ["FolderWriter", "check_tensors", "is_rank_zero", "is_sharded"]

logger = get_logger()


class FolderWriter:
    """Writes into a staging folder and keeps a line per file, logged under the final folder's name
    (``log_notes``) once the folder is published: no log line names a file that is not there yet."""

    def __init__(self, model_type: ModelType, config: ModelConfig, safe: bool, repo_id: str | None) -> None:
        self.model_type = model_type
        self.config = config
        self.safe = safe
        self.repo_id = repo_id
        self.notes: list[tuple[str, tuple[object, ...], str]] = []

    def note(self, fmt: str, *args: object) -> None:
        """Keep a line about a file written into the staging folder (its path is the last argument)."""
        *head, path = args
        self.notes.append((fmt, tuple(head), Path(str(path)).name))

    def log_notes(self, final: Path | str) -> None:
        """Log the kept lines with the paths a user will find (``final/<file>``; a URL on object storage)."""
        for fmt, args, name in self.notes:
            logger.info(fmt, *args, f"{final}/{name}")
        self.notes = []

    def write_model(
        self,
        plan: SavePlan,
        ops: Sequence[Op],
        folder: Path,
        output: Output,
        sources: Sequence[SourceFile],
        original_index: tuple[bytes, dict[str, Any]] | None,
    ) -> None:
        """The shards of ``plan`` (safetensors through ``output``, straight from tensor memory; torch
        ``.bin`` files into ``folder``) and the index, reusing the original index's bytes when they fit."""
        total_size = None
        check_sources_intact(sources)  # before any mapped page is read
        try:
            if self.safe:
                output.write_files(shard_bytes(plan))
            else:
                total_size = write_torch_shards(plan, folder)
        except CheckpointIOError:
            check_sources_intact(sources)  # a read of a truncated mapping fails as the write (EFAULT)
            raise
        for shard in plan.shards:
            self.note("Model checkpoint of size %s saved to %s", gib(shard.nbytes), folder / shard.name)
        if plan.write_index:
            name = index_name(self.safe)
            (folder / name).write_bytes(index_bytes(plan, original_index, count_params(ops), total_size))

    def write_adapter_files(
        self, state_dict: Mapping[str, Any], adapter: Mapping[str, torch.Tensor] | None, folder: Path
    ) -> None:
        """``adapter_model.pt`` (torchtune keys, for resuming), ``adapter_model.safetensors``/``.bin``
        (PEFT keys) and ``adapter_config.json`` (PEFT); PEFT files only where PEFT can represent the
        adapter exactly, otherwise a warning (as torchtune does for Phi and Llama-3.2-Vision)."""
        export: peft.PeftAdapter | None = None
        reason: str | None = None
        if not peft.supports_peft(self.model_type):
            reason = f"PEFT has no equivalent for ModelType.{self.model_type.name} adapters"
        if adapter is not None:
            pt = folder / f"{ADAPTER_MODEL_FNAME}.pt"
            save_torch_file({k: torch_ready(v) for k, v in adapter.items()}, pt)
            self.note("Adapter checkpoint of size %s saved to %s", gib(pt.stat().st_size), pt)
            if reason is None:
                try:
                    export = peft.tune_to_peft_adapter(adapter, self.model_type, self.config)
                except peft.PeftExportError as e:
                    reason = str(e)
            if reason is not None:
                logger.warning(
                    "Saving %s adapter weights to PEFT format is not supported (%s), saving to torchtune "
                    "format instead",
                    self.model_type.name, reason,
                )
            else:
                assert export is not None
                self._write_peft_weights(export, folder)
        if ADAPTER_CONFIG not in state_dict:
            return
        cfg: dict[str, Any] | None = None
        if reason is None:
            try:
                cfg = peft.tune_to_peft_adapter_config(
                    state_dict[ADAPTER_CONFIG], self.model_type, self.repo_id, export, self.config
                )
            except peft.PeftExportError as e:
                reason = str(e)
        if cfg is None:
            logger.warning(
                "PEFT integration for %s is not supported (%s), skipping adapter config save",
                self.model_type.name, reason,
            )
            return
        out = folder / f"{ADAPTER_CONFIG_FNAME}.json"
        out.write_text(json.dumps(cfg, indent=2) + "\n")
        self.note("Adapter config saved to %s", out)

    def _write_peft_weights(self, export: peft.PeftAdapter, folder: Path) -> None:
        weights = {k: torch_ready(v) for k, v in export.weights.items()}
        if self.safe:
            out = folder / f"{ADAPTER_MODEL_FNAME}.safetensors"
            write_tensors(out, weights, export.metadata())
        else:
            out = folder / f"{ADAPTER_MODEL_FNAME}.bin"
            save_torch_file(weights, out)
        self.note("Adapter checkpoint of size %s saved to %s", gib(out.stat().st_size), out)


def is_sharded(*dicts: Mapping[str, Any] | None) -> bool:
    """True when a state dict holds DTensors (FSDP2 / tensor parallel): such a save is collective.
    Checked without importing torch.distributed.tensor unless torch.distributed is in use."""
    import sys

    if "torch.distributed.tensor" not in sys.modules:
        return False
    from torch.distributed.tensor import DTensor

    return any(d is not None and any(isinstance(v, DTensor) for v in d.values()) for d in dicts)


def is_rank_zero() -> bool:
    """Rank 0 of the default process group, or the only process."""
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def check_tensors(d: Any, what: str) -> None:
    """Every value a tensor with data (not a meta tensor, not sparse), before anything is written."""
    if not isinstance(d, Mapping):
        raise ConversionError(f"state_dict[{what!r}] must be a dict of tensors, got {type(d).__name__}")
    for k, v in d.items():
        if not isinstance(v, torch.Tensor):
            raise ConversionError(f"state_dict[{what!r}][{k!r}] is a {type(v).__name__}, not a torch.Tensor")
        if v.is_meta or v.layout != torch.strided:
            kind = "a meta tensor" if v.is_meta else f"a {v.layout} tensor"
            raise ConversionError(
                f"state_dict[{what!r}][{k!r}] is {kind}: it has no data to save (materialize the weights "
                "first, e.g. load them or call model.to_empty() and initialize)"
            )
