"""The console app (``beyondgrad.app``): dependencies, the zoo, run directories, checkpoints and
bit-identical resume, clear errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from beyondgrad.app import train as train_mod
from beyondgrad.app.cli import main
from beyondgrad.app.rundir import RunDirError, atomic_write, read_log
from beyondgrad.app.tasks import PROBLEMS, TASKS, ZOO, Task, make_problem, make_task

SRC = Path(__file__).parents[1] / "src"

BLOCKER = """
import importlib.abc, sys
BLOCKED = ("matplotlib", "sklearn", "tqdm")

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked (not installed)")
        return None

sys.meta_path.insert(0, Blocker())
for name in [m for m in sys.modules if m.split(".")[0] in BLOCKED]:
    del sys.modules[name]
"""


def _python(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(SRC))
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(BLOCKER) + textwrap.dedent(code)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip


def test_core_imports_and_computes_without_the_app_dependencies():
    """``pip install beyondgrad`` brings torch, numpy, scipy only: ``import beyondgrad`` and
    ``bg.compute`` must work with matplotlib, scikit-learn and tqdm unimportable."""
    proc = _python("""
        import torch, beyondgrad as bg
        import beyondgrad.app.tasks, beyondgrad.app.train, beyondgrad.app.cli  # lazy app deps
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        X, y = torch.randn(5, 3), torch.tensor([0, 1, 0, 1, 1])
        res = bg.compute(model, torch.nn.CrossEntropyLoss(), X, y, bg.BatchGrad(), bg.DiagGGN())
        assert res[bg.BatchGrad]["0.weight"].shape == (5, 4, 3)
        try:
            import matplotlib
        except ImportError:
            pass
        else:
            raise SystemExit("the blocker does not block")
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        assert not loaded, loaded
        try:
            beyondgrad.app.tasks.make_task("digits-mlp")
        except ImportError as err:
            assert "beyondgrad[app]" in str(err)
        else:
            raise SystemExit("the digits task loaded without scikit-learn")
        print("ok")
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("ok")


# -- the zoo ------------------------------------------------------------------------------------
def test_zoo_names_and_problems():
    assert set(TASKS) <= set(ZOO) and "gpt" in ZOO
    assert PROBLEMS == ("mlp", "cnn", "transformer")
    p = make_problem("transformer", batch_size=2)  # the benchmarks' transformer is the GPT
    assert p.name == "transformer" and p.X.shape == (2, 64)
    assert p.model.head.weight is p.model.tok.weight  # tied
    q = make_problem("mlp", seed=3, batch_size=4)
    r = make_problem("mlp", seed=3, batch_size=4)
    assert torch.equal(q.X, r.X) and torch.equal(q.model[0].weight, r.model[0].weight)
    assert make_task("kron-lsq").problem(8).X.shape == (8, 32)
    with pytest.raises(ValueError, match="unknown task"):
        make_task("nope")
    with pytest.raises(ValueError, match="unknown problem"):
        make_problem("nope")


def test_batches_resume_mid_stream():
    task = make_task("kron-lsq", batch_size=1000)  # 4 batches per epoch
    stream = task.batches(seed=5)
    batches = [next(stream) for _ in range(11)]
    for start in (0, 3, 4, 9):
        X, y = next(task.batches(seed=5, start=start))
        assert torch.equal(X, batches[start][0]) and torch.equal(y, batches[start][1])


# -- run directories ----------------------------------------------------------------------------
def test_atomic_write_keeps_the_old_file_on_error(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text("old")

    def fail(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, fail)
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]  # no leftovers


def test_read_log_tolerates_a_truncated_last_line(tmp_path, capsys):
    log = tmp_path / "cockpit.jsonl"
    log.write_text('{"step": 0, "Loss": 2.0}\n{"step": 1, "Loss": 1.5}\n{"step": 1, "Upd')
    with pytest.warns(UserWarning, match="truncated last line"):
        records = read_log(tmp_path)
    assert [r["step"] for r in records] == [0, 1]
    with pytest.warns(UserWarning):
        assert main(["plot", str(tmp_path)]) == 0
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000
    log.write_text('{"step": 0, "Loss": 2.0}\nnot json\n{"step": 1, "Loss": 1.5}\n')
    with pytest.raises(RunDirError, match="line 2"):
        read_log(log)


