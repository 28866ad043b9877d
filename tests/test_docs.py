"""The documentation cannot drift: ``docs/api.md`` is what the docstrings render to, every public
name is in it, the JSON schema in ``docs/cli.md`` names every problem kind, every relative link in
the README and ``docs/`` resolves (file and heading), and the README stays a front page that links
every docs page."""

from __future__ import annotations

import re
from pathlib import Path

import shardwise
from shardwise import _apidoc
from shardwise.report import PROBLEM_KINDS

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_MAX_LINES = 350


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


def test_cli_docs_list_every_problem_kind() -> None:
    cli = (DOCS / "cli.md").read_text()
    assert [k for k in PROBLEM_KINDS if f"`{k}`" not in cli] == []


def _pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def _prose(text: str) -> list[str]:
    """The lines outside fenced code blocks (a ``# comment`` in a shell block is no heading)."""
    lines, fence = [], None
    for line in text.splitlines():
        stripped = line.lstrip()
        marker = stripped[:3]
        if marker in ("```", "~~~") and (fence is None or marker == fence):
            fence = None if fence else marker
            continue
        if fence is None:
            lines.append(line)
    return lines


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: link text kept, lower case, punctuation dropped, spaces -> '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for line in _prose(page.read_text()):
        m = re.match(r" {0,3}#{1,6}\s+(.*?)(?:\s+#+)?\s*$", line)
        if not m:
            continue
        slug = _slug(m.group(1))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def _links(page: Path) -> list[str]:
    """Inline ``[text](target)`` and reference ``[label]: target`` links, outside code."""
    found = []
    for line in _prose(page.read_text()):
        line = re.sub(r"`[^`]*`", "", line)
        found += re.findall(r"\]\(\s*<?([^)\s>]+)>?(?:\s+[\"'(][^)]*)?\)", line)
        found += re.findall(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", line)
    return found


def _is_relative(target: str) -> bool:
    return not re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*:", target) and not target.startswith("//")


def test_every_relative_link_resolves() -> None:
    broken, checked = [], 0
    for page in _pages():
        for target in filter(_is_relative, _links(page)):
            checked += 1
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(ROOT)}: {target}"
            if not dest.exists():
                broken.append(f"{where} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{where} (no heading with that anchor in {dest.name})")
    assert checked > 0
    assert broken == [], "\n".join(broken)


def test_slugs_follow_github() -> None:
    assert _slug("Where shardwise differs from torchtune 0.6.1 (on purpose)") == (
        "where-shardwise-differs-from-torchtune-061-on-purpose")
    assert _slug("`shardwise convert SRC DST --to tune|hf [--force]`") == (
        "shardwise-convert-src-dst---to-tunehf---force")
    assert _slug("JSON schema (`--json`, `Report.to_dict()`)") == "json-schema---json-reportto_dict"


def test_readme_is_a_front_page() -> None:
    assert len(README.read_text().splitlines()) <= README_MAX_LINES


def test_readme_links_every_docs_page() -> None:
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in _links(README) if _is_relative(t)}
    assert [p.name for p in sorted(DOCS.glob("*.md")) if p.resolve() not in linked] == []
