"""Checks for regression suites and the ``shardwise`` command: ``verify``, ``compare``, ``roundtrip``,
``inspect_checkpoint``; each returns a :class:`Report` (``assert report.ok, report.summary()``).

One module per command, each with its check and its rendering: ``report_inspect``, ``report_verify``,
``report_compare``, ``report_roundtrip`` (``convert`` is in ``tunedir``); ``Report`` and ``Problem``
are in ``report_base``. This module gathers the public names. The command line (``shardwise.cli``) is
a thin layer over these functions; ``Report.to_dict()`` is its ``--json`` output (schema in the README,
section "Command line").
"""

from __future__ import annotations

from .base import PROBLEM_KINDS, SCHEMA_VERSION, Problem, Report
from .compare import compare, first_difference
from .inspect import inspect_checkpoint
from .roundtrip import roundtrip
from .verify import MANIFEST_SCHEMA, compute_checksums, read_manifest, verify

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
