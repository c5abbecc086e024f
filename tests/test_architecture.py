"""The layering of docs/ARCHITECTURE.md, checked from the source: import-linter's contracts (pyproject.toml), no
import circle between any two modules (imports inside functions included), and no module importing another
module's ``_private`` name. Each check is also shown failing on a deliberate violation."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.import_graph import ImportGraph

ROOT = Path(__file__).resolve().parents[1]


def test_no_import_cycle_between_modules() -> None:
    graph = ImportGraph.from_tree(ROOT)
    assert len(graph.modules) > 80  # every package was read
    assert graph.cycles() == []


def test_no_private_name_imported_across_modules() -> None:
    assert ImportGraph.from_tree(ROOT).private_imports() == []


def test_core_imports_no_feature_and_no_app() -> None:
    graph = ImportGraph.from_tree(ROOT)
    bad = [(a, b) for a, b in graph.edges()
           if a.split(".")[0] == "medvlm" and not a.startswith("medvlm.app")
           and (b.split(".")[0] in ("segmentation", "agents", "eval", "finetune", "prompts")
                or b.startswith("medvlm.app"))]
    assert bad == []


def test_checks_catch_a_deliberate_violation(tmp_path: Path) -> None:
    """A copy of two packages with a private import and a circle added: both checks must see them."""
    for pkg in ("medvlm", "eval"):
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__", "assets", "static"))
    (tmp_path / "medvlm" / "coords.py").write_text(
        (ROOT / "medvlm" / "coords.py").read_text()
        + "\n\ndef _late() -> None:\n    from medvlm.io import _x  # noqa\n")
    (tmp_path / "medvlm" / "io.py").write_text((ROOT / "medvlm" / "io.py").read_text() + "\nimport medvlm.coords\n")
    graph = ImportGraph.from_tree(tmp_path)
    assert ("medvlm.coords", "medvlm.io", "_x") in graph.private_imports()
    assert any({"medvlm.coords", "medvlm.io"} <= set(c) for c in graph.cycles())


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("lint-imports")
    if not exe.exists():
        pytest.skip("import-linter is not installed (make install brings it)")
    # the tree under test comes first on the path, before the installed (editable) checkout
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run([str(exe), "--no-cache"], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


def test_import_linter_contracts_hold() -> None:
    run = _lint_imports(ROOT)
    assert run.returncode == 0, run.stdout[-3000:]
    assert "4 kept, 0 broken" in run.stdout


def test_import_linter_fails_on_a_core_module_importing_a_feature(tmp_path: Path) -> None:
    """The contract is live: the same tree with the core importing segmentation (inside a function) is refused."""
    for pkg in ("medvlm", "prompts", "segmentation", "agents", "finetune", "eval"):
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__", "weights", "assets"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "medvlm" / "coords.py").write_text(
        (ROOT / "medvlm" / "coords.py").read_text()
        + "\n\ndef _violation() -> None:\n    from segmentation.base import Prompt  # noqa: F401\n")
    run = _lint_imports(tmp_path)
    assert run.returncode != 0
    assert "medvlm.coords -> segmentation.base" in run.stdout
