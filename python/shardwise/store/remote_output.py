"""An ``Output`` on object storage (``output_dir`` given as a URL), and the mirror of a remote
``checkpoint_dir``.

A remote ``checkpoint_dir`` is mirrored into the download cache (side files, and the weight files
``checkpoint_files`` names, each downloaded once) and read from there exactly like a local folder, so
its tensors are the same zero-copy views. A remote ``output_dir`` has a local work folder in the
cache (staging of the small files, the recipe state, and on resume the checkpoint to resume from);
the shards go straight from tensor memory to the store (``upload.upload_files``) and a folder is
published by the completion-marker rule (``marker``): files first, the marker last.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .._logging import get_logger
from ..constants import RECIPE_STATE_DIRNAME
from ..errors import CheckpointIOError
from .cache import download, mirror, mirror_folder
from .fsspec import Remote, remote
from .local import LocalOutput, make_dir, remove_leftovers, staging_path
from .marker import (
    CHECKPOINT_NAME,
    COMPLETE_MARKER,
    begin_save,
    checkpoint_folders,
    discard,
    finish_save,
    latest_complete,
    remove_dead_saves,
)
from .output import Output, ShardBytes
from .upload import upload_files, upload_tree
from .url import is_url

__all__ = ["RemoteOutput", "open_remote_dirs"]

logger = get_logger()


def open_remote_dirs(
    checkpoint_dir: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    *,
    weights: Sequence[str],
    resume: bool,
    recipe_checkpoint: str | None,
    adapter_checkpoint: str | None,
    pairing: Callable[[Path], str | None],
    storage_options: Mapping[str, Any] | None,
    cache_dir: str | os.PathLike[str] | None,
    fsync: bool,
) -> tuple[Path, Output]:
    """``store.output.open_dirs`` when either folder is a URL."""
    source = remote(str(checkpoint_dir), storage_options) if is_url(checkpoint_dir) else None
    out: Output
    if is_url(output_dir):
        target = remote(str(output_dir), storage_options)
        _check_not_inside(source, target)
        out = RemoteOutput(target, source, cache_dir)
        out.sync(resume, recipe_checkpoint, adapter_checkpoint, weights, pairing)
    else:
        out = LocalOutput(Path(output_dir), fsync=fsync)
    if source is None:
        return Path(checkpoint_dir), out
    # a resumed full fine-tune reads its weights from output_dir: then the names need not be here
    return mirror(source, [n for n in weights if not os.path.isabs(n)], cache_dir, strict=not resume), out


def _check_not_inside(source: Remote | None, target: Remote) -> None:
    if source is None or source.fs.protocol != target.fs.protocol:
        return
    a, b = source.path.rstrip("/"), target.path.rstrip("/")
    if b == a or b.startswith(a + "/"):
        raise ValueError(
            "The output directory cannot be the same as or a subdirectory of the checkpoint directory. "
            f"Found ckpt_dir={source.url} and out_dir={target.url}."
        )


class RemoteOutput(Output):
    """``output_dir`` on object storage, with a local work folder standing in for it."""

    collective = False

    def __init__(self, target: Remote, source: Remote | None, cache_dir: str | os.PathLike[str] | None) -> None:
        self.output = target
        self.input = source
        self.folder = mirror_folder(target, cache_dir)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._target: Remote | None = None
        self._staging: Path | None = None
        self._shard_sizes: dict[str, int] = {}

    # ------------------------------------------------------------------ reading
    def sync(
        self, resume: bool, recipe_checkpoint: str | None, adapter_checkpoint: str | None,
        weights: Sequence[str], pairing: Callable[[Path], str | None],
    ) -> None:
        """Make the local work folder show the remote output folder as resume needs it: no checkpoint
        folder that is not complete remotely; on resume, the recipe state and the complete folder(s)
        it may read (the one the recipe state goes with, else the latest; any folder the explicit
        names point into)."""
        complete = {n for p in ("epoch", "step") for n, ok in checkpoint_folders(self.output, p).items() if ok}
        wanted: set[str] = set()
        if resume:
            recipe = recipe_checkpoint or f"{RECIPE_STATE_DIRNAME}/recipe_state.pt"
            named = [recipe, *([adapter_checkpoint] if adapter_checkpoint else []),
                     *[n for n in weights if not os.path.isabs(n)]]
            wanted |= {n.split("/", 1)[0] for n in named if "/" in n} & complete
            self._fetch_file(recipe)
            local = self.folder / recipe
            paired = pairing(local) if local.is_file() else None
            if paired in complete:
                wanted.add(paired)
            else:
                for prefix in ("epoch", "step"):
                    latest = latest_complete(self.output, prefix)
                    if latest is not None:
                        wanted.add(latest)
                        break
        for entry in list(self.folder.iterdir()):
            if entry.is_dir() and CHECKPOINT_NAME.match(entry.name) and entry.name not in wanted:
                shutil.rmtree(entry, ignore_errors=True)  # a local copy of a folder we do not read
        for name in sorted(wanted):
            self._fetch_folder(name)

    def _fetch_file(self, rel: str) -> None:
        r = self.output.join(rel)
        parent = self.output.join(rel.rsplit("/", 1)[0]) if "/" in rel else self.output
        info = parent.listing().get(r.name)
        local = self.folder.joinpath(*rel.split("/"))
        if info is None or info.get("type") == "directory":
            local.unlink(missing_ok=True)  # gone remotely: the checkpointer then reports it missing
            return
        download([(r, info, local)])

    def _fetch_folder(self, name: str) -> None:
        folder = self.output.join(name)
        found = folder.walk_files()
        local = self.folder / name
        jobs = [(folder.join(rel), info, local.joinpath(*rel.split("/")))
                for rel, info in found.items() if not rel.rsplit("/", 1)[-1].startswith(".")]
        download(jobs)
        keep = {j[2] for j in jobs}
        for root, _dirs, files in os.walk(local):
            for f in files:
                p = Path(root) / f
                if p not in keep and not f.startswith("."):
                    p.unlink()  # no longer in the remote folder

    # ------------------------------------------------------------------ writing
    def where(self, name: str | None = None) -> str:
        return self.output.url if name is None else self.output.join(name).url

    def begin(self, name: str) -> Path:
        """Remove what dead saves left, then take the folder over (its saving marker)."""
        self._target = None  # until this save owns the folder, a failure must not delete anything
        remove_dead_saves(self.output, keep=[name])
        target = self.output.join(name)
        begin_save(target)
        self._target = target
        self._shard_sizes = {}
        remove_leftovers(self.folder)
        staging = staging_path(self.folder / name)
        make_dir(staging, "staging folder")
        self._staging = staging
        return staging

    def write_files(self, groups: Iterable[Sequence[ShardBytes]]) -> None:
        """Every shard uploaded straight from tensor memory (multipart where the store has it)."""
        target = self._require()
        for files in groups:
            upload_files(target, files)
            for name, header, pieces in files:
                self._shard_sizes[name] = len(header) + sum(memoryview(b).nbytes for _, b in pieces)
            del files

    def publish(self) -> str:
        """Index, adapters and side files (staged locally) after the shards, then the marker, last."""
        target = self._require()
        assert self._staging is not None
        files = dict(self._shard_sizes)
        files.update(upload_tree(self._staging, target))
        finish_save(target, files)
        shutil.rmtree(self._staging, ignore_errors=True)
        self._staging = self._target = None
        return target.url

    def discard(self) -> None:
        """Remove what a failed save uploaded (best effort), and forget it."""
        if self._target is not None:
            discard(self._target)
            self._target = None
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None

    def send(self, local: Path, rel: str) -> None:
        """One object, replaced whole (a PUT or a completed multipart upload)."""
        self.output.join(*rel.split("/")).put_file(local)

    def _require(self) -> Remote:
        if self._target is None:
            raise RuntimeError("RemoteOutput: begin() was not called (or the save was already published)")
        return self._target

    def prune(self, prefix: str, keep: str, keep_n: int, paired: str | None, reads: Sequence[Path] = ()) -> None:
        """Delete all but the newest ``keep_n`` complete ``{prefix}_N`` folders: marker first (so a
        crash while deleting leaves an incomplete folder, never a broken complete one), then the rest.
        The folder just saved, the one the recipe state goes with and one this run reads are kept."""
        folders = checkpoint_folders(self.output, prefix)
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
                folder.join(COMPLETE_MARKER).remove()
                folder.remove(recursive=True)
            except CheckpointIOError as e:
                logger.warning("Could not remove old checkpoint %s: %s", folder.url, e)
                continue
            logger.info("Removed old checkpoint %s (keep_last_n_checkpoints=%d)", folder.url, keep_n)

    def _in_use(self) -> Iterable[str]:
        if self.input is None or self.input.fs.protocol != self.output.fs.protocol:
            return []
        base = self.output.path.rstrip("/") + "/"
        if self.input.path.startswith(base):
            return [self.input.path[len(base):].split("/", 1)[0]]
        return []

