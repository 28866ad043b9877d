"""What every check returns: :class:`Report` (with its :class:`Problem` list) and how it is printed.

The lowest layer of the reports: each command's module (``inspection``, ``verification``,
``comparison``, ``round_trip``, and ``tunedir`` for ``convert``) registers its renderer here
with :func:`register_renderer`; nothing here imports a command.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..format.scan import FileInfo, Scan

__all__ = ["PROBLEM_KINDS", "SCHEMA_VERSION", "Problem", "Report", "register_renderer", "stray_warnings"]

#: version of the ``--json`` / ``Report.to_dict()`` schema; bumped on any incompatible change
SCHEMA_VERSION = 1

#: every ``Problem.kind``
PROBLEM_KINDS = (
    # structure (verify, inspect)
    "index", "missing-file", "unlisted-file", "unreadable", "missing-tensor", "unlisted-tensor",
    "wrong-shard", "duplicate-tensor", "total-size",
    # pinned checksums (verify --against)
    "size", "checksum",
    # comparisons (roundtrip, compare)
    "extra-file", "renamed-file", "extra-tensor", "dtype", "shape", "data", "metadata", "header", "layout",
    # side files (verify --against, compare)
    "side-file",
    # warnings (roundtrip, convert): the input's own flaws, corrected in the output
    "input-inconsistent",
)


@dataclass
class Problem:
    """One thing that is wrong or differs, with where: file, tensor and byte range when known.

    ``byte_range`` is ``[begin, end)`` in the file (for comparisons: in the file that was produced);
    ``tensor_range`` is the same range relative to the tensor's first byte.
    """

    kind: str
    message: str
    file: str | None = None
    tensor: str | None = None
    byte_range: tuple[int, int] | None = None
    tensor_range: tuple[int, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "message": self.message,
            "file": self.file,
            "tensor": self.tensor,
            "byte_range": list(self.byte_range) if self.byte_range else None,
            "tensor_range": list(self.tensor_range) if self.tensor_range else None,
        }

    def __str__(self) -> str:
        return f"[{self.kind}] {self.message}"


@dataclass
class Report:
    """The outcome of one check or command. ``ok`` is True when no problem was found.

    ``files`` has one entry (a dict) per file, ``stats`` the counts and timings, ``details`` the
    command's own top-level keys (see ``to_dict``). ``warnings`` are reported but do not fail the
    check: flaws of the input that the output corrects, files a load ignores (shards the index does
    not list).
    """

    command: str
    path: str
    problems: list[Problem] = field(default_factory=list)
    files: list[dict[str, Any]] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    warnings: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems

    @property
    def exit_code(self) -> int:
        """The command's exit status: 0 when ok, 1 when a check failed."""
        return 0 if self.ok else 1

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` document: ``schema, command, path, ok, <details...>, files, problems, warnings,
        stats``."""
        return {
            "schema": SCHEMA_VERSION,
            "command": self.command,
            "path": self.path,
            "ok": self.ok,
            **self.details,
            "files": self.files,
            "problems": [p.to_dict() for p in self.problems],
            "warnings": [p.to_dict() for p in self.warnings],
            "stats": self.stats,
        }

    def to_json(self, indent: int | None = 2) -> str:
        """``to_dict()`` as JSON text (what ``--json`` prints)."""
        return json.dumps(self.to_dict(), indent=indent)

    def summary(self, max_problems: int = 40) -> str:
        """A human-readable account: what was checked, per-file status, the problems, a verdict."""
        render, verdict = _RENDERERS.get(self.command, (_render_generic, _verdict))
        lines = render(self)
        if self.warnings:
            lines.append(f"{n_of(len(self.warnings), 'warning')}:")
            lines.extend(f"  {w}" for w in self.warnings[:max_problems])
            if len(self.warnings) > max_problems:
                lines.append(f"  ... and {len(self.warnings) - max_problems} more (see --json)")
        if self.problems:
            lines.append(f"{len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}:")
            for p in self.problems[:max_problems]:
                lines.append(f"  {p}")
            if len(self.problems) > max_problems:
                lines.append(f"  ... and {len(self.problems) - max_problems} more (see --json)")
        lines.append(verdict(self))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


Renderer = Callable[[Report], list[str]]
_RENDERERS: dict[str, tuple[Renderer, Callable[[Report], str]]] = {}


def register_renderer(command: str, render: Renderer, verdict: Callable[[Report], str] | None = None) -> None:
    """Make ``Report.summary()`` of ``command`` reports start with ``render(report)`` and end with
    ``verdict(report)`` (default: ``OK`` / ``FAILED``). Called by each command's module."""
    _RENDERERS[command] = (render, verdict or _verdict)


def _verdict(r: Report) -> str:
    return "OK" if r.ok else "FAILED"


def _render_generic(r: Report) -> list[str]:
    return [f"shardwise {r.command} {r.path}"]


def n_of(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"



def fmt_dtypes(d: Mapping[str, int]) -> str:
    return ", ".join(f"{k}×{v}" for k, v in d.items()) or "-"



def index_entry(s: Scan, **extra: Any) -> dict[str, Any] | None:
    """The ``index`` of a report: name, entries and ``total_size``, plus the command's own keys."""
    if s.index is None:
        return None
    return {"name": s.index.name, "entries": len(s.index.weight_map),
            "total_size": s.index.metadata.get("total_size"), **extra}


def file_entry(f: FileInfo, sha256: str | None = None) -> dict[str, Any]:
    d = f.to_dict()
    d["sha256"] = sha256
    return d


def totals(infos: Sequence[FileInfo], seconds: float) -> dict[str, Any]:
    return {
        "shards": len(infos),
        "tensors": sum(len(f.tensors) for f in infos),
        "bytes": sum(f.data_bytes for f in infos),
        "file_bytes": sum(f.size or 0 for f in infos),
        "seconds": round(seconds, 6),
    }


def stray_warnings(s: Scan) -> list[Problem]:
    """A warning per weight file the index does not list: a load follows the index, as transformers
    does, and ignores it (typically an older save's shard that repeats some tensors)."""
    assert s.index is not None or not s.strays
    return [
        Problem("unlisted-file", f"{n}: not listed in {s.index.name if s.index else 'the index'}; ignored "
                "(a leftover of an older save?)", n)
        for n in s.strays
    ]


def problems_from(items: Sequence[tuple[str, str, str | None, str | None]]) -> list[Problem]:
    return [Problem(kind, msg, file, tensor) for kind, msg, file, tensor in items]



#: the chunk size for hashing and comparing mapped files
CHUNK = 16 * 1024 * 1024
