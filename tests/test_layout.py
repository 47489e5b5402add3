"""The direction of the imports that README's Layout states: `handlers` never imports `app`, and the
training core imports nothing of a run's life, the commands or the sweep."""
from __future__ import annotations

import ast
from pathlib import Path

from tests.support import ROOT

CORE = {"config", "typed_json", "datasets", "data", "loader", "augment", "mixing", "model", "optim", "loss_scale",
        "ema", "engines", "cuda_graph", "compiling", "device", "errors"}


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module == "app":  # from app import typed_json
            found |= {f"app.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_handlers_never_import_the_application() -> None:
    for path in (ROOT / "handlers").glob("*.py"):
        assert not {m for m in _imports(path) if m == "app" or m.startswith("app.")}, path


def test_the_training_core_imports_only_the_core() -> None:
    for name in CORE:
        outside = {m for m in _imports(ROOT / "app" / f"{name}.py") if m.startswith("app.")
                   and m.split(".")[1] not in CORE}
        assert not outside, (name, outside)
