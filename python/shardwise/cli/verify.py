"""``shardwise verify DIR``: integrity of a checkpoint folder (index, headers, sizes, checksums, a manifest)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..report import Report

HELP = "integrity of a checkpoint folder (exit 1 on problems)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The command's arguments."""
    p.add_argument("path", metavar="DIR", help="a checkpoint folder (or one file)")
    p.add_argument("--checksums", action="store_true", help="compute per-file sha256 in parallel")
    p.add_argument("--write-manifest", metavar="FILE",
                   help="write the sizes and sha256 of every file (weights, index, config and tokenizer files) to FILE")
    p.add_argument("--against", metavar="MANIFEST", help="compare sizes and sha256 with a manifest")


def run(a: argparse.Namespace) -> Report:
    """Run the command; its report."""
    from ..report import verify

    return verify(
        a.path, checksums=a.checksums, against=a.against, write_manifest=a.write_manifest, progress=not a.quiet
    )
