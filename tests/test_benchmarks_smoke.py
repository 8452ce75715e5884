"""The benchmark scripts cannot rot: each runs end to end with ``--smoke`` (tiny sizes, one rep,
output to a temporary directory), and the committed tables keep their columns when re-rendered
from their JSON.

The smoke runs check that the scripts work, not how fast anything is: their numbers mean nothing.
A peer library that is not installed (BackPACK, Opacus, curvlinops, PyHessian) must turn its rows
into "n/a" rows, never into errors.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
RESULTS = BENCH / "results"
PEERS = {  # library label in the tables -> module that must import for its rows to run
    "backpack": "backpack",
    "opacus": "opacus",
    "opacus ghost": "opacus",
    "curvlinops": "curvlinops",
    "pyhessian": "pyhessian",
    "pyhessian (cached graph)": "pyhessian",
}
SCRIPTS = ("first_order", "second_order", "linops", "conv_toolkit", "cockpit")


def importable(module: str) -> bool:
    """Whether a peer's module imports here."""
    try:
        importlib.import_module(module)
    except Exception:
        return False
    return True


def run_smoke(script: str, out: Path) -> subprocess.CompletedProcess[str]:
    """``python benchmarks/<script>.py --smoke --out <out>`` with this tree's package."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(BENCH)]))
    cmd = [sys.executable, str(BENCH / f"{script}.py"), "--smoke", "--out", str(out)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def check_rows(rows: list[dict]) -> None:
    """beyondgrad's rows run (or refuse by design); a missing peer's rows read n/a."""
    assert rows, "no rows"
    for r in rows:
        where = f"{r['group']} / {r['library']}: {r['note']}"
        if r["library"] in ("beyondgrad", "torch"):
            assert r["status"] in ("ok", "refused"), where
        if r["library"] in PEERS and not importable(PEERS[r["library"]]):
            assert r["status"] == "n/a", where
        if r["status"] == "ok":
            assert r["time_ms"] > 0 and r["base_ms"] > 0 and r["mem_mib"] is not None, where


def check_agreement(agree: dict) -> None:
    """The checks of beyondgrad and torch.func ran and agree (float32, tiny batch)."""
    assert "error" not in agree, agree.get("error")
    for c in agree["checks"]:
        if c["library"] in ("beyondgrad", "torch.func"):
            assert c["status"] in ("ok", "refused"), c
            assert not c["mismatch"], c


@pytest.mark.parametrize("script", SCRIPTS)
def test_smoke(script: str, tmp_path: Path) -> None:
    out = tmp_path / f"{script}.md"
    proc = run_smoke(script, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    markdown, data = out.read_text(), json.loads(out.with_suffix(".json").read_text())
    assert markdown.startswith("# ") and "|---|" in markdown
    if script == "cockpit":
        assert [(r["config"], r["every"]) for r in data] == [
            ("economy", 1),
            ("business", 1),
            ("full", 1),
            ("full", 16),
            ("floor", 1),  # the mlp is made of nn.Linear layers only
        ]
        assert all(r["ratio"] > 0 for r in data)
        return
    assert data["meta"]["smoke"] and data["meta"]["torch"] and data["meta"]["threads"] >= 1
    if script == "conv_toolkit":
        assert data["rows"] and all(r["status"] == "ok" for r in data["rows"]), data["rows"]
        assert all(r["rel_err"] <= data["meta"]["tol"] for r in data["rows"])
        return
    for res in data["results"]:
        check_rows([r for r in res["rows"]])
        check_agreement(res["agreement"])
    if script == "linops":
        eigen, trace = data["results"][0]["eigen"], data["results"][0]["trace"]
        assert "error" not in eigen and "error" not in trace, (eigen, trace)


def test_smoke_writes_to_a_temporary_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCH))
    harness = importlib.import_module("harness")
    script = harness.Script(name="first_order", doc="x")
    args = script.parser().parse_args(["--smoke"])
    out = script.output(args)
    assert out.name == "first_order_cpu.md"
    assert RESULTS not in out.parents
    assert script.output(script.parser().parse_args([])) == RESULTS / "first_order_cpu.md"


def table_shapes(markdown: str) -> list[tuple[str, int]]:
    """Each table's header line and its number of rows: the structure of a report."""
    lines = markdown.splitlines()
    shapes, i = [], 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            j = i + 2
            while j < len(lines) and lines[j].startswith("|"):
                j += 1
            shapes.append((lines[i], j - i - 2))
            i = j
        else:
            i += 1
    return shapes


RENDERED = [
    ("first_order", "cpu"),
    ("first_order", "cuda"),
    ("second_order", "cpu"),
    ("second_order", "cuda"),
    ("conv_toolkit", "cpu"),
    ("conv_toolkit", "cuda"),
    ("linops", "cpu"),
]


