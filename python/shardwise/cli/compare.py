"""``shardwise compare EXPECTED ACTUAL``: bytes, tensors by name, side files."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from .common import local, named

if TYPE_CHECKING:
    from ..report import Report

HELP = "compare two checkpoints: bytes, tensors by name, side files (exit 1: differ)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The command's arguments."""
    p.add_argument("expected", metavar="EXPECTED", help="reference checkpoint folder (or file)")
    p.add_argument("actual", metavar="ACTUAL", help="checkpoint folder (or file) to check")
    p.add_argument("--strict-layout", action="store_true",
                   help="fail (exit 1) when the same tensors are sharded differently")


def run(a: argparse.Namespace) -> Report:
    """Run the command; its report."""
    from ..report import compare

    with local(a.expected) as expected, local(a.actual) as actual:
        report = compare(expected, actual, strict_layout=a.strict_layout, progress=not a.quiet)
    return named(report, a.expected, "other", a.actual)
