"""``FullModelHFCheckpointer``: torchtune 0.6.1's constructor and state-dict contract, exact and fast.

Orchestration only: path rules (``resolve``, ``files``), folders (``shardwise.store``: a local or a
remote ``Output``), config and conversion (``config``, ``convert``), the files of a folder (``write``),
the shard layout (``format.layout``) and recipe state (``recipe_state``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .._logging import get_logger
from ..config import ModelConfig
from ..constants import ADAPTER_KEY, MODEL_KEY, RECIPE_STATE_DIRNAME, REPO_ID_FNAME
from ..convert import get_converter
from ..convert.base import Op
from ..errors import ConfigError, ConversionError
from ..format.layout import SavePlan, plan_shards
from ..format.shards import SourceFile, load_merged, read_sources, with_file
from ..format.torchfile import commit, stage_torch_save
from ..model_types import model_type_mismatch, parse_model_type
from ..staging import SaveFuture, Stager, submit, wait_for_previous
from ..store.dirs import open_dirs
from ..store.local import STAGING_MARK, make_dir
from ..units import gib, parse_size
from .files import check_outdir_not_in_ckptdir, checkpoint_file_names, copy_files
from .read import load_adapter, matching_index
from .recipe_state import SHARDED_KEYS, load_recipe_state, recipe_keys, recipe_state_folder
from .resolve import ResumePaths
from .write import FolderWriter, check_tensors, is_rank_zero, is_sharded

if TYPE_CHECKING:
    from ..dcp.plan import SourceLayout

__all__ = ["FullModelHFCheckpointer"]

logger = get_logger()


class FullModelHFCheckpointer:
    """Reads and writes Hugging Face checkpoints for torchtune recipes, as torchtune's class does.

    Same constructor and ``load_checkpoint`` / ``save_checkpoint`` contract as
    ``torchtune.training.FullModelHFCheckpointer`` (0.6.1), plus the keyword-only extras of later
    releases (``keep_last_n_checkpoints``; ``step``, ``dir_prefix``, ``max_shard_size`` on save).
    Unchanged weights are written back byte for byte under the original shard names, every
    checkpoint folder is published atomically, and the caller's dict is never mutated.
    ``checkpoint_dir`` / ``output_dir`` may be fsspec URLs (``s3://``, ``gs://``): ``storage_options``
    go to fsspec, ``cache_dir`` holds the downloads; a remote folder is complete once its
    ``.shardwise-complete`` marker is written (docs/remote.md).
    """

    def __init__(
        self,
        checkpoint_dir: str,
        checkpoint_files: list[str] | dict[str, str],
        model_type: str,
        output_dir: str,
        adapter_checkpoint: str | None = None,
        recipe_checkpoint: str | None = None,
        resume_from_checkpoint: bool = False,
        safe_serialization: bool = True,
        should_load_recipe_state: bool = False,
        *,
        keep_last_n_checkpoints: int | None = None,
        fsync: bool = True,
        storage_options: Mapping[str, Any] | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self._should_load_recipe_state = bool(should_load_recipe_state)
        if resume_from_checkpoint:
            self._should_load_recipe_state = True
            logger.warning(
                "*resume_from_checkpoint is deprecated. Please use the 'should_load_recipe_state' instead"
            )
        self._safe_serialization = bool(safe_serialization)
        # where the folders live (a local folder, or object storage through a local stand-in): the store
        self._checkpoint_dir, self._output = open_dirs(
            checkpoint_dir, output_dir, weights=checkpoint_file_names(checkpoint_files),
            resume=self._should_load_recipe_state, recipe_checkpoint=recipe_checkpoint,
            adapter_checkpoint=adapter_checkpoint, pairing=recipe_state_folder,
            storage_options=storage_options, cache_dir=cache_dir, fsync=fsync,
        )
        self._model_type = parse_model_type(model_type)
        self._output_dir = self._output.folder
        self._fsync = fsync
        if keep_last_n_checkpoints is not None and keep_last_n_checkpoints < 1:
            raise ValueError(f"keep_last_n_checkpoints must be at least 1, got {keep_last_n_checkpoints}")
        self._keep_last_n = keep_last_n_checkpoints
        check_outdir_not_in_ckptdir(self._checkpoint_dir, self._output_dir)
        if not self._checkpoint_dir.is_dir():
            raise ValueError(f"{self._checkpoint_dir} is not a valid directory.")

        self._config = ModelConfig.from_file(self._checkpoint_dir / "config.json")
        mismatch = model_type_mismatch(self._model_type, self._config, str(self._checkpoint_dir / "config.json"))
        if mismatch is not None:
            logger.warning("%s; check model_type", mismatch)
        self._converter = get_converter(self._model_type)
        self._converter.validate_config(self._config)

        self.repo_id: str | None = None
        repo_file = self._checkpoint_dir / f"{REPO_ID_FNAME}.json"
        if repo_file.is_file():
            try:
                data = json.loads(repo_file.read_text())
            except json.JSONDecodeError as e:
                raise ConfigError(f"{repo_file}: not valid JSON ({e})") from e
            self.repo_id = data.get("repo_id") if isinstance(data, dict) else None

        paths = ResumePaths(
            self._checkpoint_dir, self._output_dir, checkpoint_files, resuming=self._should_load_recipe_state,
            recipe_checkpoint=recipe_checkpoint, adapter_checkpoint=adapter_checkpoint,
        )
        self._recipe_checkpoint = paths.recipe
        self._resume_folder = paths.folder
        self._adapter_checkpoint = paths.adapter
        self._checkpoint_paths = paths.model

        # filled by load_checkpoint (or lazily by save_checkpoint before any load)
        self._weight_map: dict[str, str] | None = None
        self._sources: list[SourceFile] = []
        self._key_source: dict[str, SourceFile] = {}
        self._aside: dict[str, torch.Tensor] = {}
        self._orig_index: tuple[Path, bytes, dict[str, Any]] | None = None
        self._stager = Stager()  # the staging buffers of background saves, reused from save to save
        self._writer = FolderWriter(self._model_type, self._config, self._safe_serialization, self.repo_id)

        make_dir(self._output_dir)
        if self._should_load_recipe_state:
            logger.info(
                "Loading the recipe state using: \n\tcheckpoint_paths: %s\n\trecipe_checkpoint: %s"
                "\n\tadapter_checkpoint: %s",
                [str(p) for p in self._checkpoint_paths], self._recipe_checkpoint, self._adapter_checkpoint,
            )


    # ------------------------------------------------------------------ load
    def _load_model(self) -> dict[str, torch.Tensor]:
        sources = read_sources(self._checkpoint_paths)
        per_source, key_source = load_merged(sources)
        merged = {k: t for tensors in per_source for k, t in tensors.items()}
        position = {id(src): f"{i + 1:04}" for i, src in enumerate(sources)}
        weight_map = {k: position[id(src)] for k, src in key_source.items()}
        try:
            result = self._converter.hf_to_tune(merged, self._config)
        except ConversionError as e:
            files = {k: src.path for k, src in key_source.items()}
            raise with_file(e, files, self._checkpoint_dir) from e
        self._sources = sources
        self._key_source = key_source
        self._weight_map = weight_map
        self._aside = result.aside
        self._orig_index = matching_index(sources)
        return result.tune

    def load_checkpoint(self) -> dict[str, Any]:
        """Load the HF shards (zero-copy), convert to torchtune keys, and add the adapter and recipe
        state when resuming. Returns ``{"model": ..., ["adapter": ...], <recipe keys>...}``."""
        state: dict[str, Any] = {MODEL_KEY: self._load_model()}
        if self._adapter_checkpoint is not None:
            state[ADAPTER_KEY] = load_adapter(self._adapter_checkpoint, self._model_type, self._config)
        if self._should_load_recipe_state and self._recipe_checkpoint is not None:
            recipe = load_recipe_state(self._recipe_checkpoint)
            if SHARDED_KEYS in recipe:  # a collective save wrote the optimizer state with DCP
                recipe = self._load_sharded_recipe_state(recipe)
            state.update(recipe)
        return state

    def _load_sharded_recipe_state(self, recipe: dict[str, Any]) -> dict[str, Any]:
        """The recipe keys a collective save wrote with DCP, merged back as full values (a hook:
        ``shardwise.torchtune`` reads them on rank 0 only)."""
        from .collective import load_sharded_recipe_state

        return load_sharded_recipe_state(self._output_dir, recipe)


    # ------------------------------------------------------------------ save
    def save_checkpoint(
        self,
        state_dict: dict[str, Any],
        epoch: int,
        intermediate_checkpoint: bool = False,
        adapter_only: bool = False,
        *,
        step: int | None = None,
        dir_prefix: str = "epoch",
        max_shard_size: int | str | None = None,
        background: bool = False,
    ) -> SaveFuture | None:
        """Write ``output_dir/epoch_{epoch}/`` (or ``step_{step}/``): HF shards and index, adapter files,
        side files; with ``intermediate_checkpoint`` also ``output_dir/recipe_state/recipe_state.pt``.
        The folder appears only when complete; ``state_dict`` is not modified.

        ``background=True``: returns a ``SaveFuture`` as soon as the state (model, adapter, recipe
        state) is copied into staging buffers reused from save to save; the files are written by a
        background thread and published when complete, the recipe state with its folder (a sharded
        state dict: call on every rank; its gathers run before the call returns). A later save
        (background or not) first waits for it and raises its error if ``result()`` was not called."""
        if dir_prefix not in ("epoch", "step"):
            raise ValueError(f"dir_prefix must be 'epoch' or 'step', got {dir_prefix!r}")
        if dir_prefix == "step" and step is None:
            raise ValueError("dir_prefix='step' needs step=")
        number = step if dir_prefix == "step" else epoch
        if adapter_only and ADAPTER_KEY not in state_dict:
            raise ValueError(
                "Adapter checkpoint not found in state_dict. Please ensure that the state_dict contains "
                "adapter weights."
            )
        cap = parse_size(max_shard_size)
        model = None if adapter_only else state_dict.get(MODEL_KEY)
        if not adapter_only and model is None:
            raise ValueError(f"state_dict has no {MODEL_KEY!r} key (pass adapter_only=True to save adapters)")
        if model is not None:
            check_tensors(model, "model")
        adapter = state_dict.get(ADAPTER_KEY)
        if adapter is not None:
            check_tensors(adapter, "adapter")

        final = self._output_dir / f"{dir_prefix}_{number}"
        if is_sharded(model, adapter):
            wait_for_previous()  # a synchronous save never overlaps a background one
            return self._save_sharded(state_dict, model, adapter, final, intermediate_checkpoint, dir_prefix, cap,
                                      background)
        if background:
            wait_for_previous()
            staged = self._stager.stage(state_dict)
            return submit(
                lambda: self._save(staged, final, intermediate_checkpoint, adapter_only, dir_prefix, cap),
                self._output.where(final.name),
            )
        wait_for_previous()
        self._save(state_dict, final, intermediate_checkpoint, adapter_only, dir_prefix, cap)
        return None

    def _save_sharded(
        self, state_dict: Mapping[str, Any], model: Mapping[str, Any] | None, adapter: Mapping[str, Any] | None,
        final: Path, intermediate_checkpoint: bool, dir_prefix: str, cap: int | None, background: bool,
    ) -> SaveFuture | None:
        """The collective save (every rank writes its own rows), now or in the background."""
        if not self._output.collective:
            raise NotImplementedError(
                f"a sharded (DTensor) state dict cannot be saved to object storage yet "
                f"({self._output.where()}): save to a local or mounted output_dir"
            )
        from .collective import save_collective

        def after() -> None:
            if is_rank_zero():  # one rank speaks for the collective save, as torchtune's recipes do
                self._writer.log_notes(final)
                logger.info("Checkpoint saved to %s (collectively: every rank wrote its own rows)", final)
                self._prune(dir_prefix, final.name)

        self._writer.notes = []
        return save_collective(_CollectiveView(self), state_dict, model, adapter, final, intermediate_checkpoint,
                               cap, stager=self._stager if background else None, after=after)

    def _save(
        self, state_dict: Mapping[str, Any], final: Path, intermediate_checkpoint: bool, adapter_only: bool,
        dir_prefix: str, cap: int | None,
    ) -> None:
        model = None if adapter_only else state_dict.get(MODEL_KEY)
        adapter = state_dict.get(ADAPTER_KEY)
        recipe_rel = f"{RECIPE_STATE_DIRNAME}/recipe_state.pt"
        recipe_path = self._output_dir / RECIPE_STATE_DIRNAME / "recipe_state.pt"
        recipe_tmp: Path | None = None
        self._writer.notes = []
        try:
            staging = self._output.begin(final.name)
            if model is not None:
                plan, ops = self._plan(model, cap)
                original = None if self._orig_index is None else (self._orig_index[1], self._orig_index[2])
                self._writer.write_model(plan, ops, staging, self._output, self._sources, original)
            self._writer.write_adapter_files(state_dict, adapter, staging)
            copy_files(self._checkpoint_dir, staging)
            if intermediate_checkpoint:
                # staged before anything is published, so a write error leaves output_dir as it was
                recipe_tmp = stage_torch_save(
                    recipe_keys(state_dict, final.name), recipe_path, fsync=self._fsync,
                    tmp=self._output_dir / f".recipe_state.pt{STAGING_MARK}tmp-{os.getpid()}",
                )
            where = self._output.publish()
        except BaseException:
            self._output.discard()
            if recipe_tmp is not None:
                recipe_tmp.unlink(missing_ok=True)
            raise
        self._writer.log_notes(where)
        logger.info("Checkpoint saved to %s", where)
        if recipe_tmp is not None:
            try:
                self._output.send(recipe_tmp, recipe_rel)
            except BaseException:
                recipe_tmp.unlink(missing_ok=True)
                raise
            commit(recipe_tmp, recipe_path, fsync=self._fsync)
            logger.info("Recipe checkpoint of size %s saved to %s", gib(recipe_path.stat().st_size), recipe_path)
        else:
            logger.info("Saving final %s checkpoint.", dir_prefix)
            if adapter_only:
                logger.info(
                    "Please note that you have set adapter_only=True, so only adapter weights will be "
                    "saved. You need to merge the adapter weights into your base model for further use. "
                    "See FullModelHFCheckpointer.save_checkpoint for more details."
                )
            else:
                logger.info(
                    "The full model checkpoint, including all weights and configurations, has been saved "
                    "successfully. You can now use this checkpoint for further training or inference."
                )
        self._prune(dir_prefix, final.name)

    def _prune(self, prefix: str, keep: str) -> None:
        """``keep_last_n_checkpoints``: the store deletes the surplus, never a folder this run reads from
        (a resume with ``checkpoint_dir=output_dir/epoch_N``) nor the one the recipe state goes with."""
        if self._keep_last_n is None:
            return
        recipe = self._output_dir / RECIPE_STATE_DIRNAME / "recipe_state.pt"
        paired = recipe_state_folder(recipe) if recipe.is_file() else None
        reads = [self._checkpoint_dir, *(s.path for s in self._sources)]
        self._output.prune(prefix, keep, self._keep_last_n, paired, reads)

    def _ensure_sources(self) -> None:
        if self._weight_map is None:
            # save before load: the layout comes from the input files (tensors stay mapped, unread)
            self._load_model()

    def _plan(self, model: Mapping[str, torch.Tensor], cap: int | None) -> tuple[SavePlan, list[Op]]:
        self._ensure_sources()
        ops = self._converter.tune_to_hf_ops(model, self._config, self._aside)
        had_index = self._orig_index is not None or len(self._sources) > 1
        plan = plan_shards(
            ops, self._sources, self._key_source,
            safe=self._safe_serialization, had_index=had_index, max_shard_size=cap,
        )
        return plan, ops


class _CollectiveView:
    """The checkpointer as ``collective.Checkpoint``: what a collective save reads from it."""

    def __init__(self, ck: FullModelHFCheckpointer) -> None:
        self._ck = ck
        self.output_dir = ck._output_dir
        self.checkpoint_dir = ck._checkpoint_dir
        self.fsync = ck._fsync
        self.write_adapter_files = ck._writer.write_adapter_files

    def source_layout(self) -> SourceLayout:
        from ..dcp.plan import SourceLayout

        ck = self._ck
        ck._ensure_sources()
        original = None if ck._orig_index is None else (ck._orig_index[1], ck._orig_index[2])
        return SourceLayout(
            converter=ck._converter, config=ck._config, aside=ck._aside, sources=ck._sources,
            key_source=ck._key_source, original_index=original,
            had_index=ck._orig_index is not None or len(ck._sources) > 1,
        )
