"""The ``shardwise`` command: ``inspect``, ``verify``, ``convert``, ``roundtrip``, ``compare``.

A thin layer over ``shardwise.report`` and ``shardwise.report.tunedir``. Exit codes: 0 ok, 1 a check failed,
2 usage or input error (one line on stderr, no traceback; ``SHARDWISE_DEBUG=1`` shows it), 130
interrupted (Ctrl-C: one line, nothing left behind). ``--json`` prints ``Report.to_dict()`` (schema
in docs/cli.md). Everything beyond argparse is imported inside :func:`main`, so that a
Ctrl-C during start-up is handled too, and torch only by the commands that build tensors.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..version import __version__

if TYPE_CHECKING:
    from ..report import Report

__all__ = ["main"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

#: one module per command (``cli/<name>.py``: ``HELP``, ``add_arguments``, ``run``); each imports what its
#: work needs only when it runs, so building the parser stays cheap
COMMANDS = ("inspect", "verify", "convert", "roundtrip", "compare")




def _add_common(p: argparse.ArgumentParser, default: Any) -> None:
    """``--json`` and ``-q``: accepted before the subcommand (``default`` False) and after it
    (``default`` SUPPRESS, so that the subcommand does not reset what was given before it)."""
    p.add_argument("--json", action="store_true", default=default,
                   help="print a machine-readable JSON report on stdout")
    p.add_argument("-q", "--quiet", action="store_true", default=default,
                   help="no progress bar (it is drawn on stderr, and only when stderr is a terminal)")


class _Formatter(argparse.HelpFormatter):
    """argparse's formatter, sized without ``shutil`` (which argparse imports for every argument it
    adds, with bz2 and lzma, only to ask the terminal width)."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: int | None = None) -> None:
        if width is None:
            try:
                width = int(os.environ.get("COLUMNS", "")) or os.get_terminal_size(sys.__stdout__.fileno()).columns
            except (ValueError, OSError, AttributeError):
                width = 80
            width -= 2
        super().__init__(prog, indent_increment, max_help_position, width)


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    common = argparse.ArgumentParser(add_help=False, allow_abbrev=False, formatter_class=_Formatter)
    _add_common(common, argparse.SUPPRESS)

    p = argparse.ArgumentParser(
        prog="shardwise",
        description="Inspect, verify, convert and round-trip Hugging Face / torchtune checkpoints.",
        epilog="Exit codes: 0 ok, 1 check failed, 2 usage or input error, 130 interrupted.",
        allow_abbrev=False,
        formatter_class=_Formatter,
    )
    p.add_argument("--version", action="version", version=f"shardwise {__version__}")
    _add_common(p, False)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    subs: dict[str, argparse.ArgumentParser] = {}

    for name in COMMANDS:
        cmd = importlib.import_module(f".{name}", __package__)
        s = sub.add_parser(name, parents=[common], help=cmd.HELP, description=cmd.HELP, allow_abbrev=False,
                           formatter_class=_Formatter)
        cmd.add_arguments(s)
        s.set_defaults(run=cmd.run)
        subs[name] = s
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
    from .._logging import set_level
    from ..errors import CheckpointError
    from ..report import SCHEMA_VERSION

    # the report says what happened; the library's log lines (saved to ..., warnings the report repeats)
    # would only clutter stderr, which holds at most the one error line
    set_level(10 if os.environ.get("SHARDWISE_DEBUG") else 40)  # logging.DEBUG / logging.ERROR
    from .common import UsageError

    input_errors = (CheckpointError, OSError, NotImplementedError, KeyError, ValueError, UsageError)
    run: Callable[[argparse.Namespace], Report] = args.run
    try:
        report = run(args)
    except input_errors as e:
        if os.environ.get("SHARDWISE_DEBUG"):
            raise
        message = _one_line(e)
        print(f"shardwise {args.command}: error: {message}", file=sys.stderr)
        if args.json:
            error = {"type": "UsageError" if isinstance(e, UsageError) else type(e).__name__, "message": message,
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
