"""The rooms' import rules: the app's service layer imports no Textual; the ML layer no Textual,
no networking. Checked in a fresh interpreter (sys.modules) and by reading the sources (AST)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _loaded_after_import(modules: list[str]) -> set[str]:
    code = (
        "import json, sys\n"
        f"for name in {modules!r}: __import__(name)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return set(json.loads(out.stdout))


def _top_level(names: set[str]) -> set[str]:
    return {name.split(".")[0] for name in names}


def test_service_layer_imports_no_textual():
    loaded = _top_level(_loaded_after_import([
        "app.services", "app.services.chat", "app.services.models", "app.services.devices",
        "app.services.train", "serving.history",
    ]))
    assert "textual" not in loaded and "rich" not in loaded
    # Nothing heavy either: models and the mesh load in workers, when used.
    assert not loaded & {"torch", "transformers", "llama_cpp", "zeroconf"}


def test_ml_layer_imports_no_textual_or_networking():
    """Importing every training module pulls in no Textual and no mDNS. (`socket` itself is
    loaded indirectly by the standard library and torch, so for it the rule is read from the
    sources below: no training module imports it.)"""
    modules = sorted(f"training.{p.stem}" for p in (REPO / "training").glob("*.py") if p.stem != "__init__")
    loaded = _top_level(_loaded_after_import(modules))
    assert "textual" not in loaded
    assert "zeroconf" not in loaded
    assert "mesh" not in loaded


def _imports_of(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def test_training_sources_import_no_socket_zeroconf_or_textual():
    for path in sorted((REPO / "training").glob("*.py")):
        bad = _imports_of(path) & {"socket", "zeroconf", "textual", "mesh", "app", "ssl"}
        assert not bad, f"{path.name} imports {sorted(bad)}"


def test_service_and_history_sources_import_no_textual():
    paths = sorted((REPO / "app" / "services").glob("*.py")) + [REPO / "serving" / "history.py"]
    for path in paths:
        bad = _imports_of(path) & {"textual", "rich"}
        assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}"
