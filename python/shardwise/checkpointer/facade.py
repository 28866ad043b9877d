"""``FullModelHFCheckpointer``: torchtune 0.6.1's constructor and state-dict contract, exact and fast.

Orchestration only: paths (``paths``), config (``config``), conversion (``convert``), layout and the
native writer (``layout``, ``_core``), adapters (``peft``) and recipe state (``recipe_state``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .. import _core
from .._logging import get_logger
from .. import adapters as peft
from ..config import ModelConfig
from ..constants import (
    ADAPTER_CONFIG,
    ADAPTER_CONFIG_FNAME,
    ADAPTER_KEY,
    ADAPTER_MODEL_FNAME,
    MODEL_KEY,
    RECIPE_STATE_DIRNAME,
    REPO_ID_FNAME,
    ModelType,
)
from ..convert import get_converter
from ..convert.base import Op
from ..errors import CheckpointError, CheckpointIOError, ConfigError, ConversionError
from ..format.layout import (
    SavePlan,
    count_params,
    index_bytes,
    index_name,
    plan_shards,
    read_index,
    torch_ready,
    write_safetensors_shards,
    write_tensors,
    write_torch_shards,
)
from ..format.paths import (
    STAGING_MARK,
    FormattedCheckpointFiles,
    check_outdir_not_in_ckptdir,
    copy_files,
    fsync_tree,
    get_largest_iter_folder,
    is_staging_name,
    make_dir,
    resolve_checkpoint_files,
    user_path,
)
from ..format.shards import SourceFile, check_sources_intact, load_merged, read_sources, with_file
from ..model_types import model_type_mismatch
from ..store.fsspec import is_url
from .recipe_state import commit, load_recipe_state, recipe_keys, recipe_state_folder, save_torch_file, stage_torch_save

#: ``recipe_state.pt`` of a collective save lists its DCP-saved keys under this name (dcp.collective)
SHARDED_KEYS = "_shardwise_dcp_keys"

if TYPE_CHECKING:
    from ..store.remote_output import RemoteDirs

__all__ = ["FormattedCheckpointFiles", "FullModelHFCheckpointer", "UnknownModelTypeError", "parse_size"]

logger = get_logger()


class UnknownModelTypeError(ConfigError, KeyError):
    """``model_type`` names no ``ModelType`` member (a ``KeyError`` as in torchtune, and a ``ValueError``)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def _model_type(value: str | ModelType) -> ModelType:
    if isinstance(value, ModelType):
        return value
    try:
        return ModelType[value]
    except KeyError:
        for m in ModelType:
            if str(value).lower() in (m.value, m.name.lower()):
                return m
    names = ", ".join(m.name for m in ModelType)
    raise UnknownModelTypeError(f"unknown model_type {value!r}; expected one of: {names}")


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str | None) -> int | None:
    """``5_000_000_000``, ``"5GB"`` or ``"500MiB"`` → bytes (HF's convention: GB = 10**9)."""
    if size is None or isinstance(size, int):
        if isinstance(size, int) and size <= 0:
            raise ValueError(f"max_shard_size must be positive, got {size}")
        return size
    m = _SIZE.match(str(size))
    if not m:
        raise ValueError(f"max_shard_size {size!r} is not a size like 5GB or 500MiB")
    n = int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])
    if n <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return n


def _gib(n: int) -> str:
    return f"{n / 1024**3:.2f} GiB"


