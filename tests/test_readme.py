"""The README opens with the two set-up commands; CI runs exactly the test command."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from beyondgrad.app.cli import main

ROOT = Path(__file__).parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(.+?)\n```", text)[:2]


def test_ci_runs_the_readme_test_command():
    main_job, tests = readme_commands()
    assert "beyondgrad train" in main_job
    assert "pytest" in tests
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert tests in ci, "the README's test command and .ci/run differ"


def test_cli_help_and_errors(capsys):
    assert main([]) == 0
    assert "demo" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--problem", "nope"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["demo", "--reps", "0"])
    assert "positive integer" in capsys.readouterr().err


def test_cli_coverage(capsys):
    assert main(["coverage", "--problem", "mlp"]) == 0
    out = capsys.readouterr().out
    assert "0.weight" in out and "linear" in out


def test_cli_demo_runs_end_to_end(capsys):
    assert main(["demo", "--problem", "mlp", "--reps", "1"]) == 0
    out = capsys.readouterr().out
    for name in ("BatchGrad", "BatchL2", "Variance", "max relative error"):
        assert name in out


def test_main_job_installs_the_app_extra_and_the_core_needs_no_app_dependency():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    main_job, _ = readme_commands()
    assert '-e ".[app]"' in main_job
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    app = set(project["optional-dependencies"]["app"])
    assert app == {"matplotlib", "scikit-learn", "tqdm"}
    assert app <= set(project["optional-dependencies"]["test"])
    core = {d.split(">")[0].split("=")[0].split("<")[0] for d in project["dependencies"]}
    assert core == {"torch", "numpy", "scipy"}
    assert project["scripts"]["beyondgrad"] == "beyondgrad.app.cli:main"
