"""The package layout: one wing per pipeline stage, imports only downward, no circle.

    model  <  decode  <  train  <  measure  <  serve  <  cli

A module may import the base modules (errors, fsio, flags, progress, version), modules of its own wing and
modules of lower wings, never a higher wing and never the package's top level; and no chain of
imports (function-level ones included) may lead back to where it started."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "eetune"
WINGS = ["model", "decode", "train", "measure", "serve"]  # lowest first
BASE = {"errors", "fsio", "flags", "progress", "version"}
TOP = {"cli", "__init__", "__main__"}


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every eetune module `path` imports (`from eetune.x.y import z` names module eetune.x.y, or
    eetune.x.y.z when that is a module)."""
    here = module_name(path)
    pkg = here if path.name == "__init__.py" else here.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("eetune")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("eetune"):
                continue
            for a in node.names:
                sub = f"{mod}.{a.name}"
                out.add(sub if _is_module(sub) else mod)
    return out


def _is_module(name: str) -> bool:
    p = SRC.parent.joinpath(*name.split("."))
    return p.with_suffix(".py").exists() or (p / "__init__.py").exists()


def level(mod: str) -> tuple[str, int]:
    parts = mod.split(".")
    if len(parts) == 1:
        return "top", 99
    if parts[1] in WINGS:
        return parts[1], WINGS.index(parts[1])
    if parts[1] in BASE:
        return "base", -1
    if parts[1] in TOP:
        return "top", 99
    raise AssertionError(f"{mod} is in no wing: put it in one of {WINGS} or the base")


MODULES = {module_name(p): p for p in SRC.rglob("*.py")}


@pytest.mark.parametrize("mod", sorted(MODULES))
def test_imports_point_down(mod):
    wing, lv = level(mod)
    for dep in imports_of(MODULES[mod]):
        if dep == "eetune" and wing != "top":
            pytest.fail(f"{mod} imports the package top level: import the module that defines the name")
        dep_wing, dep_lv = level(dep)
        if wing == "base":
            assert dep_wing == "base", f"base module {mod} imports {dep}"
        elif wing != "top":
            assert dep_lv <= lv, f"{mod} ({wing}) imports {dep} ({dep_wing}), a higher wing"


def test_no_import_circle():
    graph = {m: {d for d in imports_of(p) if d in MODULES and d != m} for m, p in MODULES.items()}
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                cycle = stack[stack.index(d):] + [d]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = "done"
    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_every_module_says_what_it_is_for():
    for mod, path in MODULES.items():
        doc = ast.get_docstring(ast.parse(path.read_text()))
        assert doc and len(doc.split()) >= 5, f"{mod} has no module docstring"
