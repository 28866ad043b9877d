"""``FullModelHFCheckpointer`` on object storage: ``checkpoint_dir`` / ``output_dir`` given as URLs.

The checkpointer keeps working on local folders: a remote ``checkpoint_dir`` is mirrored into the
download cache (side files, and the weight files ``checkpoint_files`` names, each downloaded once)
and read from there exactly like a local folder, so its tensors are the same zero-copy views. A
remote ``output_dir`` has a local work folder in the cache (staging of the small files, the recipe
state, and on resume the checkpoint to resume from); the model shards go straight from tensor memory
to the store (``remote.upload_files``) and a folder is published by the completion-marker rule.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ..constants import RECIPE_STATE_DIRNAME
from ..errors import CheckpointIOError
from ..format.layout import SavePlan, shard_bytes
from ..format.paths import checkpoint_file_names
from . import fsspec as rm

__all__ = ["RemoteDirs"]

logger = logging.getLogger("shardwise")


class RemoteDirs:
    """The remote side of one checkpointer: what it reads from and writes to, and the local folders
    standing in for them."""

    def __init__(
        self,
        checkpoint_dir: str | os.PathLike[str],
        checkpoint_files: Any,
        output_dir: str | os.PathLike[str],
        *,
        resume: bool = False,
        recipe_checkpoint: str | None = None,
        adapter_checkpoint: str | None = None,
        storage_options: Mapping[str, Any] | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.input = rm.remote(str(checkpoint_dir), storage_options) if rm.is_url(checkpoint_dir) else None
        self.output = rm.remote(str(output_dir), storage_options) if rm.is_url(output_dir) else None
        self._cache_dir = cache_dir
        self._target: rm.Remote | None = None
        self._shard_sizes: dict[str, int] = {}
        self._check_not_inside()
        if self.output is not None:
            self.local_output = rm.mirror_folder(self.output, cache_dir)
            self.local_output.mkdir(parents=True, exist_ok=True)
            self._sync_output(resume, recipe_checkpoint, adapter_checkpoint, checkpoint_files)
        else:
            self.local_output = Path(output_dir)
        if self.input is not None:
            # a resumed full fine-tune reads its weights from output_dir: then the names need not be here
            self.local_input = rm.mirror(self.input, self._weights(checkpoint_files), cache_dir, strict=not resume)
        else:
            self.local_input = Path(checkpoint_dir)

    # ------------------------------------------------------------------ reading
    def _check_not_inside(self) -> None:
        if self.input is None or self.output is None or self.input.fs.protocol != self.output.fs.protocol:
            return
        a, b = self.input.path.rstrip("/"), self.output.path.rstrip("/")
        if b == a or b.startswith(a + "/"):
            raise ValueError(
                "The output directory cannot be the same as or a subdirectory of the checkpoint directory. "
                f"Found ckpt_dir={self.input.url} and out_dir={self.output.url}."
            )

    @staticmethod
    def _weights(checkpoint_files: Any) -> list[str]:
        return [n for n in checkpoint_file_names(checkpoint_files) if not os.path.isabs(n)]

    def _sync_output(
        self, resume: bool, recipe_checkpoint: str | None, adapter_checkpoint: str | None, checkpoint_files: Any
    ) -> None:
        """Make the local work folder show the remote output folder as resume needs it: no checkpoint
        folder that is not complete remotely; on resume, the recipe state and the complete folder(s)
        it may read (the one the recipe state goes with, else the latest; any folder the explicit
        names point into)."""
        assert self.output is not None
        complete = {n for p in ("epoch", "step") for n, ok in rm.checkpoint_folders(self.output, p).items() if ok}
        wanted: set[str] = set()
        if resume:
            recipe = recipe_checkpoint or f"{RECIPE_STATE_DIRNAME}/recipe_state.pt"
            named = [recipe, *([adapter_checkpoint] if adapter_checkpoint else []),
                     *[n for n in checkpoint_file_names(checkpoint_files) if not os.path.isabs(n)]]
            wanted |= {n.split("/", 1)[0] for n in named if "/" in n} & complete
            self._fetch_file(recipe)
            paired = self._paired(self.local_output / recipe)
            if paired in complete:
                wanted.add(paired)
            else:
                for prefix in ("epoch", "step"):
                    latest = rm.latest_complete(self.output, prefix)
                    if latest is not None:
                        wanted.add(latest)
                        break
        for entry in list(self.local_output.iterdir()):
            if entry.is_dir() and rm.CHECKPOINT_NAME.match(entry.name) and entry.name not in wanted:
                shutil.rmtree(entry, ignore_errors=True)  # a local copy of a folder we do not read
        for name in sorted(wanted):
            self._fetch_folder(name)

    def _fetch_file(self, rel: str) -> None:
        assert self.output is not None
        r = self.output.join(rel)
        parent = self.output.join(rel.rsplit("/", 1)[0]) if "/" in rel else self.output
        info = parent.listing().get(r.name)
        local = self.local_output.joinpath(*rel.split("/"))
        if info is None or info.get("type") == "directory":
            local.unlink(missing_ok=True)  # gone remotely: the checkpointer then reports it missing
            return
        rm.download([(r, info, local)])

    def _fetch_folder(self, name: str) -> None:
        assert self.output is not None
        folder = self.output.join(name)
        found = folder.walk_files()
        local = self.local_output / name
        jobs = [(folder.join(rel), info, local.joinpath(*rel.split("/")))
                for rel, info in found.items() if not rel.rsplit("/", 1)[-1].startswith(".")]
        rm.download(jobs)
        keep = {j[2] for j in jobs}
        for root, _dirs, files in os.walk(local):
            for f in files:
                p = Path(root) / f
                if p not in keep and not f.startswith("."):
                    p.unlink()  # no longer in the remote folder

    @staticmethod
    def _paired(recipe: Path) -> str | None:
        if not recipe.is_file():
            return None
        from ..checkpointer.recipe_state import recipe_state_folder

        return recipe_state_folder(recipe)

    # ------------------------------------------------------------------ writing
    def begin(self, name: str) -> None:
        """Start saving ``output_dir/name``: remove what dead saves left, then take the folder over."""
        assert self.output is not None
        self._target = None  # until this save owns the folder, a failure must not delete anything
        rm.remove_dead_saves(self.output, keep=[name])
        target = self.output.join(name)
        rm.begin_save(target)
        self._target = target
        self._shard_sizes = {}

    @property
    def target_url(self) -> str:
        assert self._target is not None
        return self._target.url

    def upload_shards(self, plan: SavePlan) -> None:
        """Every safetensors shard of ``plan``, uploaded straight from tensor memory."""
        assert self._target is not None
        for files in shard_bytes(plan):
            rm.upload_files(self._target, files)
            for name, header, pieces in files:
                self._shard_sizes[name] = len(header) + sum(memoryview(b).nbytes for _, b in pieces)
            del files

    def publish(self, staging: Path) -> None:
        """Index, adapters and side files (staged locally) after the shards, then the marker, last."""
        assert self._target is not None
        files = dict(self._shard_sizes)
        files.update(rm.upload_tree(staging, self._target))
        rm.finish_save(self._target, files)

    def discard(self) -> None:
        """Remove what a failed save uploaded (best effort), and forget it."""
        if self._target is not None:
            rm.discard(self._target)
            self._target = None

    def upload_recipe(self, local: Path) -> None:
        """The recipe state: one object, replaced whole (a PUT or a completed multipart upload)."""
        assert self.output is not None
        self.output.join(RECIPE_STATE_DIRNAME, "recipe_state.pt").put_file(local)

    def prune(self, prefix: str, keep: str, keep_n: int, paired: str | None) -> None:
        """Delete all but the newest ``keep_n`` complete ``{prefix}_N`` folders: marker first (so a
        crash while deleting leaves an incomplete folder, never a broken complete one), then the rest.
        The folder just saved, the one the recipe state goes with and one this run reads are kept."""
        assert self.output is not None
        folders = rm.checkpoint_folders(self.output, prefix)
        found = sorted((int(n.rsplit("_", 1)[1]), n) for n, ok in folders.items() if ok and n != keep)
        surplus = max(0, len(found) + 1 - keep_n)
        in_use = set(self._in_use())
        if paired:
            in_use.add(paired)
        for _, name in found[:surplus]:
            if name in in_use:
                logger.info("Keeping old checkpoint %s: this run reads from it, or it goes with the recipe state", name)
                continue
            folder = self.output.join(name)
            try:
                folder.join(rm.COMPLETE_MARKER).remove()
                folder.remove(recursive=True)
            except CheckpointIOError as e:
                logger.warning("Could not remove old checkpoint %s: %s", folder.url, e)
                continue
            logger.info("Removed old checkpoint %s (keep_last_n_checkpoints=%d)", folder.url, keep_n)

    def _in_use(self) -> Iterable[str]:
        if self.input is None or self.output is None or self.input.fs.protocol != self.output.fs.protocol:
            return []
        base = self.output.path.rstrip("/") + "/"
        if self.input.path.startswith(base):
            return [self.input.path[len(base):].split("/", 1)[0]]
        return []

