"""What the commands share: local stand-ins for URLs, the start-up line while torch imports, the
``--model-type`` check, and the usage error (exit 2) found after parsing."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..report import Report

__all__ = ["UsageError", "local", "model_type_for", "named", "published", "say", "starting"]


@contextlib.contextmanager
def starting(a: argparse.Namespace) -> Iterator[None]:
    """A ticking ``starting (import torch)`` line while the commands that build tensors import torch
    (seconds, before any bar of their own could be drawn)."""
    from ..report.progress import Progress

    with Progress(0, "starting (import torch)", enabled=not a.quiet) as bar, bar.ticking():
        _import_torch()
        yield


def _import_torch() -> None:
    """``import torch`` with Ctrl-C held until it is done: a ``KeyboardInterrupt`` raised inside the
    Python callbacks torch's C++ initialisation runs aborts the process (pybind11: "terminate called
    ..."), so the interrupt is raised right after the import instead."""
    import signal
    import threading

    if "torch" in sys.modules or threading.current_thread() is not threading.main_thread():
        import torch  # noqa: F401
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        import torch  # noqa: F401
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
    if caught:
        raise KeyboardInterrupt


def model_type_for(folder: str, given: str | None, force: bool, what: str) -> tuple[str | None, str | None]:
    """``--model-type`` checked against ``folder/config.json`` (a contradiction is a usage error unless
    ``--force``), or inferred from it when omitted: among members that convert identically the
    config's hints pick one (the second value says which and why: ``say`` prints it); a choice that
    would change the bytes is a usage error naming the choices."""
    from ..config import ModelConfig
    from ..model_types import model_type_mismatch, parse_model_type, pick_model_type

    path = Path(folder) / "config.json"
    if not path.is_file():
        if given is None:
            raise UsageError(f"{what} needs --model-type (e.g. --model-type LLAMA3): {path} does not exist to infer it")
        return given, None
    cfg = ModelConfig.from_file(path)
    if given is None:
        chosen, note = pick_model_type(cfg, str(path))
        return chosen.name, note
    mismatch = model_type_mismatch(parse_model_type(given), cfg, str(path))
    if mismatch is not None and not force:
        raise UsageError(f"{mismatch}; pass --force to go ahead anyway")
    return given, None


# object storage (s3://, gs://, ...): inspect and verify read headers by ranged GETs themselves; the
# other commands work on local copies (the download cache), and a remote output is uploaded when complete
def local(path: str | None) -> Any:
    if path is None:
        return contextlib.nullcontext(path)
    from ..store.copies import local_copy

    return local_copy(path)


def published(path: str, overwrite: bool) -> Any:
    from ..store.copies import publish_folder

    return publish_folder(path, overwrite=overwrite)


def named(report: Report, path: str | None, other_key: str | None = None, other: str | None = None) -> Report:
    """The report names the paths the user gave (URLs), not the cache folders standing in for them."""
    if path is not None:
        report.path = str(path)
    if other_key is not None and other is not None:
        report.details[other_key] = other
    return report


class UsageError(Exception):
    """A usage error found after parsing (exit 2)."""


def say(note: str | None, a: argparse.Namespace) -> None:
    """One line on stderr about a choice made for the user (unless ``-q``)."""
    if note is not None and not a.quiet:
        print(f"shardwise {a.command}: {note}", file=sys.stderr, flush=True)
