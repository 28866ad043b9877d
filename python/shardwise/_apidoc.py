"""The API reference (``docs/api.md``) rendered from the public names' signatures and docstrings.

``python -m shardwise._apidoc > docs/api.md`` regenerates it; ``tests/test_docs.py`` fails when the
file and the docstrings disagree, so the reference cannot drift from the code.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

#: (section, public names) in the order the reference shows them
SECTIONS: list[tuple[str, list[str]]] = [
    ("Checkpointer", ["FullModelHFCheckpointer", "ModelType", "parse_size", "FormattedCheckpointFiles",
                      "get_largest_iter_folder", "ModelConfig"]),
    ("Checks for regression suites", ["roundtrip", "verify", "compare", "Report", "Problem"]),
    ("Errors", ["CheckpointError", "HeaderError", "ConfigError", "ConversionError", "CheckpointIOError",
                "UnknownModelTypeError"]),
]
#: public methods and properties documented for each class (others are torchtune's or internal)
MEMBERS: dict[str, list[str]] = {
    "FullModelHFCheckpointer": ["__init__", "load_checkpoint", "save_checkpoint"],
    "Report": ["ok", "exit_code", "summary", "to_dict", "to_json"],
    "Problem": ["to_dict"],
}


def _signature(obj: Callable[..., Any], skip_self: bool = False) -> str:
    """``(a: int, *, b: str = 'x') -> T`` with annotations as written (they are strings here)."""
    sig = inspect.signature(obj)
    parts: list[str] = []
    star_done = False
    for i, p in enumerate(sig.parameters.values()):
        if skip_self and i == 0:
            continue
        if p.kind is p.KEYWORD_ONLY and not star_done:
            parts.append("*")
            star_done = True
        if p.kind is p.VAR_POSITIONAL:
            star_done = True
        text = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "") + p.name
        if p.annotation is not p.empty:
            text += f": {p.annotation if isinstance(p.annotation, str) else inspect.formatannotation(p.annotation)}"
        if p.default is not p.empty:
            text += f" = {p.default!r}"
        parts.append(text)
    ret = sig.return_annotation
    tail = "" if ret is sig.empty else f" -> {ret if isinstance(ret, str) else inspect.formatannotation(ret)}"
    return f"({', '.join(parts)}){tail}"


def _doc(obj: Any) -> str:
    return inspect.cleandoc(obj.__doc__) if obj.__doc__ else "(undocumented)"


def _member(cls: type, name: str) -> list[str]:
    attr = inspect.getattr_static(cls, name)
    if isinstance(attr, property):
        return [f"#### `{cls.__name__}.{name}` (property)", "", _doc(attr), ""]
    fn = getattr(cls, name)
    title = cls.__name__ if name == "__init__" else f"{cls.__name__}.{name}"
    doc = _doc(fn) if fn.__doc__ and not (name == "__init__" and fn.__doc__ == object.__init__.__doc__) else ""
    return [f"#### `{title}{_signature(fn, skip_self=True)}`", "", *([doc, ""] if doc else [])]


def render() -> str:
    """The whole reference as Markdown."""
    import shardwise

    lines = [
        "# shardwise API reference",
        "",
        "Generated from the docstrings by `python -m shardwise._apidoc > docs/api.md`;",
        "`tests/test_docs.py` fails when this file and the code disagree. Everything here is importable",
        "from `shardwise` (`from shardwise import roundtrip`); the command line is in [cli.md](cli.md).",
        "",
    ]
    for section, names in SECTIONS:
        lines += [f"## {section}", ""]
        for name in names:
            obj = getattr(shardwise, name)
            if inspect.isclass(obj):
                bases = ", ".join(b.__name__ for b in obj.__bases__ if b is not object)
                lines += [f"### class `{name}`" + (f"({bases})" if bases else ""), "", _doc(obj), ""]
                if obj.__dict__.get("__members__") is not None:  # an Enum
                    lines += ["Members: " + ", ".join(f"`{m}`" for m in obj.__members__), ""]
                for member in MEMBERS.get(name, []):
                    lines += _member(obj, member)
            else:
                lines += [f"### `{name}{_signature(obj)}`", "", _doc(obj), ""]
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    print(render(), end="")
