"""The code's layering, read from its imports: bottom to top, public APIs only, no cycles."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# installed name -> source folder (pyproject's package-dir)
FOLDERS = {"tapml": "tapml", "tapml.carving": "carving", "tapml.platforms": "platforms", "tapml.remote": "remote",
           "tapml.reports": "reports"}
# which packages each package may import (the top-level tapml modules may import any package)
ALLOWED = {
    "tapml.core": set(),
    "tapml.record": {"tapml.core"},
    "tapml.carving": {"tapml.core"},
    "tapml.platforms": {"tapml.core"},
    "tapml.judging": {"tapml.core", "tapml.record"},
    "tapml.remote": {"tapml.core", "tapml.platforms"},
    "tapml.reports": {"tapml.core", "tapml.record"},
    "tapml.zoo": {"tapml.core", "tapml.carving"},
    "tapml.engine": {"tapml.core", "tapml.record", "tapml.judging", "tapml.carving", "tapml.platforms"},
}


def _modules() -> dict[str, Path]:
    out = {}
    for package, folder in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([package, *parts])
            if package == "tapml" and parts and f"tapml.{parts[0]}" in FOLDERS:
                continue
            out[name] = path
    return out


MODULES = _modules()


def _exported(package: str) -> set[str]:
    """Names a package's ``__init__`` exports: ``from pkg import carve`` is then the function, not the module."""
    path = MODULES.get(package)
    if path is None or path.name != "__init__.py":
        return set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "__all__" for t in node.targets):
            return {e.value for e in node.value.elts if isinstance(e, ast.Constant)}
    return set()


def _package(module: str) -> str:
    """The package (folder) a module belongs to: tapml.X for tapml/X/..., "tapml" for top-level modules."""
    parts = module.split(".")
    if len(parts) >= 2 and ("tapml." + parts[1]) in {m for m in MODULES if MODULES[m].name == "__init__.py"}:
        return "tapml." + parts[1]
    return "tapml"


def _imports(module: str, path: Path) -> list[str]:
    """Every tapml module it imports, at any level (lazy imports count)."""
    is_pkg = path.name == "__init__.py"
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                prefix = ".".join(base[:len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            for a in node.names:
                sub = f"{prefix}.{a.name}"
                found.append(sub if sub in MODULES and a.name not in _exported(prefix) else prefix)
    return [m for m in found if m == "tapml" or m.startswith("tapml.")]


def test_no_module_imports_another_folders_private_module():
    problems = []
    for module, path in MODULES.items():
        mine = _package(module)
        for imported in _imports(module, path):
            theirs = _package(imported)
            if theirs != mine and imported != theirs and imported in MODULES:
                problems.append(f"{module} imports {imported} (private to {theirs})")
    assert not problems, "\n".join(problems)


def test_packages_depend_only_downwards():
    problems = []
    for module, path in MODULES.items():
        mine = _package(module)
        if mine == "tapml":
            continue
        for imported in _imports(module, path):
            theirs = _package(imported)
            if theirs != mine and theirs not in ALLOWED[mine]:
                problems.append(f"{module} ({mine}) imports {imported} ({theirs})")
    assert not problems, "\n".join(problems)


def test_no_import_cycles():
    graph = {m: {i for i in _imports(m, p) if i in MODULES and i != m} for m, p in MODULES.items()}
    # importing a submodule first runs its package's __init__: that edge is implied, not a cycle
    state, cycles = {}, []

    def visit(m, stack):
        state[m] = "open"
        for n in graph[m]:
            if m.startswith(n + ".") and MODULES[n].name == "__init__.py":
                continue
            if state.get(n) == "open":
                cycles.append(" -> ".join(stack[stack.index(n):] + [n]))
            elif n not in state:
                visit(n, stack + [n])
        state[m] = "done"

    for m in graph:
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(cycles)


def test_the_cli_is_thin_and_engine_functions_are_short():
    assert len((ROOT / "tapml" / "cli.py").read_text().splitlines()) <= 300
    long = []
    for path in (ROOT / "tapml" / "engine").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.end_lineno - node.lineno + 1 > 60:
                long.append(f"{path.name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long


@pytest.mark.parametrize("name", ["run.schema.json", "store.schema.json"])
def test_published_schemas_are_the_generated_ones(name):
    from tapml.carving import store_schema
    from tapml.record import run_schema

    generated = {"run.schema.json": run_schema, "store.schema.json": store_schema}[name]()
    assert json.loads((ROOT / "schemas" / name).read_text()) == generated, "run scripts/write-schemas"


def test_the_run_schema_catches_a_malformed_record(tmp_path):
    import jsonschema
    import torch

    from tapml.carving import FixtureStore, carve
    from tapml.engine import migrate
    from tapml.judging import Judge
    from tapml.platforms import open_local

    model = torch.nn.Linear(4, 4).eval()
    x = torch.randn(2, 4)
    carve(model, lambda: model(x), tmp_path / "s")
    record = migrate(lambda: model(x), FixtureStore(tmp_path / "s"), open_local("torch-cpu"), judge=Judge()).to_json()
    schema = json.loads((ROOT / "schemas" / "run.schema.json").read_text())
    jsonschema.validate(record, schema)
    record["ops"][0]["status"] = "fine"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(record, schema)