class FullModelHFCheckpointer:
    """Reads and writes Hugging Face checkpoints for torchtune recipes, as torchtune's class does.

    Same constructor and ``load_checkpoint`` / ``save_checkpoint`` contract as
    ``torchtune.training.FullModelHFCheckpointer`` (0.6.1), plus the keyword-only extras of later
    releases (``keep_last_n_checkpoints``; ``step``, ``dir_prefix``, ``max_shard_size`` on save).
    Unchanged weights are written back byte for byte under the original shard names, every
    checkpoint folder is published atomically, and the caller's dict is never mutated.
    ``checkpoint_dir`` / ``output_dir`` may be fsspec URLs (``s3://``, ``gs://``): ``storage_options``
    go to fsspec, ``cache_dir`` holds the downloads; a remote folder is complete once its
    ``.shardwise-complete`` marker is written (README, "Remote checkpoints").
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
        # object storage (s3://, gs://, ...): the checkpointer works on local stand-ins (remote_dirs.py)
        self._remote: RemoteDirs | None = None
        if is_url(checkpoint_dir) or is_url(output_dir):
            from ..store.remote_output import RemoteDirs

            self._remote = RemoteDirs(
                checkpoint_dir, checkpoint_files, output_dir, resume=self._should_load_recipe_state,
                recipe_checkpoint=recipe_checkpoint, adapter_checkpoint=adapter_checkpoint,
                storage_options=storage_options, cache_dir=cache_dir,
            )
            checkpoint_dir, output_dir = self._remote.local_input, self._remote.local_output
        self._remote_out = self._remote is not None and self._remote.output is not None
        self._checkpoint_dir = Path(checkpoint_dir)
        self._model_type = _model_type(model_type)
        self._output_dir = Path(output_dir)
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

        self._recipe_checkpoint = self._resolve_recipe_checkpoint(recipe_checkpoint)
        self._resume_folder = self._pick_resume_folder()
        self._adapter_checkpoint = self._resolve_adapter_checkpoint(adapter_checkpoint)
        self._checkpoint_paths = self._resolve_model_paths(checkpoint_files)

        # filled by load_checkpoint (or lazily by save_checkpoint before any load)
        self._weight_map: dict[str, str] | None = None
        self._sources: list[SourceFile] = []
        self._key_source: dict[str, SourceFile] = {}
        self._aside: dict[str, torch.Tensor] = {}
        self._orig_index: tuple[Path, bytes, dict[str, Any]] | None = None
        self._notes: list[tuple[str, tuple[object, ...], str]] = []

        make_dir(self._output_dir)
        if self._should_load_recipe_state:
            logger.info(
                "Loading the recipe state using: \n\tcheckpoint_paths: %s\n\trecipe_checkpoint: %s"
                "\n\tadapter_checkpoint: %s",
                [str(p) for p in self._checkpoint_paths], self._recipe_checkpoint, self._adapter_checkpoint,
            )

    # ------------------------------------------------------------------ path resolution
    def _latest_checkpoint_folder(self) -> Path | None:
        """The newest complete ``epoch_N`` (else ``step_N``) folder of ``output_dir``: numeric order,
        files, temporary/incomplete folders (dot names) and empty folders ignored."""
        for prefix in ("epoch", "step"):
            latest = get_largest_iter_folder(self._output_dir, rf"^{prefix}_(\d+)$", skip_empty=True)
            if latest is not None:
                return self._output_dir / latest
        return None

    def _pick_resume_folder(self) -> Path | None:
        """The checkpoint folder to resume from when paths are not spelled out: the one the recipe
        state was saved with (so weights and optimizer state match, even if a later final save or a
        crash between publishing and committing the recipe state left a newer folder), else the latest."""
        latest = self._latest_checkpoint_folder()
        self._paired_folder: Path | None = None
        if self._recipe_checkpoint is None:
            return latest
        name = recipe_state_folder(self._recipe_checkpoint)
        if name is None:
            return latest
        if not (self._output_dir / name).is_dir():
            logger.warning(
                "The recipe state %s was saved with %s, which no longer exists; resuming from %s, so the "
                "weights and the optimizer state may not match",
                self._recipe_checkpoint, self._output_dir / name, latest,
            )
            return latest
        self._paired_folder = self._output_dir / name
        return self._paired_folder

    def _resolve_adapter_checkpoint(self, adapter_checkpoint: str | None) -> Path | None:
        """Explicit ``adapter_checkpoint`` (relative to ``output_dir``; must exist), else the adapter of
        the latest checkpoint folder: ``adapter_model.pt``, or a PEFT ``adapter_model.safetensors``/
        ``.bin`` (converted back to torchtune keys on load). None when not resuming or no adapter."""
        if not self._should_load_recipe_state:
            return None
        if adapter_checkpoint:
            p = user_path(self._output_dir, adapter_checkpoint, "adapter_checkpoint")
            if not p.is_file():
                raise ValueError(
                    f"adapter_checkpoint {adapter_checkpoint!r} not found: {p} does not exist "
                    "(it is resolved relative to output_dir)"
                )
            return p
        folder = self._resume_folder
        if folder is None:
            return None
        for ext in ("pt", "safetensors", "bin"):
            p = folder / f"{ADAPTER_MODEL_FNAME}.{ext}"
            if p.is_file():
                return p
        return None

    def _resolve_recipe_checkpoint(self, recipe_checkpoint: str | None) -> Path | None:
        if not self._should_load_recipe_state:
            return None
        p = (
            user_path(self._output_dir, recipe_checkpoint, "recipe_checkpoint")
            if recipe_checkpoint
            else self._output_dir / RECIPE_STATE_DIRNAME / "recipe_state.pt"
        )
        if not p.is_file():
            if self._latest_checkpoint_folder() is None:
                where = f"{self._output_dir} holds no checkpoint (no epoch_N/ or step_N/ folder) to resume from"
            else:
                where = (
                    f"the checkpoints in {self._output_dir} were saved without intermediate_checkpoint=True, "
                    "so there is no recipe state to resume from"
                )
            raise ValueError(
                "If should_load_recipe_state is True, recipe_checkpoint file must be provided. "
                f"No recipe state at {p}: {where} (pass recipe_checkpoint=..., relative to output_dir, "
                "or should_load_recipe_state=False to start a new run)."
            )
        return p

    def _resolve_model_paths(self, checkpoint_files: Any) -> list[Path]:
        """torchtune's rules: the base files in ``checkpoint_dir`` unless resuming a full fine-tune; then
        ``checkpoint_files`` relative to ``output_dir`` (``epoch_N/model-...``), or the same names in the
        latest checkpoint folder (also when given as absolute paths into ``checkpoint_dir``, which
        torchtune would silently resolve to the base weights)."""
        resuming_full = self._should_load_recipe_state and self._adapter_checkpoint is None
        if not resuming_full:  # torchtune's output names find a shardwise folder (e.g. a generation config)
            return resolve_checkpoint_files(checkpoint_files, self._checkpoint_dir, torchtune_names=True)
        latest = self._resume_folder
        try:
            paths = resolve_checkpoint_files(checkpoint_files, self._output_dir, torchtune_names=True)
        except ValueError as first:
            if latest is None:
                raise
            try:
                paths = resolve_checkpoint_files(checkpoint_files, latest, torchtune_names=True)
            except ValueError:
                raise first from None
            logger.info("Resuming a full fine-tune from %s", latest)
            return paths
        paired = self._paired_folder
        if paired is not None and not all(paired.resolve() in p.resolve().parents for p in paths):
            logger.warning(
                "checkpoint_files %s are not in %s, the checkpoint the recipe state was saved with: the "
                "weights and the optimizer state may not match",
                [str(p) for p in paths], paired,
            )
        ckpt = self._checkpoint_dir.resolve()
        if latest is not None and all(ckpt in p.resolve().parents for p in paths):
            moved = [latest / p.resolve().relative_to(ckpt) for p in paths]
            if all(m.is_file() for m in moved):
                logger.warning(
                    "Resuming a full fine-tune: checkpoint_files point into checkpoint_dir (the base weights); "
                    "loading the same files from %s instead",
                    latest,
                )
                return resolve_checkpoint_files([str(m) for m in moved], latest)
        return paths

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
        self._orig_index = self._matching_index(sources)
        return result.tune

    def _matching_index(self, sources: Sequence[SourceFile]) -> tuple[Path, bytes, dict[str, Any]] | None:
        folders = {s.path.parent for s in sources}
        if len(folders) != 1:
            return None
        kinds = {s.is_safetensors for s in sources}
        if len(kinds) != 1:
            return None
        found = read_index(next(iter(folders)), index_name(kinds.pop()))  # the loaded format's index
        if found is None:
            return None
        files = set(found[2]["weight_map"].values())
        return found if files == {s.name for s in sources} else None

    def load_checkpoint(self) -> dict[str, Any]:
        """Load the HF shards (zero-copy), convert to torchtune keys, and add the adapter and recipe
        state when resuming. Returns ``{"model": ..., ["adapter": ...], <recipe keys>...}``."""
        state: dict[str, Any] = {MODEL_KEY: self._load_model()}
        if self._adapter_checkpoint is not None:
            state[ADAPTER_KEY] = self._load_adapter(self._adapter_checkpoint)
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

    def _load_adapter(self, path: Path) -> dict[str, torch.Tensor]:
        """A torchtune ``adapter_model.pt``, or a PEFT ``adapter_model.safetensors``/``.bin`` (written by
        shardwise or by PEFT) converted back to torchtune keys."""
        metadata: dict[str, str] | None = None
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            try:
                with safe_open(str(path), framework="pt", device="cpu") as f:
                    metadata = f.metadata()
                    state: dict[str, Any] = {k: f.get_tensor(k) for k in f.keys()}
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"Unable to load checkpoint from {path}. ({e})") from e
        else:
            state = load_recipe_state(path)
        for k, v in state.items():
            if not isinstance(v, torch.Tensor):
                raise CheckpointError(f"{path}: adapter value for {k!r} is a {type(v).__name__}, not a tensor")
        if not any(k.startswith(peft.PEFT_PREFIX) for k in state):
            return state
        try:
            return peft.peft_to_tune_adapter_weights(state, self._model_type, self._config, metadata)
        except (ConversionError, peft.PeftExportError) as e:
            raise ConversionError(
                f"{path}: this PEFT adapter cannot be converted back to torchtune keys ({e}). Pass "
                f"adapter_checkpoint='<epoch_N>/{ADAPTER_MODEL_FNAME}.pt' (relative to output_dir), the "
                "torchtune-format adapter saved next to it"
            ) from e

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
    ) -> None:
        """Write ``output_dir/epoch_{epoch}/`` (or ``step_{step}/``): HF shards and index, adapter files,
        side files; with ``intermediate_checkpoint`` also ``output_dir/recipe_state/recipe_state.pt``.
        The folder appears only when complete; ``state_dict`` is not modified."""
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
            _check_tensors(model, "model")
        adapter = state_dict.get(ADAPTER_KEY)
        if adapter is not None:
            _check_tensors(adapter, "adapter")

        final = self._output_dir / f"{dir_prefix}_{number}"
        if _sharded(model, adapter):
            if self._remote_out:
                where = self._remote.output.url  # type: ignore[union-attr]
                raise NotImplementedError(
                    f"a sharded (DTensor) state dict cannot be saved to object storage yet ({where}): "
                    "save to a local or mounted output_dir"
                )
            from .collective import save_collective

            self._notes = []
            save_collective(self, state_dict, model, adapter, final, intermediate_checkpoint, cap)
            if _is_rank_zero():  # one rank speaks for the collective save, as torchtune's recipes do
                self._log_notes(final)
                logger.info("Checkpoint saved to %s (collectively: every rank wrote its own rows)", final)
                if self._keep_last_n is not None:
                    self._prune(dir_prefix, keep=final.name)
            return
        make_dir(self._output_dir)
        _remove_stale_leftovers(self._output_dir)
        staging = self._output_dir / f".{final.name}{STAGING_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        recipe_path = self._output_dir / RECIPE_STATE_DIRNAME / "recipe_state.pt"
        recipe_tmp: Path | None = None
        make_dir(staging, "staging folder")
        self._notes = []
        try:
            if self._remote_out:
                self._remote.begin(final.name)  # type: ignore[union-attr]
            if model is not None:
                self._write_model(model, staging, cap)
            self._write_adapter_files(state_dict, adapter, staging)
            copy_files(self._checkpoint_dir, staging)
            if intermediate_checkpoint:
                # staged before anything is published, so a write error leaves output_dir as it was
                recipe_tmp = stage_torch_save(
                    recipe_keys(state_dict, final.name), recipe_path, fsync=self._fsync,
                    tmp=self._output_dir / f".recipe_state.pt{STAGING_MARK}tmp-{os.getpid()}",
                )
            if self._remote_out:
                self._remote.publish(staging)  # type: ignore[union-attr]
            else:
                if self._fsync:
                    fsync_tree(staging)
                _core.publish_dir(str(staging), str(final))
        except BaseException:
            if self._remote_out:
                self._remote.discard()  # type: ignore[union-attr]
            shutil.rmtree(staging, ignore_errors=True)
            if recipe_tmp is not None:
                recipe_tmp.unlink(missing_ok=True)
            raise
        if self._remote_out:
            shutil.rmtree(staging, ignore_errors=True)
        where = self._remote.target_url if self._remote_out else final  # type: ignore[union-attr]
        self._log_notes(where)
        logger.info("Checkpoint saved to %s", where)
        # publish_dir deletes a replaced folder best-effort; whatever it left (at the staging name, or
        # renamed aside where the exchange is unsupported) is ours to remove, and worth a warning
        for leftover in (staging, final.with_name(f"{final.name}{STAGING_MARK}old-{os.getpid()}")):
            if leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)
                if leftover.exists():
                    logger.warning("Could not remove the replaced checkpoint left at %s", leftover)

        if recipe_tmp is not None:
            if self._remote_out:
                try:
                    self._remote.upload_recipe(recipe_tmp)  # type: ignore[union-attr]
                except BaseException:
                    recipe_tmp.unlink(missing_ok=True)
                    raise
            commit(recipe_tmp, recipe_path, fsync=self._fsync)
            logger.info("Recipe checkpoint of size %s saved to %s", _gib(recipe_path.stat().st_size), recipe_path)
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
        if self._keep_last_n is not None and self._remote_out:
            paired = recipe_state_folder(recipe_path) if recipe_path.is_file() else None
            self._remote.prune(dir_prefix, final.name, self._keep_last_n, paired)  # type: ignore[union-attr]
        elif self._keep_last_n is not None:
            self._prune(dir_prefix, keep=final.name)

    def _note(self, fmt: str, *args: object) -> None:
        """Keep a line about a file written into the staging folder (its path is the last argument);
        ``save_checkpoint`` logs it under the final folder name once the folder is published."""
        *head, path = args
        self._notes.append((fmt, tuple(head), Path(str(path)).name))

    def _log_notes(self, final: Path | str) -> None:
        """Log the kept lines with the paths a user will find (``final/<file>``; a URL on object storage)."""
        for fmt, args, name in self._notes:
            logger.info(fmt, *args, f"{final}/{name}")
        self._notes = []

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

    def _write_model(self, model: Mapping[str, torch.Tensor], folder: Path, cap: int | None) -> None:
        plan, ops = self._plan(model, cap)
        total_size = None
        check_sources_intact(self._sources)  # before any mapped page is read
        try:
            if self._safe_serialization and self._remote_out:
                self._remote.upload_shards(plan)  # type: ignore[union-attr]
            elif self._safe_serialization:
                write_safetensors_shards(plan, folder)
            else:
                total_size = write_torch_shards(plan, folder)
        except CheckpointIOError:
            check_sources_intact(self._sources)  # a read of a truncated mapping fails as the write (EFAULT)
            raise
        for shard in plan.shards:
            self._note("Model checkpoint of size %s saved to %s", _gib(shard.nbytes), folder / shard.name)
        if plan.write_index:
            original = None
            if self._orig_index is not None:
                original = (self._orig_index[1], self._orig_index[2])
            name = index_name(self._safe_serialization)
            (folder / name).write_bytes(index_bytes(plan, original, count_params(ops), total_size))

    def _write_adapter_files(
        self, state_dict: Mapping[str, Any], adapter: Mapping[str, torch.Tensor] | None, folder: Path
    ) -> None:
        """``adapter_model.pt`` (torchtune keys, for resuming), ``adapter_model.safetensors``/``.bin``
        (PEFT keys) and ``adapter_config.json`` (PEFT); PEFT files only where PEFT can represent the
        adapter exactly, otherwise a warning (as torchtune does for Phi and Llama-3.2-Vision)."""
        export: peft.PeftAdapter | None = None
        reason: str | None = None
        if not peft.supports_peft(self._model_type):
            reason = f"PEFT has no equivalent for ModelType.{self._model_type.name} adapters"
        if adapter is not None:
            pt = folder / f"{ADAPTER_MODEL_FNAME}.pt"
            save_torch_file({k: torch_ready(v) for k, v in adapter.items()}, pt)
            self._note("Adapter checkpoint of size %s saved to %s", _gib(pt.stat().st_size), pt)
            if reason is None:
                try:
                    export = peft.tune_to_peft_adapter(adapter, self._model_type, self._config)
                except peft.PeftExportError as e:
                    reason = str(e)
            if reason is not None:
                logger.warning(
                    "Saving %s adapter weights to PEFT format is not supported (%s), saving to torchtune "
                    "format instead",
                    self._model_type.name, reason,
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
                    state_dict[ADAPTER_CONFIG], self._model_type, self.repo_id, export, self._config
                )
            except peft.PeftExportError as e:
                reason = str(e)
        if cfg is None:
            logger.warning(
                "PEFT integration for %s is not supported (%s), skipping adapter config save",
                self._model_type.name, reason,
            )
            return
        out = folder / f"{ADAPTER_CONFIG_FNAME}.json"
        out.write_text(json.dumps(cfg, indent=2) + "\n")
        self._note("Adapter config saved to %s", out)

    def _write_peft_weights(self, export: peft.PeftAdapter, folder: Path) -> None:
        weights = {k: torch_ready(v) for k, v in export.weights.items()}
        if self._safe_serialization:
            out = folder / f"{ADAPTER_MODEL_FNAME}.safetensors"
            write_tensors(out, weights, export.metadata())
        else:
            out = folder / f"{ADAPTER_MODEL_FNAME}.bin"
            save_torch_file(weights, out)
        self._note("Adapter checkpoint of size %s saved to %s", _gib(out.stat().st_size), out)

    def _prune(self, prefix: str, keep: str | None = None) -> None:
        """Delete all but the newest ``keep_last_n_checkpoints`` complete ``{prefix}_N`` folders (never
        ``keep``, the one just saved). Each is first renamed to a temporary name, so a crash while
        deleting never leaves a partial folder that looks like a checkpoint."""
        assert self._keep_last_n is not None
        rx = re.compile(rf"^{prefix}_(\d+)$")
        found = []
        for name in os.listdir(self._output_dir):
            m = rx.match(name)
            if m and name != keep and not is_staging_name(name) and (self._output_dir / name).is_dir():
                found.append((int(m.group(1)), name))
        found.sort()
        surplus = max(0, len(found) + (1 if keep else 0) - self._keep_last_n)
        # never delete the folder this run reads from (a resume with checkpoint_dir=output_dir/epoch_N)
        in_use = [self._checkpoint_dir.resolve(), *(s.path.resolve() for s in self._sources)]
        paired = recipe_state_folder(self._output_dir / RECIPE_STATE_DIRNAME / "recipe_state.pt")
        if paired is not None:  # the weights that go with the recipe state a resume will load
            in_use.append((self._output_dir / paired).resolve())
        for _, name in found[:surplus]:
            folder = (self._output_dir / name).resolve()
            if any(p == folder or folder in p.parents for p in in_use):
                logger.info("Keeping old checkpoint %s: this run reads from it, or it goes with the recipe state", name)
                continue
            doomed = self._output_dir / f".{name}{STAGING_MARK}old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            try:
                os.rename(self._output_dir / name, doomed)
            except OSError as e:
                logger.warning("Could not remove old checkpoint %s: %s", self._output_dir / name, e)
                continue
            shutil.rmtree(doomed, ignore_errors=True)
            logger.info("Removed old checkpoint %s (keep_last_n_checkpoints=%d)", name, self._keep_last_n)
        if surplus and self._fsync:
            _core.fsync_dir(str(self._output_dir))


def _sharded(*dicts: Mapping[str, Any] | None) -> bool:
    """True when a state dict holds DTensors (FSDP2 / tensor parallel): such a save is collective.
    Checked without importing torch.distributed.tensor unless torch.distributed is in use."""
    import sys

    if "torch.distributed.tensor" not in sys.modules:
        return False
    from torch.distributed.tensor import DTensor

    return any(d is not None and any(isinstance(v, DTensor) for v in d.values()) for d in dicts)


def _is_rank_zero() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def _check_tensors(d: Any, what: str) -> None:
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


_LEFTOVER = re.compile(re.escape(STAGING_MARK) + r"(?:old-|tmp-)?(\d+)(?:-|$)")
_LEFTOVER_AGE = 3600.0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_leftovers(folder: Path) -> None:
    """Delete temporary checkpoint folders/files a crashed save left in ``folder``: names with the
    staging mark whose process is gone and that are older than an hour (another host may share the
    folder, so a live save there must never lose its staging folder)."""
    import time

    now = time.time()
    for entry in os.scandir(folder):
        m = _LEFTOVER.search(entry.name)
        if not m or not is_staging_name(entry.name) or int(m.group(1)) == os.getpid():
            continue
        try:
            if now - entry.stat(follow_symlinks=False).st_mtime < _LEFTOVER_AGE or _pid_alive(int(m.group(1))):
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                os.unlink(entry.path)
        except OSError:
            continue