@pytest.mark.parametrize("content", [b"\x89PNG\r\n\x1a\n\x00\x00", b"hello\nworld\n", b""])
def test_plot_on_a_file_that_is_not_a_log_is_a_clear_error(tmp_path, capsys, content):
    path = tmp_path / "picture.png"
    path.write_bytes(content)
    with pytest.raises(SystemExit) as exc:
        main(["plot", str(path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "is not a Cockpit log" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        main(["plot", str(tmp_path / "missing")])
    assert "no Cockpit log" in capsys.readouterr().err


_QUICK = ["train", "--steps", "3", "--eval-every", "2", "--quiet", "--cockpit", "none"]


def test_train_refuses_a_non_empty_out_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as exc:
        main([*_QUICK, "--out", str(out)])
    assert exc.value.code == 2 and "--resume" in capsys.readouterr().err
    assert main([*_QUICK, "--out", str(out), "--overwrite", "--optimizer", "sgd"]) == 0
    assert (out / "notes.txt").read_text() == "mine"  # only run files are replaced
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 3
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--device", "banana"], "not a torch device"),
        (["--lr", "inf"], "positive finite"),
        (["--lr", "nan"], "positive finite"),
        (["--lr", "-1"], "positive finite"),
        (["--lr", "0"], "positive finite"),
        (["--weight-decay", "inf"], "finite"),
        (["--steps", "0"], "positive integer"),
    ],
)
def test_train_argument_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_train_unwritable_out_is_a_clear_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as exc:
        main([*_QUICK, "--out", str(blocker / "run")])  # a file where a directory should be
    assert exc.value.code == 2
    assert "cannot write the run directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*_QUICK, "--out", str(blocker)])
    assert "is a file" in capsys.readouterr().err


def test_resume_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--resume", str(tmp_path)])
    assert "not a run directory" in capsys.readouterr().err
    out = tmp_path / "run"
    assert main([*_QUICK, "--out", str(out), "--optimizer", "adamw"]) == 0
    with pytest.raises(SystemExit):
        main(["train", "--resume", str(out), "--lr", "0.1"])
    assert "not --lr" in capsys.readouterr().err
    (out / "checkpoint.pt").unlink()
    with pytest.raises(SystemExit):
        main(["train", "--resume", str(out)])
    assert "no checkpoint.pt" in capsys.readouterr().err


# -- checkpoints and resume ---------------------------------------------------------------------
def _config(out: Path, optimizer: str, cockpit: str, **kw) -> train_mod.TrainConfig:
    settings = dict(
        task="digits-mlp", optimizer=optimizer, cockpit=cockpit, steps=6, lr_schedule="cosine",
        warmup=2, eval_every=2, plot_every=100, checkpoint_every=100, progress=False,
    )  # fmt: skip
    return train_mod.TrainConfig(**(settings | kw), out=str(out))


def _params(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoint.pt", weights_only=True)["model"]


def _interrupt_at(monkeypatch, step: int, how) -> None:
    """Make the batch stream of a fresh run call ``how()`` when it serves ``step``."""
    batches = Task.batches

    def patched(self, seed, start=0):
        for i, batch in enumerate(batches(self, seed, start), start):
            if i == step and start == 0:
                how()
            yield batch

    monkeypatch.setattr(Task, "batches", patched)


def _ctrl_c() -> None:
    signal.raise_signal(signal.SIGINT)


def _kill() -> None:
    raise KeyboardInterrupt


@pytest.mark.parametrize(
    "optimizer, cockpit, how, stopped",
    [("kfac", "economy", _ctrl_c, 4), ("sgd", "none", _kill, 3)],
    ids=["kfac-ctrl-c", "sgd-keyboard-interrupt"],
)
def test_resume_is_bit_identical(tmp_path, monkeypatch, optimizer, cockpit, how, stopped):
    """Stop at a step (Ctrl-C: after the step under way; KeyboardInterrupt: at once), resume:
    the parameters equal those of a run never stopped, exactly (cosine LR schedule)."""
    full = train_mod.train(_config(tmp_path / "full", optimizer, cockpit))
    with monkeypatch.context() as m:
        _interrupt_at(m, 3, how)
        part = train_mod.train(_config(tmp_path / "part", optimizer, cockpit))
    assert part["status"] == "interrupted" and part["checkpoint_step"] == stopped
    saved = json.loads((tmp_path / "part" / "summary.json").read_text())
    assert saved["status"] == "interrupted" and saved["steps"] == stopped
    stopped_params = _params(tmp_path / "part")
    assert any(not torch.equal(stopped_params[k], v) for k, v in _params(tmp_path / "full").items())
    resumed = train_mod.resume(tmp_path / "part", progress=False)
    assert resumed["status"] == "finished" and resumed["steps"] == 6
    a, b = _params(tmp_path / "full"), _params(tmp_path / "part")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["final_loss"] == full["final_loss"]
    if cockpit != "none":  # the log holds every step once, Loss as in the uninterrupted run
        logs = [read_log(tmp_path / r) for r in ("full", "part")]
        assert [r["step"] for r in logs[1]] == list(range(6))
        assert [r["Loss"] for r in logs[0]] == [r["Loss"] for r in logs[1]]
        assert [r["Distance"] for r in logs[0]] == [r["Distance"] for r in logs[1]]
        assert (tmp_path / "part" / "dashboard.png").exists()


def test_resume_after_a_kill_inside_the_backward_pass(tmp_path, monkeypatch):
    """KeyboardInterrupt in the middle of step 3's backward pass (Cockpit and KFAC capture
    active, the Cockpit's random draws done): the checkpoint is step 3 as it began; resume is
    exact, and so is every logged instrument."""
    train_mod.train(_config(tmp_path / "full", "kfac", "business"))
    make = train_mod.make_task

    def make_task_with_a_kill(name, seed=0, batch_size=None):
        task = make(name, seed, batch_size)
        calls = {"n": 0}

        def kill(grad):
            raise KeyboardInterrupt

        def hook(module, args, output):
            if module.training and torch.is_grad_enabled():  # not beyondgrad's probe forwards
                calls["n"] += 1
                if calls["n"] == 4:  # in the backward pass, after the curvature's draws
                    output.register_hook(kill)

        task.model[2].register_forward_hook(hook)
        return task

    with monkeypatch.context() as m:
        m.setattr(train_mod, "make_task", make_task_with_a_kill)
        part = train_mod.train(_config(tmp_path / "part", "kfac", "business"))
    assert part["status"] == "interrupted" and part["checkpoint_step"] == 3
    train_mod.resume(tmp_path / "part", progress=False)
    a, b = _params(tmp_path / "full"), _params(tmp_path / "part")
    assert all(torch.equal(a[k], b[k]) for k in a)
    logs = [read_log(tmp_path / r) for r in ("full", "part")]
    assert [r["step"] for r in logs[1]] == list(range(6))
    for r0, r1 in zip(*logs):
        differ = {k for k in r0.keys() | r1.keys() if r0.get(k) != r1.get(k)}
        assert differ <= {"Alpha"}, (r0["step"], differ)


def test_a_kill_inside_the_update_resumes_from_the_last_checkpoint(tmp_path, monkeypatch):
    """Interrupted inside ``optimizer.step()`` (state half-written), the run keeps its last
    periodic checkpoint, and resuming from it still equals the uninterrupted run."""
    train_mod.train(_config(tmp_path / "full", "adamw", "none", checkpoint_every=2))
    calls = {"n": 0}
    step = torch.optim.AdamW.step

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # inside the update of step 3
            raise KeyboardInterrupt
        return step(self, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(torch.optim.AdamW, "step", flaky)
        part = train_mod.train(_config(tmp_path / "part", "adamw", "none", checkpoint_every=2))
    assert part["status"] == "interrupted" and part["checkpoint_step"] == 2
    resumed = train_mod.resume(tmp_path / "part", progress=False)
    a, b = _params(tmp_path / "full"), _params(tmp_path / "part")
    assert all(torch.equal(a[k], b[k]) for k in a) and resumed["steps"] == 6


def test_divergence_writes_summary_checkpoint_and_dashboard(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--task", "kron-lsq", "--optimizer", "sgd", "--lr", "1e3", "--quiet"]
    assert main([*argv, "--steps", "50", "--out", str(out)]) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["steps"] < 50
    assert summary["checkpoint_step"] == summary["steps"]
    assert (out / "checkpoint.pt").exists() and (out / "dashboard.png").exists()
    assert "diverged" in capsys.readouterr().out


@pytest.mark.parametrize("optimizer", ["sgd", "singd", "sirfshampoo"])
def test_kron_lsq_trains_at_the_defaults(tmp_path, optimizer):
    """These diverged within 10 steps at the app's former defaults (SINGD: at step 1)."""
    config = train_mod.TrainConfig(
        task="kron-lsq", optimizer=optimizer, steps=40, eval_every=100, progress=False,
        out=str(tmp_path / "run"),
    )  # fmt: skip
    summary = train_mod.train(config)
    assert summary["status"] == "finished", summary["divergence"]
    assert summary["val_1_excess_initial"] > 0.5


@pytest.mark.parametrize("optimizer", ["adamw", "kfac", "kfac-adam", "singd", "sirfshampoo"])
def test_kron_lsq_reaches_its_target_at_the_app_settings(tmp_path, optimizer):
    """`beyondgrad train --task kron-lsq --optimizer X` reaches the task's target in its
    default steps (AdamW, SINGD and SIRFShampoo ended at 0.993-0.996 before their per-task lr)."""
    config = train_mod.TrainConfig(
        task="kron-lsq", optimizer=optimizer, cockpit="none", progress=False,
        out=str(tmp_path / "run"),
    )  # fmt: skip
    summary = train_mod.train(config)
    assert summary["status"] == "finished"
    assert summary["target_reached"] is not None, summary["val_1_excess_initial"]


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", train_mod.OPTIMIZERS)
@pytest.mark.parametrize("task", TASKS)
def test_every_task_trains_at_the_defaults(tmp_path, task, optimizer):
    config = train_mod.TrainConfig(
        task=task, optimizer=optimizer, cockpit="none", progress=False, out=str(tmp_path / "r")
    )
    assert train_mod.train(config)["status"] == "finished"


def test_factory_names_dtypes_by_string():
    """``kfac-bf16`` is KFAC with bf16 statistics and preconditioner; settings name dtypes as
    strings (JSON-able) and a name that is no floating dtype is refused."""
    from beyondgrad.app.optimizers import SETTINGS, make_optimizer
    from beyondgrad.optim import KFAC

    task = make_task("kron-lsq")
    opt = make_optimizer("kfac-bf16", task.model, task.loss_fn)
    assert isinstance(opt, KFAC)
    assert opt.statistics_dtype == opt.preconditioner_dtype == torch.bfloat16
    assert {k: v for k, v in SETTINGS["kfac-bf16"].items() if "dtype" not in k} == SETTINGS["kfac"]
    plain = make_optimizer("kfac", task.model, task.loss_fn)
    assert plain.statistics_dtype is None and plain.preconditioner_dtype is None
    with pytest.raises(ValueError, match="floating torch dtype"):
        make_optimizer("kfac", task.model, task.loss_fn, statistics_dtype="int32")


def test_bench_uses_the_one_factory():
    from beyondgrad.app import bench
    from beyondgrad.app.optimizers import available, make_optimizer

    r = bench.run("kron-lsq", "adamw", {"lr": 1e-3, "weight_decay": 0.0}, 0, 60.0, max_steps=4,
                  eval_every=2)  # fmt: skip
    assert r.steps == 4 and not r.reached and not r.diverged and len(r.history) == 2
    task = make_task("kron-lsq")
    opt = bench.build("kfac", task.model, task.loss_fn, {"lr": 0.1, "damping": 1e-2,
                                                         "weight_decay": 0.0})  # fmt: skip
    assert opt.param_groups[0]["lr"] == 0.1
    for name in ("adamw", "sgd", "kfac", "singd", "sirfshampoo", "muon"):
        if available(name):
            assert make_optimizer(name, task.model, task.loss_fn).state_dict() is not None
    with pytest.raises(ValueError, match="unknown optimizer"):
        make_optimizer("lbfgs", task.model, task.loss_fn)
    table = bench.render({
        "meta": {"torch": "x", "device": "cpu", "threads": 1, "trials": 1, "seeds": 1,
                 "max_seconds": 1.0},
        "tasks": {"kron-lsq": {"target": 0.999, "cells": {
            "adamw": bench.Cell({"lr": 1e-3}, [r], 1.0).summary()}}},
    })  # fmt: skip
    assert "| adamw |" in table


def test_bench_search_spaces_follow_the_factory_defaults():
    """``beyondgrad bench optim`` samples ``lr`` within 1/20..5x of the factory's default (a
    space fixed by hand went stale when KFAC's default moved from 0.2 to an Adam-grafted 3e-3,
    and the benchmark then tried KFAC at 10-300x its learning rate)."""
    from beyondgrad.app import bench
    from beyondgrad.app.optimizers import DEFAULT_LR

    for name, space in bench.SEARCH_SPACES.items():
        g = torch.Generator().manual_seed(0)
        lrs = [space["lr"](g) for _ in range(200)]
        base = DEFAULT_LR[name]
        assert base / 20 <= min(lrs) < base / 10 and base * 2.5 < max(lrs) <= base * 5, name
        assert ("damping" in space) == (name in ("kfac", "singd", "sirfshampoo"))


@pytest.mark.parametrize("old, name", [("problems", "make_problem"), ("tasks", "make_task"),
                                       ("cli", "main")])  # fmt: skip
def test_old_module_paths_still_work_with_a_deprecation_warning(old, name):
    import importlib

    with pytest.warns(DeprecationWarning, match="moved to beyondgrad.app"):
        module = importlib.import_module(f"beyondgrad.{old}")
        importlib.reload(module)
    assert callable(getattr(module, name))
