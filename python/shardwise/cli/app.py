"""The ``shardwise`` command: ``inspect``, ``verify``, ``convert``, ``roundtrip``, ``compare``.

A thin layer over ``shardwise.report`` and ``shardwise.report.tunedir``. Exit codes: 0 ok, 1 a check failed,
2 usage or input error (one line on stderr, no traceback; ``SHARDWISE_DEBUG=1`` shows it), 130
interrupted (Ctrl-C: one line, nothing left behind). ``--json`` prints ``Report.to_dict()`` (schema
in the README, "Command line"). Everything beyond argparse is imported inside :func:`main`, so that a
Ctrl-C during start-up is handled too, and torch only by the commands that build tensors.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__

if TYPE_CHECKING:
    from ..report import Report

__all__ = ["main"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def _cmd_inspect(a: argparse.Namespace) -> Report:
    from ..report import inspect_checkpoint

    return inspect_checkpoint(a.path, tensors=a.tensors)


def _cmd_verify(a: argparse.Namespace) -> Report:
    from ..report import verify

    return verify(
        a.path, checksums=a.checksums, against=a.against, write_manifest=a.write_manifest, progress=not a.quiet
    )


@contextlib.contextmanager
def _starting(a: argparse.Namespace) -> Iterator[None]:
    """A ticking ``starting (import torch)`` line while the commands that build tensors import torch
    (seconds, before any bar of their own could be drawn)."""
    from ..report.progress import Progress

    with Progress(0, "starting (import torch)", enabled=not a.quiet) as bar, bar.ticking():
        yield


def _model_type_for(folder: str, given: str | None, force: bool, what: str) -> str | None:
    """``--model-type`` checked against ``folder/config.json`` (a contradiction is a usage error unless
    ``--force``), or inferred from it when omitted (an ambiguous config names the choices)."""
    from ..checkpointer.facade import _model_type
    from ..config import ModelConfig
    from ..model_types import infer_model_type, model_type_mismatch

    path = Path(folder) / "config.json"
    if not path.is_file():
        if given is None:
            raise _Usage(f"{what} needs --model-type (e.g. --model-type LLAMA3): {path} does not exist to infer it")
        return given
    cfg = ModelConfig.from_file(path)
    if given is None:
        return infer_model_type(cfg, str(path)).name
    mismatch = model_type_mismatch(_model_type(given), cfg, str(path))
    if mismatch is not None and not force:
        raise _Usage(f"{mismatch}; pass --force to go ahead anyway")
    return given


def _cmd_convert(a: argparse.Namespace) -> Report:
    with _local(a.src) as src, _published(a.dst, a.overwrite) as dst:
        with _starting(a):
            from ..report.tunedir import convert_checkpoint

            model_type = a.model_type
            if a.to == "tune" or model_type is not None:  # --to hf without one: the origin records it
                model_type = _model_type_for(str(src), model_type, a.force, f"convert --to {a.to}")
        report = convert_checkpoint(
            src, dst, model_type, to=a.to, max_shard_size=a.max_shard_size, overwrite=a.overwrite,
            progress=not a.quiet,
        )
    return _named(report, a.src, "output", a.dst)


def _cmd_roundtrip(a: argparse.Namespace) -> Report:
    with _local(a.path) as path:
        with _starting(a):
            import torch  # noqa: F401  (roundtrip needs it; imported under the start-up line)

            from ..report import roundtrip

            model_type = a.model_type
            if path is not None:
                model_type = _model_type_for(str(path), model_type, a.force, "roundtrip DIR")
        report = roundtrip(path, model_type, workdir=a.workdir, keep=a.keep, progress=not a.quiet)
    return _named(report, a.path)


def _cmd_compare(a: argparse.Namespace) -> Report:
    from ..report import compare

    with _local(a.expected) as expected, _local(a.actual) as actual:
        report = compare(expected, actual, strict_layout=a.strict_layout, progress=not a.quiet)
    return _named(report, a.expected, "other", a.actual)


# object storage (s3://, gs://, ...): inspect and verify read headers by ranged GETs themselves; the
# other commands work on copies in the download cache, and a remote output is uploaded when complete
def _is_url(path: str | None) -> bool:
    return path is not None and "://" in path


def _local(path: str | None) -> Any:
    if not _is_url(path):
        return contextlib.nullcontext(path)
    from ..store.remote_scan import local_copy

    return local_copy(path)  # type: ignore[arg-type]


def _published(path: str, overwrite: bool) -> Any:
    if not _is_url(path):
        return contextlib.nullcontext(path)
    from ..store.remote_scan import publish_folder

    return publish_folder(path, overwrite=overwrite)


def _named(report: Report, path: str | None, other_key: str | None = None, other: str | None = None) -> Report:
    """The report names the URLs the user gave, not the cache folders standing in for them."""
    if _is_url(path):
        report.path = str(path)
    if other_key is not None and _is_url(other):
        report.details[other_key] = other
    return report


class _Usage(Exception):
    """A usage error found after parsing (exit 2)."""


def _add_common(p: argparse.ArgumentParser, default: Any) -> None:
    """``--json`` and ``-q``: accepted before the subcommand (``default`` False) and after it
    (``default`` SUPPRESS, so that the subcommand does not reset what was given before it)."""
    p.add_argument("--json", action="store_true", default=default,
                   help="print a machine-readable JSON report on stdout")
    p.add_argument("-q", "--quiet", action="store_true", default=default,
                   help="no progress bar (it is drawn on stderr, and only when stderr is a terminal)")


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    common = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    _add_common(common, argparse.SUPPRESS)

    p = argparse.ArgumentParser(
        prog="shardwise",
        description="Inspect, verify, convert and round-trip Hugging Face / torchtune checkpoints.",
        epilog="Exit codes: 0 ok, 1 check failed, 2 usage or input error, 130 interrupted.",
        allow_abbrev=False,
    )
    p.add_argument("--version", action="version", version=f"shardwise {__version__}")
    _add_common(p, False)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    subs: dict[str, argparse.ArgumentParser] = {}

    def add(name: str, help: str, run: Callable[[argparse.Namespace], Report], **kw: Any) -> argparse.ArgumentParser:
        s = sub.add_parser(name, parents=[common], help=help, description=help, allow_abbrev=False, **kw)
        s.set_defaults(run=run)
        subs[name] = s
        return s

    s = add("inspect", "shards, tensors, dtypes, bytes, metadata (headers only)", _cmd_inspect)
    s.add_argument("path", help="a checkpoint folder or one .safetensors/.bin/.pt file")
    s.add_argument("--tensors", action="store_true", help="list every tensor (name, dtype, shape, offsets, shard)")

    s = add("verify", "integrity of a checkpoint folder (exit 1 on problems)", _cmd_verify)
    s.add_argument("path", metavar="DIR", help="a checkpoint folder (or one file)")
    s.add_argument("--checksums", action="store_true", help="compute per-file sha256 in parallel")
    s.add_argument("--write-manifest", metavar="FILE",
                   help="write the sizes and sha256 of every file (weights, index, config and tokenizer files) to FILE")
    s.add_argument("--against", metavar="MANIFEST", help="compare sizes and sha256 with a manifest")

    s = add("convert", "HF checkpoint ⇄ torchtune-keyed safetensors folder", _cmd_convert)
    s.add_argument("src", metavar="SRC", help="input checkpoint folder")
    s.add_argument("dst", metavar="DST", help="output folder (published atomically; must be new or empty)")
    s.add_argument("--to", required=True, choices=["tune", "hf"],
                   help="tune: HF → torchtune keys; hf: a folder written by --to tune → HF")
    s.add_argument("--model-type", metavar="X",
                   help="ModelType name, e.g. LLAMA3 (default: --to tune from config.json, --to hf from the origin)")
    s.add_argument("--force", action="store_true", help="go ahead when --model-type contradicts config.json")
    s.add_argument("--max-shard-size", metavar="SIZE", help="re-shard: 5GB, 500MiB or bytes")
    s.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")

    s = add("roundtrip", "HF → torchtune → HF and compare (exit 1 on differences)", _cmd_roundtrip)
    s.add_argument("path", metavar="DIR", nargs="?", help="checkpoint folder (default: a generated sample)")
    s.add_argument("--model-type", metavar="X", help="ModelType name, e.g. LLAMA3 (default: from DIR/config.json)")
    s.add_argument("--force", action="store_true", help="go ahead when --model-type contradicts config.json")
    s.add_argument("--workdir", metavar="DIR", help="where to put the temporary folder (default: system temp)")
    s.add_argument("--keep", metavar="DIR",
                   help="keep every intermediate folder in DIR: sample/ (the generated sample, without a "
                        "checkpoint DIR), tune/ (torchtune keys), hf/ (converted back), checkpointer/epoch_0/ "
                        "(FullModelHFCheckpointer load → save); a DIR kept by an earlier run is replaced")

    s = add("compare", "compare two checkpoints: bytes, tensors by name, side files (exit 1: differ)", _cmd_compare)
    s.add_argument("expected", metavar="EXPECTED", help="reference checkpoint folder (or file)")
    s.add_argument("actual", metavar="ACTUAL", help="checkpoint folder (or file) to check")
    s.add_argument("--strict-layout", action="store_true",
                   help="fail (exit 1) when the same tensors are sharded differently")
    return p, subs


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        text = f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    else:
        text = str(e.args[0]) if isinstance(e, KeyError) and e.args and type(e) is KeyError else str(e)
    return " ".join(text.split()) or type(e).__name__


def _error_path(e: BaseException, message: str, a: argparse.Namespace) -> str | None:
    """The file or folder an error is about: the OSError's file name, else the path the message
    starts with, else the command's first argument."""
    filename = getattr(e, "filename", None)
    if filename:
        return str(filename)
    head = message.split(": ", 1)[0]
    if head != message and ("/" in head or Path(head).exists()):
        return head
    for arg in ("path", "src", "expected"):
        if getattr(a, arg, None):
            return str(getattr(a, arg))
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    command = ""
    try:
        parser, subs = _parser()
        args, extra = parser.parse_known_args(argv)
        if extra:  # a typo in a subcommand's option: that subcommand's usage, not the top-level one
            subs[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
        command = f" {args.command}"
        code = _run(args)
        if argv is None:  # the program itself: the work is done, a late Ctrl-C must not break the exit
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        return code
    except KeyboardInterrupt:  # the work's own handlers have removed what it had started
        print(f"shardwise{command}: interrupted", file=sys.stderr)
        if argv is None:  # the program itself: exit 130 even where an interrupted import (torch runs
            sys.stdout.flush()  # code through PyRun_*) has latched "die by SIGINT at exit" in CPython
            sys.stderr.flush()
            os._exit(EXIT_INTERRUPTED)
        return EXIT_INTERRUPTED


def _run(args: argparse.Namespace) -> int:
    import logging

    from .._logging import LOGGER_NAME
    from ..errors import CheckpointError
    from ..report import SCHEMA_VERSION

    # the report says what happened; the library's log lines (saved to ..., warnings the report repeats)
    # would only clutter stderr, which holds at most the one error line
    logging.getLogger(LOGGER_NAME).setLevel(logging.DEBUG if os.environ.get("SHARDWISE_DEBUG") else logging.ERROR)
    input_errors = (CheckpointError, OSError, NotImplementedError, KeyError, ValueError, _Usage)
    run: Callable[[argparse.Namespace], Report] = args.run
    try:
        report = run(args)
    except input_errors as e:
        if os.environ.get("SHARDWISE_DEBUG"):
            raise
        message = _one_line(e)
        print(f"shardwise {args.command}: error: {message}", file=sys.stderr)
        if args.json:
            error = {"type": "UsageError" if isinstance(e, _Usage) else type(e).__name__, "message": message,
                     "path": _error_path(e, message, args)}
            _emit(json.dumps({"schema": SCHEMA_VERSION, "command": args.command, "ok": False, "error": error}))
        return EXIT_USAGE
    _emit(report.to_json() if args.json else report.summary())
    return report.exit_code


def _emit(text: str) -> None:
    try:
        print(text, flush=True)
    except BrokenPipeError:  # `shardwise inspect ... | head`
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
