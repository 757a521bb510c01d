"""The folders of flower_sparsepush are layers; each may import only the layers below it (every import statement
counts, those inside functions too). The rules are the ones each folder's __init__ docstring states."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "flower_sparsepush"

# layer -> what it may import from this project (besides itself); None = anything
ALLOWED: dict[str, set[str] | None] = {
    "core": set(),
    "learn": {"core"},
    "run": {"core", "learn"},
    "flower": {"core", "learn", "run", "strategies"},
    "strategies": {"core", "learn", "run", "flower"},
    "deploy": {"core", "learn", "run", "flower", "strategies"},
}
NO_FLWR = {"core", "learn", "run"}


def _layer_files() -> list[tuple[str, Path]]:
    files = [(layer, p) for layer in ALLOWED if layer != "strategies" for p in sorted((PKG / layer).glob("*.py"))]
    return files + [("strategies", p) for p in sorted((ROOT / "strategies").glob("*.py"))]


def imported_modules(path: Path) -> set[str]:
    """Every module name an import statement of ``path`` names (relative imports resolved to strategies')."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # only strategies/ uses relative imports
                names.add("flower_sparsepush.strategies")
            elif node.module == "flower_sparsepush":
                names.update(f"flower_sparsepush.{alias.name}" for alias in node.names)
            elif node.module:
                names.add(node.module)
    return names


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "flower_sparsepush" and len(parts) > 1 else None


def test_every_module_is_in_a_layer():
    loose = sorted(p.name for p in PKG.glob("*.py") if p.name not in ("__init__.py", "cli.py"))
    assert loose == [], f"modules outside a layer folder: {loose}"
    assert {p.name for p in PKG.iterdir() if p.is_dir() and not p.name.startswith("__")} == set(ALLOWED) - {
        "strategies"
    }


@pytest.mark.parametrize("layer,path", _layer_files(), ids=lambda v: v.name if isinstance(v, Path) else v)
def test_layer_imports(layer: str, path: Path):
    allowed = ALLOWED[layer] | {layer}
    for module in imported_modules(path):
        if module.split(".")[0] == "flwr":
            assert layer not in NO_FLWR, f"{path.relative_to(ROOT)} imports {module}: {layer}/ never imports flwr"
        other = layer_of(module)
        if other is not None and other != "__init__":
            assert other in allowed, f"{path.relative_to(ROOT)} imports {module}: {layer}/ may import {sorted(allowed)}"


def test_the_rule_can_fail(tmp_path: Path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from flwr.app import Message\n    from flower_sparsepush.flower import protocol\n")
    assert imported_modules(bad) == {"flwr.app", "flower_sparsepush.flower"}
    assert layer_of("flower_sparsepush.flower.protocol") == "flower"
