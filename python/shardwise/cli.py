"""The ``shardwise`` command: ``inspect``, ``verify``, ``convert``, ``roundtrip``, ``compare``.

A thin layer over ``shardwise.report`` and ``shardwise.tunedir``. Exit codes: 0 ok, 1 a check failed,
2 usage or input error (one line on stderr, no traceback; ``SHARDWISE_DEBUG=1`` shows it).
``--json`` prints ``Report.to_dict()`` (schema in the README, "Command line").
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from . import __version__
from ._logging import LOGGER_NAME
from .errors import CheckpointError
from .report import SCHEMA_VERSION, Report, compare, inspect_checkpoint, roundtrip, verify

__all__ = ["main"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _cmd_inspect(a: argparse.Namespace) -> Report:
    return inspect_checkpoint(a.path, tensors=a.tensors)


def _cmd_verify(a: argparse.Namespace) -> Report:
    return verify(
        a.path, checksums=a.checksums, against=a.against, write_manifest=a.write_manifest, progress=not a.quiet
    )


def _model_type_for(folder: str, given: str | None, force: bool, what: str) -> str | None:
    """``--model-type`` checked against ``folder/config.json`` (a contradiction is a usage error unless
    ``--force``), or inferred from it when omitted (an ambiguous config names the choices)."""
    from .checkpointer import _model_type
    from .config import ModelConfig
    from .model_types import infer_model_type, model_type_mismatch

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
    from .tunedir import ORIGIN_NAME, convert_checkpoint

    model_type = a.model_type
    if a.to == "tune" or (model_type is None and not (Path(a.src) / ORIGIN_NAME).exists()):
        model_type = _model_type_for(a.src, model_type, a.force, f"convert --to {a.to}")
    elif model_type is not None:
        model_type = _model_type_for(a.src, model_type, a.force, "convert")
    return convert_checkpoint(
        a.src, a.dst, model_type, to=a.to, max_shard_size=a.max_shard_size, overwrite=a.overwrite,
        progress=not a.quiet,
    )


def _cmd_roundtrip(a: argparse.Namespace) -> Report:
    model_type = a.model_type
    if a.path is not None:
        model_type = _model_type_for(a.path, model_type, a.force, "roundtrip DIR")
    return roundtrip(a.path, model_type, workdir=a.workdir, keep=a.keep, progress=not a.quiet)


def _cmd_compare(a: argparse.Namespace) -> Report:
    return compare(a.expected, a.actual, progress=not a.quiet)


class _Usage(Exception):
    """A usage error found after parsing (exit 2)."""


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print a machine-readable JSON report on stdout")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bar (it is shown on a TTY only)")

    p = argparse.ArgumentParser(
        prog="shardwise",
        description="Inspect, verify, convert and round-trip Hugging Face / torchtune checkpoints.",
        epilog="Exit codes: 0 ok, 1 check failed, 2 usage or input error.",
    )
    p.add_argument("--version", action="version", version=f"shardwise {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    s = sub.add_parser("inspect", parents=[common], help="shards, tensors, dtypes, bytes, metadata (headers only)")
    s.add_argument("path", help="a checkpoint folder or one .safetensors/.bin/.pt file")
    s.add_argument("--tensors", action="store_true", help="list every tensor (name, dtype, shape, offsets, shard)")
    s.set_defaults(run=_cmd_inspect)

    s = sub.add_parser("verify", parents=[common], help="integrity of a checkpoint folder (exit 1 on problems)")
    s.add_argument("path", metavar="DIR", help="a checkpoint folder (or one file)")
    s.add_argument("--checksums", action="store_true", help="compute per-file sha256 in parallel")
    s.add_argument("--write-manifest", metavar="FILE", help="write the sizes and sha256 of every file to FILE")
    s.add_argument("--against", metavar="MANIFEST", help="compare sizes and sha256 with a manifest")
    s.set_defaults(run=_cmd_verify)

    s = sub.add_parser("convert", parents=[common], help="HF checkpoint ⇄ torchtune-keyed safetensors folder")
    s.add_argument("src", metavar="SRC", help="input checkpoint folder")
    s.add_argument("dst", metavar="DST", help="output folder (published atomically; must be new or empty)")
    s.add_argument("--to", required=True, choices=["tune", "hf"], help="direction")
    s.add_argument("--model-type", metavar="X",
                   help="ModelType name, e.g. LLAMA3 (default: from SRC's shardwise-origin.json or config.json)")
    s.add_argument("--force", action="store_true", help="go ahead when --model-type contradicts config.json")
    s.add_argument("--max-shard-size", metavar="SIZE", help="re-shard: 5GB, 500MiB or bytes")
    s.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    s.set_defaults(run=_cmd_convert)

    s = sub.add_parser("roundtrip", parents=[common], help="HF → torchtune → HF and compare (exit 1 on differences)")
    s.add_argument("path", metavar="DIR", nargs="?", help="checkpoint folder (default: a generated sample)")
    s.add_argument("--model-type", metavar="X", help="ModelType name, e.g. LLAMA3 (default: from DIR/config.json)")
    s.add_argument("--force", action="store_true", help="go ahead when --model-type contradicts config.json")
    s.add_argument("--workdir", metavar="DIR", help="where to put the temporary folder (default: system temp)")
    s.add_argument("--keep", metavar="DIR", help="keep the intermediate folders (DIR/tune, DIR/hf)")
    s.set_defaults(run=_cmd_roundtrip)

    s = sub.add_parser("compare", parents=[common], help="compare two checkpoints byte for byte (exit 1: differ)")
    s.add_argument("expected", metavar="EXPECTED", help="reference checkpoint folder (or file)")
    s.add_argument("actual", metavar="ACTUAL", help="checkpoint folder (or file) to check")
    s.set_defaults(run=_cmd_compare)
    return p


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        text = f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    else:
        text = str(e.args[0]) if isinstance(e, KeyError) and e.args and type(e) is KeyError else str(e)
    return " ".join(text.split()) or type(e).__name__


_INPUT_ERRORS: tuple[type[BaseException], ...] = (
    CheckpointError, OSError, NotImplementedError, KeyError, ValueError, _Usage,
)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = _parser().parse_args(argv)
    # the report says what happened; the library's log lines (saved to ..., warnings the report repeats)
    # would only clutter stderr, which holds at most the one error line
    logging.getLogger(LOGGER_NAME).setLevel(logging.DEBUG if os.environ.get("SHARDWISE_DEBUG") else logging.ERROR)
    run: Callable[[argparse.Namespace], Report] = args.run
    try:
        report = run(args)
    except KeyboardInterrupt:
        print(f"shardwise {args.command}: interrupted", file=sys.stderr)
        return 130
    except _INPUT_ERRORS as e:
        if os.environ.get("SHARDWISE_DEBUG"):
            raise
        message = _one_line(e)
        print(f"shardwise {args.command}: error: {message}", file=sys.stderr)
        if args.json:
            error = {"type": "UsageError" if isinstance(e, _Usage) else type(e).__name__, "message": message}
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
