"""The one place that decides which backend a checkpointer's folders need (a path or a URL)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .output import Output

__all__ = ["open_dirs"]


def open_dirs(
    checkpoint_dir: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    *,
    weights: Sequence[str] = (),
    resume: bool = False,
    recipe_checkpoint: str | None = None,
    adapter_checkpoint: str | None = None,
    pairing: Callable[[Path], str | None] = lambda _: None,
    storage_options: Mapping[str, Any] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    fsync: bool = True,
) -> tuple[Path, Output]:
    """A checkpointer's folders: the local folder to read ``checkpoint_dir`` from (a URL's folder is
    mirrored into the download cache: its side files and the ``weights`` named relative to it) and
    the ``Output`` for ``output_dir``. On ``resume`` a remote output's recipe state and the complete
    folder it goes with (``pairing`` reads the folder name from a recipe-state file) are fetched."""
    from .url import is_url

    if not (is_url(checkpoint_dir) or is_url(output_dir)):
        from .local import LocalOutput

        return Path(checkpoint_dir), LocalOutput(Path(output_dir), fsync=fsync)
    from .remote_output import open_remote_dirs

    return open_remote_dirs(
        checkpoint_dir, output_dir, weights=weights, resume=resume, recipe_checkpoint=recipe_checkpoint,
        adapter_checkpoint=adapter_checkpoint, pairing=pairing, storage_options=storage_options,
        cache_dir=cache_dir, fsync=fsync,
    )
