"""The house keeps its shape (docs/architecture.md): imports point down the layers with no circles
(Python and Rust), no source file grows past 450 lines, no private name crosses a file, only the
storage layer decides whether a location is a URL (the README's length: tests/test_docs.py)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "python"
RUST = ROOT / "rust"
MAX_LINES = 450


def _modules() -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package)."""
    found = {}
    for p in sorted((PKG / "shardwise").rglob("*.py")):
        parts = list(p.relative_to(PKG).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_pkg else parts)] = (p, is_pkg)
    return found


MODULES = _modules()
NATIVE = {"shardwise._core"}


def _absolute(module: str, is_pkg: bool, level: int, name: str | None) -> str:
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _imports(module: str) -> list[tuple[str, str | None, int]]:
    """(target module, imported name or None, line) for every import of a shardwise module, at any depth
    (function-level imports count: they close circles just the same)."""
    path, is_pkg = MODULES[module]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            target = _absolute(module, is_pkg, node.level, node.module) if node.level else node.module
            if not target or target.split(".")[0] != "shardwise":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in MODULES or sub in NATIVE:
                    out.append((sub, None, node.lineno))
                else:
                    out.append((target, alias.name, node.lineno))
        elif isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names if a.name.split(".")[0] == "shardwise"]
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one member (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def python_graph() -> dict[str, set[str]]:
    return {m: {t for t, _, _ in _imports(m) if t in MODULES and t != m} for m in MODULES}


def rust_graph() -> dict[str, set[str]]:
    """Module -> the crate modules it names (``crate::x``, ``super::x`` from a child), tests excluded."""
    files = {p.relative_to(RUST).with_suffix("").as_posix().removesuffix("/mod"): p for p in RUST.rglob("*.rs")}
    graph: dict[str, set[str]] = {}
    for name, p in files.items():
        text = _before_tests(p.read_text())
        uses = set(re.findall(r"\bcrate::(\w+)", text))
        if "/" in name:  # py/headers.rs: super::x is py/x
            parent = name.rsplit("/", 1)[0]
            uses |= {f"{parent}/{m}" for m in re.findall(r"\bsuper::(\w+)", text)}
        graph[name] = {u for u in uses if u in files and u != name}
    return graph


def _before_tests(text: str) -> str:
    return text.split("#[cfg(test)]", 1)[0]


def test_no_import_circles_in_python() -> None:
    cycles = _cycles(python_graph())
    assert cycles == [], cycles


def test_no_module_circles_in_rust() -> None:
    cycles = _cycles(rust_graph())
    assert cycles == [], cycles


def test_no_source_file_over_450_lines() -> None:
    long = {str(p.relative_to(ROOT)): n for p, _ in MODULES.values()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    for p in RUST.rglob("*.rs"):  # counted up to the unit tests
        n = len(_before_tests(p.read_text()).splitlines())
        if n > MAX_LINES:
            long[str(p.relative_to(ROOT))] = n
    assert long == {}, long


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_no_private_name_crosses_a_file() -> None:
    crossings = []
    for module in MODULES:
        path, _ = MODULES[module]
        bound = {}  # local name -> shardwise module it stands for
        for target, name, line in _imports(module):
            if name is not None and _private(name):
                crossings.append(f"{path.relative_to(ROOT)}:{line}: {name} from {target}")
            elif name is None and target in MODULES:
                bound[target.rsplit(".", 1)[-1]] = target
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):  # mod._name on a module imported by name
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and _private(node.attr):
                if node.value.id in bound:
                    crossings.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value.id}.{node.attr}")
    assert crossings == [], "\n".join(crossings)


def test_only_the_store_decides_what_a_url_is() -> None:
    """Above the storage layer nothing branches on "is this a URL?": no ``is_url`` call, no ``://``."""
    askers = []
    for module, (path, _) in MODULES.items():
        if module.startswith("shardwise.store"):
            continue
        text = path.read_text()
        for i, line in enumerate(text.splitlines(), 1):
            code = line.split("#", 1)[0]
            if re.search(r"\bis_url\(|\bis_remote\b|['\"]://", code):
                askers.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert askers == [], "\n".join(askers)


#: layer -> the shardwise packages it must not import (docs/architecture.md, "Layers"): the store sits
#: on the base modules only; format lays out what convert makes and reads through the store; dcp never
#: imports the checkpointer
BASE = ("shardwise.errors", "shardwise.constants", "shardwise.config", "shardwise._logging", "shardwise._core",
        "shardwise.units", "shardwise.version", "shardwise.model_types", "shardwise.staging", "shardwise.lazy")
UPPER = ("shardwise.checkpointer", "shardwise.dcp", "shardwise.cli", "shardwise.report", "shardwise.torchtune",
         "shardwise.hf", "shardwise.torchtitan")
#: the trainer integrations: nothing below them imports them
INTEGRATIONS = ("shardwise.torchtune", "shardwise.hf", "shardwise.torchtitan")
LAYERS = {
    "shardwise.store": ("shardwise.format", "shardwise.convert", "shardwise.adapters", *UPPER),
    "shardwise.format": ("shardwise.adapters", *UPPER),
    "shardwise.convert": ("shardwise.store", "shardwise.format", "shardwise.adapters", *UPPER),
    "shardwise.adapters": ("shardwise.store", *UPPER),
    "shardwise.dcp": ("shardwise.checkpointer", "shardwise.cli", "shardwise.report", *INTEGRATIONS),
    "shardwise.checkpointer": ("shardwise.cli", "shardwise.report", *INTEGRATIONS),
    **{m: ("shardwise.store", "shardwise.format", "shardwise.convert", "shardwise.adapters", *UPPER) for m in BASE},
}


def test_the_layers_point_down() -> None:
    wrong = []
    for module in MODULES:
        for layer, forbidden in LAYERS.items():
            if module == layer or module.startswith(layer + "."):
                wrong += [f"{module} -> {t}" for t, _, _ in _imports(module)
                          if any(t == f or t.startswith(f + ".") for f in forbidden)]
    assert wrong == [], "\n".join(wrong)


def test_lazy_public_names_are_not_shadowed_by_submodules() -> None:
    """A package that loads names on first use must not have a submodule of the same name: once the
    submodule is imported, ``from shardwise.report import verify`` would give the module."""
    import importlib

    for module, (_, is_pkg) in MODULES.items():
        if not is_pkg:
            continue
        pkg = importlib.import_module(module)
        lazy = getattr(pkg, "_LAZY", {})
        clashes = sorted(n for n in lazy if f"{module}.{n}" in MODULES)
        assert clashes == [], f"{module}: {clashes}"
