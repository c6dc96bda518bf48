"""The package's shape: imports point one way, from the bottom layer to the top one

    config, store, errors, log  →  data, models  →  training, distill  →  pruning  →  experiment  →  cli, report

(a module imports its own layer or lower ones, at module level only: an import of kdprune_cli inside a function
would hide a cycle), modules stay under 400 lines and functions under 60."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "kdprune_cli"
LAYERS = [("config", "store", "errors", "log"), ("data", "models"), ("training", "distill"), ("pruning",),
          ("experiment",), ("cli", "report")]
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 60

# The one exception, with its reason: the package's public ``kdprune_cli.load_pruned`` reloads a saved model
# without importing the rest of kdprune at ``import kdprune_cli`` time.
UPWARD = {("kdprune_cli", "kdprune_cli.models.modelfile"): "load_pruned, the package's one public function"}
INNER = {"kdprune_cli": "load_pruned keeps `import kdprune_cli` light"}
LONG_MODULES: dict = {}
LONG_FUNCTIONS: dict = {}  # "path::qualified name"


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(name: str) -> int:
    """The layer of module ``name``; the package's own ``__init__`` (its version) is at the bottom."""
    parts = name.split(".")
    if len(parts) == 1:
        return 0
    found = [i for i, group in enumerate(LAYERS) if parts[1] in group]
    assert found, f"{name}: kdprune_cli/{parts[1]} is in no layer; add it to LAYERS"
    return found[0]


def imports(tree: ast.Module, name: str):
    """``(imported kdprune_cli module, inside a function)`` for every import of the package in ``tree``."""
    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                yield from ((a.name, in_function) for a in child.names if a.name.split(".")[0] == "kdprune_cli")
            elif isinstance(child, ast.ImportFrom):
                assert child.level == 0, f"{name}: relative import (imports are absolute)"
                if (child.module or "").split(".")[0] == "kdprune_cli":
                    yield child.module, in_function
            yield from visit(child, inner)
    yield from visit(tree, False)


def functions(tree: ast.Module):
    """``(qualified name, lines)`` of every function and method, nested ones included."""
    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                qual = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    yield qual, child.end_lineno - child.lineno + 1
                yield from visit(child, qual + ".")
            else:
                yield from visit(child, prefix)
    yield from visit(tree, "")


@pytest.fixture(scope="module")
def trees() -> dict:
    return {p: ast.parse(p.read_text(), str(p)) for p in modules()}


def test_imports_point_down_and_sit_at_module_level(trees):
    found = [(module_name(p), target, in_function) for p, tree in trees.items()
             for target, in_function in imports(tree, module_name(p))]
    upward = {(m, t) for m, t, _ in found if layer(t) > layer(m)}
    inner = {m for m, _, in_function in found if in_function}
    assert upward <= set(UPWARD), f"imports from a higher layer: {sorted(upward - set(UPWARD))}"
    assert inner <= set(INNER), f"inside a function: {sorted((m, t) for m, t, f in found if f and m not in INNER)}"
    stale = (set(UPWARD) - upward) | (set(INNER) - inner)
    assert not stale, f"allowed but no longer there: {sorted(map(str, stale))}"


def test_modules_and_functions_stay_short(trees):
    long_modules = {str(p.relative_to(ROOT)) for p in trees if len(p.read_text().splitlines()) > MAX_MODULE_LINES}
    assert long_modules <= set(LONG_MODULES), sorted(long_modules - set(LONG_MODULES))
    assert set(LONG_MODULES) <= long_modules, f"short now: {sorted(set(LONG_MODULES) - long_modules)}"
    long_functions = {f"{p.relative_to(ROOT)}::{q}": n for p, tree in trees.items() for q, n in functions(tree)
                      if n > MAX_FUNCTION_LINES}
    assert set(long_functions) <= set(LONG_FUNCTIONS), {k: v for k, v in long_functions.items()
                                                        if k not in LONG_FUNCTIONS}
    assert set(LONG_FUNCTIONS) <= set(long_functions), f"short now: {sorted(set(LONG_FUNCTIONS) - set(long_functions))}"


def test_every_subpackage_has_a_layer():
    for d in PACKAGE.iterdir():
        if d.is_dir() and (d / "__init__.py").exists():
            layer(f"kdprune_cli.{d.name}")
