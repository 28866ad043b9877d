"""Checks for regression suites and the ``shardwise`` command: ``verify``, ``compare``, ``roundtrip``,
``inspect_checkpoint``; each returns a :class:`Report` (``assert report.ok, report.summary()``).

One module per command, each with its check and its rendering: ``inspection``, ``verification``,
``comparison`` (byte-level differences in ``diff``), ``round_trip``, ``tunedir`` (``convert``); ``Report`` and
``Problem`` are in ``base``. This package gathers the public names and imports a command's module
only when one of its names is first used, so ``shardwise inspect`` starts without the others.
``Report.to_dict()`` is the ``--json`` output (schema in docs/cli.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_names
from .base import PROBLEM_KINDS, SCHEMA_VERSION, Problem, Report

if TYPE_CHECKING:
    from .comparison import compare
    from .diff import first_difference
    from .inspection import inspect_checkpoint
    from .round_trip import roundtrip
    from .verification import MANIFEST_SCHEMA, compute_checksums, read_manifest, verify

_LAZY = {
    "compare": "comparison",
    "first_difference": "diff",
    "inspect_checkpoint": "inspection",
    "roundtrip": "round_trip",
    **dict.fromkeys(("MANIFEST_SCHEMA", "compute_checksums", "read_manifest", "verify"), "verification"),
}


__getattr__, __dir__ = lazy_names(__name__, _LAZY, globals())

__all__ = [
    "MANIFEST_SCHEMA",
    "PROBLEM_KINDS",
    "SCHEMA_VERSION",
    "Problem",
    "Report",
    "compare",
    "compute_checksums",
    "first_difference",
    "inspect_checkpoint",
    "read_manifest",
    "roundtrip",
    "verify",
]
