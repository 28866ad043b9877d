"""``shardwise roundtrip [DIR]``: HF → torchtune → HF (and through the checkpointer), then compare."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from .common import local, model_type_for, named, say, starting

if TYPE_CHECKING:
    from ..report import Report

HELP = "HF → torchtune → HF and compare (exit 1 on differences)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The command's arguments."""
    p.add_argument("path", metavar="DIR", nargs="?", help="checkpoint folder (default: a generated sample)")
    p.add_argument("--model-type", metavar="X", help="ModelType name, e.g. LLAMA3 (default: from DIR/config.json)")
    p.add_argument("--force", action="store_true", help="go ahead when --model-type contradicts config.json")
    p.add_argument("--workdir", metavar="DIR", help="where to put the temporary folder (default: system temp)")
    p.add_argument("--keep", metavar="DIR",
                   help="keep every intermediate folder in DIR: sample/ (the generated sample, without a "
                        "checkpoint DIR), tune/ (torchtune keys), hf/ (converted back), checkpointer/epoch_0/ "
                        "(FullModelHFCheckpointer load → save); a DIR kept by an earlier run is replaced")


def run(a: argparse.Namespace) -> Report:
    """Run the command; its report."""
    with local(a.path) as path:
        with starting(a):
            import torch  # noqa: F401  (roundtrip needs it; imported under the start-up line)

            from ..report import roundtrip

            model_type, note = a.model_type, None
            if path is not None:
                model_type, note = model_type_for(str(path), model_type, a.force, "roundtrip DIR")
        say(note, a)
        report = roundtrip(path, model_type, workdir=a.workdir, keep=a.keep, progress=not a.quiet)
    return named(report, a.path)
