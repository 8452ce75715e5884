"""The examples gallery runs: every script in ``examples/`` exits 0 in tiny mode and prints
its verifying ``OK:`` line; each uses only the public API and is listed in the gallery."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import beyondgrad as bg

ROOT = Path(__file__).parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


def test_gallery_is_complete() -> None:
    names = {p.name for p in EXAMPLES}
    for required in (
        "per_sample_gradients.py",
        "curvature_diagonals.py",
        "kfac_factors.py",
        "operators_and_spectra.py",
        "optimizer_swap.py",
        "cockpit_monitoring.py",
        "conv_toolkit.py",
    ):
        assert required in names
    gallery = (ROOT / "examples" / "README.md").read_text()
    docs_page = (ROOT / "docs" / "examples.md").read_text()
    for name in names:
        assert name in gallery, f"examples/README.md does not list {name}"
        assert f'--8<-- "examples/{name}"' in docs_page, f"docs/examples.md does not show {name}"
    assert "examples/" in (ROOT / "README.md").read_text()


def beyondgrad_uses(tree: ast.AST) -> list[str]:
    """Problems: imports of beyondgrad other than ``import beyondgrad as bg``, and private
    attributes reached through ``bg``."""
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("beyondgrad"):
            problems.append(f"line {node.lineno}: from {node.module} import ...")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("beyondgrad") and (alias.name, alias.asname) != (
                    "beyondgrad",
                    "bg",
                ):
                    problems.append(f"line {node.lineno}: import {alias.name}")
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_"):
            base = node.value
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(base, ast.Name) and base.id == "bg":
                problems.append(f"line {node.lineno}: private bg.*.{node.attr}")
    return problems


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_is_documented_and_public(path: Path) -> None:
    source = path.read_text()
    tree = ast.parse(source)
    doc = ast.get_docstring(tree)
    assert doc and "--small" in doc, f"{path.name}: a docstring saying what it shows and --small"
    assert "BEYONDGRAD_EXAMPLES_SMALL" in source
    assert "import beyondgrad as bg" in source
    assert not beyondgrad_uses(tree), beyondgrad_uses(tree)
    if "matplotlib" in source:
        assert 'matplotlib.use("Agg")' in source, f"{path.name}: use the Agg backend"


def test_public_api_check_can_fail() -> None:
    bad = ast.parse("from beyondgrad.engine import compute\nimport beyondgrad as bg\nbg._x.y\n")
    assert len(beyondgrad_uses(bad)) == 2


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_runs(path: Path, tmp_path: Path) -> None:
    src = str(Path(bg.__file__).parents[1])  # run against the beyondgrad under test
    env = {
        **os.environ,
        "BEYONDGRAD_EXAMPLES_SMALL": "1",
        "MPLBACKEND": "Agg",
        "TMPDIR": str(tmp_path),  # figures and logs land in the test's temporary directory
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, str(path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"{path.name} failed:\n{proc.stdout}\n{proc.stderr}"
    assert any(line.startswith("OK:") for line in proc.stdout.splitlines()), proc.stdout
