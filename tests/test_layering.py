"""The layering STYLE.md promises, checked on the imports of every module of the package:
parsed, not run, so imports inside functions and under ``TYPE_CHECKING`` count too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mergekit"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path) -> dict[str, int]:
    """The package's modules that ``name`` imports, each with the line of its first import.
    ``from a import b`` imports ``a.b`` where that is a module, else ``a``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
                       for a in node.names]
        else:
            continue
        for target in targets:
            if target in MODULES and target != name:
                found.setdefault(target, node.lineno)
    return found


IMPORTS = {name: imports_of(name, path) for name, path in MODULES.items()}


def within(module: str, *prefixes: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def offenders(importers: tuple[str, ...], imported: tuple[str, ...]) -> list[str]:
    return sorted(f"{MODULES[a].relative_to(PACKAGE.parent)}:{line} imports {b}"
                  for a, targets in IMPORTS.items() if within(a, *importers)
                  for b, line in targets.items() if within(b, *imported))


# Everything above io/ and methods/: the command line and its wrappers, the recipe, the
# plan, the run and what it alone uses, the execution path, the method registry.
ABOVE_IO = (
    "mergekit.cli", "mergekit.wrappers", "mergekit.reference", "mergekit.process_tuning",
    "mergekit.config", "mergekit.recipe_checks", "mergekit.recipe_fields",
    "mergekit.parameters", "mergekit.plan", "mergekit.run", "mergekit.output_artifacts",
    "mergekit.provenance", "mergekit.execute", "mergekit.backends", "mergekit.finite",
    "mergekit.failpoints", "mergekit.transfer",
    "mergekit.methods",
)


def test_the_parser_sees_every_kind_of_import():
    assert "mergekit.plan" in IMPORTS["mergekit.run"]  # at the top
    assert "mergekit.io.hub" in IMPORTS["mergekit.output_artifacts"]  # inside a function
    assert "mergekit.io.model" in IMPORTS["mergekit.io.readahead"]  # under TYPE_CHECKING
    assert "mergekit.methods" in IMPORTS["mergekit.methods.registry"]  # from a import b
    assert "mergekit.methods.linear" in IMPORTS["mergekit.methods"]  # a package's __init__


def test_io_imports_nothing_above_it():
    """io/ gets plain data (paths, dicts, tensor names), never the recipe, the plan or the
    method registry."""
    assert offenders(("mergekit.io",), ABOVE_IO) == []


def test_methods_do_no_io_and_know_no_recipe_plan_or_run():
    above = tuple(m for m in ABOVE_IO if m != "mergekit.methods") + ("mergekit.io",)
    assert offenders(("mergekit.methods",), above) == []


def test_no_two_modules_import_each_other():
    pairs = sorted(f"{a} <-> {b}" for a, targets in IMPORTS.items() for b in targets
                   if a < b and a in IMPORTS[b])
    assert pairs == []


def matches(module: str, pattern: str) -> bool:
    """``a.*``: ``a`` and every module under it; else exactly that module."""
    return within(module, pattern[:-2]) if pattern.endswith(".*") else module == pattern


@pytest.mark.parametrize(("imported", "importers"), [
    ("mergekit", ()),  # the package's public API: nothing in the package imports it
    ("mergekit.cli.*", ("mergekit.cli.*",)),
    ("mergekit.run", ("mergekit", "mergekit.cli.*")),  # it orchestrates; only callers above
])
def test_the_top_is_imported_only_from_above(imported: str, importers: tuple[str, ...]):
    found = sorted(f"{MODULES[a].relative_to(PACKAGE.parent)}:{line} imports {b}"
                   for a, targets in IMPORTS.items()
                   if not any(matches(a, p) for p in importers)
                   for b, line in targets.items() if matches(b, imported))
    assert found == []
