"""``shardwise inspect PATH``: shards, tensors, dtypes, bytes, metadata, from the headers only."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..report import Report

HELP = "shards, tensors, dtypes, bytes, metadata (headers only)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The command's arguments."""
    p.add_argument("path", help="a checkpoint folder or one .safetensors/.bin/.pt file")
    p.add_argument("--tensors", action="store_true", help="list every tensor (name, dtype, shape, offsets, shard)")


def run(a: argparse.Namespace) -> Report:
    """Run the command; its report."""
    from ..report import inspect_checkpoint

    return inspect_checkpoint(a.path, tensors=a.tensors)