@pytest.mark.parametrize(("script", "device"), RENDERED)
def test_committed_tables_keep_their_columns(
    script: str, device: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Re-rendering a committed run's JSON gives tables with the committed columns and rows."""
    md, js = RESULTS / f"{script}_{device}.md", RESULTS / f"{script}_{device}.json"
    if not md.exists() or not js.exists():
        pytest.skip(f"no committed {md.name}")
    monkeypatch.syspath_prepend(str(BENCH))
    module = importlib.import_module(script)
    data = json.loads(js.read_text())
    if script == "conv_toolkit":
        fields = {"name"}
        cases = [
            module.Case(
                **{k: tuple(v) if k == "size" else v for k, v in c.items() if k not in fields}
            )
            for c in data["cases"]
        ]
        rendered = module.render(data["meta"], data["rows"], cases)
    else:
        rendered = module.render(data["meta"], data["results"])
    assert table_shapes(rendered) == table_shapes(md.read_text())


def test_surgery_smoke(tmp_path: Path) -> None:
    """benchmarks/surgery.py (accuracy-based, needs scikit-learn's bundled digits)."""
    pytest.importorskip("sklearn")
    out = tmp_path / "surgery.md"
    proc = run_smoke("surgery", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["meta"]["smoke"] and out.read_text().startswith("# ")
    assert {r["method"] for r in data["merging"]} >= {"average", "RegMean, alpha 0.9"}
    assert all(0.0 <= r["0.5"] <= 1.0 for r in data["pruning"])


def test_optim_suite_quick(tmp_path: Path) -> None:
    """``optim_suite.py all --quick``: tune AdamW, calibrate, tune, timed, report (kron-lsq)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(BENCH)]))
    cmd = [sys.executable, str(BENCH / "optim_suite.py"), "all", "--quick", "--task", "kron-lsq",
           "--optimizer", "adamw", "kfac", "--budget", "0.3", "--calibrate-budget", "0.3",
           "--results", str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "optim_suite_cpu.json").read_text())
    assert set(data["results"]["kron-lsq"]["cells"]) == {"adamw", "kfac"}
    assert data["meta"]["quick"] and data["search_spaces"]["kfac"]["damping"]
    configs = json.loads((tmp_path / "optim_suite_configs.json").read_text())
    assert set(configs["kron-lsq"]["tuned"]) == {"adamw@0.3s", "kfac@0.3s"}
    assert "| kfac |" in (tmp_path / "optim_suite_cpu.md").read_text()
    lines = (tmp_path / "optim_suite_runs.jsonl").read_text().splitlines()
    assert len(lines) == 3 + 1 + 3 + 2  # trials AdamW, calibration, trials KFAC, timed


def test_allocator_script_writes_a_row_per_call_and_setting(tmp_path):
    """``allocator.py`` (fresh processes per malloc setting) on the mlp, one round: every call
    has a time and a page-fault count under each of the five settings."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(BENCH)]))
    out = tmp_path / "allocator.md"
    cmd = [sys.executable, str(BENCH / "allocator.py"), "--problems", "mlp", "--rounds", "1"]
    done = subprocess.run(
        [*cmd, "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(out.with_suffix(".json").read_text())
    calls = {c.split("|")[1] for c in found}
    assert calls >= {"forward+backward", "KFAC (MC)", "exact DiagGGN", "per-sample gradients"}
    for modes in found.values():
        assert set(modes) == {"no-pool", "default", "huge-pages", "retain", "retain-large"}
        assert all(0 < ms <= w and f >= 0 for runs in modes.values() for ms, f, w in runs)
    assert out.read_text().count("| mlp |") == len(found)


def test_subnormal_script_times_each_call_in_both_modes(tmp_path):
    """``subnormal.py`` on the mlp, one round: every call timed with the default mode and with
    flush-to-zero, in fresh processes; the mlp's softmax has (almost) no subnormal probabilities."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(BENCH)]))
    out = tmp_path / "subnormal.md"
    cmd = [sys.executable, str(BENCH / "subnormal.py"), "--problems", "mlp", "--rounds", "1"]
    done = subprocess.run(
        [*cmd, "--threads", "1", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(out.with_suffix(".json").read_text())
    assert set(found["shares"]) == {"mlp"} and 0.0 <= found["shares"]["mlp"] < 0.01
    assert {c.split("|")[1] for c in found["runs"]} >= {"forward+backward", "KFAC (MC)"}
    for modes in found["runs"].values():
        assert set(modes) == {"default", "flush-to-zero"}
        assert all(len(v) == 1 and v[0] > 0 for v in modes.values())
    assert out.read_text().count("| mlp |") == len(found["runs"])
