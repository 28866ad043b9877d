"""``shardwise convert SRC DST --to tune|hf``: an HF folder ⇄ a torchtune-keyed safetensors folder."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from .common import local, model_type_for, named, published, say, starting

if TYPE_CHECKING:
    from ..report import Report

HELP = "HF checkpoint ⇄ torchtune-keyed safetensors folder"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The command's arguments."""
    p.add_argument("src", metavar="SRC", help="input checkpoint folder")
    p.add_argument("dst", metavar="DST", help="output folder (published atomically; must be new or empty)")
    p.add_argument("--to", required=True, choices=["tune", "hf"],
                   help="tune: HF → torchtune keys; hf: a folder written by --to tune → HF")
    p.add_argument("--model-type", metavar="X",
                   help="ModelType name, e.g. LLAMA3 (default: --to tune from config.json, --to hf from the origin)")
    p.add_argument("--force", action="store_true", help="go ahead when --model-type contradicts config.json")
    p.add_argument("--max-shard-size", metavar="SIZE", help="re-shard: 5GB, 500MiB or bytes")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")


def run(a: argparse.Namespace) -> Report:
    """Run the command; its report."""
    with local(a.src) as src, published(a.dst, a.overwrite) as dst:
        with starting(a):
            from ..report.tunedir import convert_checkpoint

            model_type, note = a.model_type, None
            if a.to == "tune" or model_type is not None:  # --to hf without one: the origin records it
                model_type, note = model_type_for(str(src), model_type, a.force, f"convert --to {a.to}")
        say(note, a)
        report = convert_checkpoint(
            src, dst, model_type, to=a.to, max_shard_size=a.max_shard_size, overwrite=a.overwrite,
            progress=not a.quiet,
        )
    return named(report, a.src, "output", a.dst)
