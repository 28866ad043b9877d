"""The documentation cannot drift: ``docs/api.md`` is what the docstrings render to, every public
name is in it, and the README's JSON schema names every problem kind."""

from __future__ import annotations

from pathlib import Path

import shardwise
from shardwise import _apidoc
from shardwise.report import PROBLEM_KINDS

ROOT = Path(__file__).resolve().parent.parent


def test_api_reference_matches_the_docstrings() -> None:
    assert (ROOT / "docs" / "api.md").read_text() == _apidoc.render(), (
        "docs/api.md is out of date: run `python -m shardwise._apidoc > docs/api.md`")


def test_every_public_class_and_function_is_in_the_reference() -> None:
    documented = {n for _, names in _apidoc.SECTIONS for n in names}
    public = {n for n in shardwise.__all__ if callable(getattr(shardwise, n))}
    assert public <= documented, public - documented


def test_every_documented_member_has_a_docstring() -> None:
    text = _apidoc.render()
    assert "(undocumented)" not in text


def test_readme_lists_every_problem_kind() -> None:
    readme = (ROOT / "README.md").read_text()
    assert [k for k in PROBLEM_KINDS if f"`{k}`" not in readme] == []
