"""torchtune's path rules for loading and resuming: which files ``checkpoint_files`` names, where the
recipe state and the adapter are, and which checkpoint folder a resume reads (the one the recipe
state was saved with, else the latest complete one)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .._logging import get_logger
from ..constants import ADAPTER_MODEL_FNAME, RECIPE_STATE_DIRNAME
from .files import get_largest_iter_folder, resolve_checkpoint_files, user_path
from .recipe_state import recipe_state_folder

__all__ = ["ResumePaths"]

logger = get_logger()


class ResumePaths:
    """The files one checkpointer reads, resolved once in its constructor (``model``, and when
    resuming ``recipe``, ``adapter``, ``folder``: the checkpoint folder resumed from)."""

    def __init__(
        self,
        checkpoint_dir: Path,
        output_dir: Path,
        checkpoint_files: Any,
        *,
        resuming: bool,
        recipe_checkpoint: str | None,
        adapter_checkpoint: str | None,
    ) -> None:
        self.checkpoint_dir = checkpoint_dir
        self.output_dir = output_dir
        self.resuming = resuming
        self.paired: Path | None = None
        self.recipe = self._resolve_recipe_checkpoint(recipe_checkpoint)
        self.folder = self._pick_resume_folder()
        self.adapter = self._resolve_adapter_checkpoint(adapter_checkpoint)
        self.model = self._resolve_model_paths(checkpoint_files)

    def latest_checkpoint_folder(self) -> Path | None:
        """The newest complete ``epoch_N`` (else ``step_N``) folder of ``output_dir``: numeric order,
        files, temporary/incomplete folders (dot names) and empty folders ignored."""
        for prefix in ("epoch", "step"):
            latest = get_largest_iter_folder(self.output_dir, rf"^{prefix}_(\d+)$", skip_empty=True)
            if latest is not None:
                return self.output_dir / latest
        return None

    def _pick_resume_folder(self) -> Path | None:
        """The checkpoint folder to resume from when paths are not spelled out: the one the recipe
        state was saved with (so weights and optimizer state match, even if a later final save or a
        crash between publishing and committing the recipe state left a newer folder), else the latest."""
        latest = self.latest_checkpoint_folder()
        if self.recipe is None:
            return latest
        name = recipe_state_folder(self.recipe)
        if name is None:
            return latest
        if not (self.output_dir / name).is_dir():
            logger.warning(
                "The recipe state %s was saved with %s, which no longer exists; resuming from %s, so the "
                "weights and the optimizer state may not match",
                self.recipe, self.output_dir / name, latest,
            )
            return latest
        self.paired = self.output_dir / name
        return self.paired

    def _resolve_adapter_checkpoint(self, adapter_checkpoint: str | None) -> Path | None:
        """Explicit ``adapter_checkpoint`` (relative to ``output_dir``; must exist), else the adapter of
        the latest checkpoint folder: ``adapter_model.pt``, or a PEFT ``adapter_model.safetensors``/
        ``.bin`` (converted back to torchtune keys on load). None when not resuming or no adapter."""
        if not self.resuming:
            return None
        if adapter_checkpoint:
            p = user_path(self.output_dir, adapter_checkpoint, "adapter_checkpoint")
            if not p.is_file():
                raise ValueError(
                    f"adapter_checkpoint {adapter_checkpoint!r} not found: {p} does not exist "
                    "(it is resolved relative to output_dir)"
                )
            return p
        folder = self.folder
        if folder is None:
            return None
        for ext in ("pt", "safetensors", "bin"):
            p = folder / f"{ADAPTER_MODEL_FNAME}.{ext}"
            if p.is_file():
                return p
        return None

    def _resolve_recipe_checkpoint(self, recipe_checkpoint: str | None) -> Path | None:
        if not self.resuming:
            return None
        p = (
            user_path(self.output_dir, recipe_checkpoint, "recipe_checkpoint")
            if recipe_checkpoint
            else self.output_dir / RECIPE_STATE_DIRNAME / "recipe_state.pt"
        )
        if not p.is_file():
            if self.latest_checkpoint_folder() is None:
                where = f"{self.output_dir} holds no checkpoint (no epoch_N/ or step_N/ folder) to resume from"
            else:
                where = (
                    f"the checkpoints in {self.output_dir} were saved without intermediate_checkpoint=True, "
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
        resuming_full = self.resuming and self.adapter is None
        if not resuming_full:  # torchtune's output names find a shardwise folder (e.g. a generation config)
            return resolve_checkpoint_files(checkpoint_files, self.checkpoint_dir, torchtune_names=True)
        latest = self.folder
        try:
            paths = resolve_checkpoint_files(checkpoint_files, self.output_dir, torchtune_names=True)
        except ValueError as first:
            if latest is None:
                raise
            try:
                paths = resolve_checkpoint_files(checkpoint_files, latest, torchtune_names=True)
            except ValueError:
                raise first from None
            logger.info("Resuming a full fine-tune from %s", latest)
            return paths
        paired = self.paired
        if paired is not None and not all(paired.resolve() in p.resolve().parents for p in paths):
            logger.warning(
                "checkpoint_files %s are not in %s, the checkpoint the recipe state was saved with: the "
                "weights and the optimizer state may not match",
                [str(p) for p in paths], paired,
            )
        ckpt = self.checkpoint_dir.resolve()
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

