"""The optimizer suite (``benchmarks/optim_suite.py``) and its tasks (``beyondgrad.app.tasks``).

The tasks build, are deterministic and train a step on a tiny slice; the harness's quasi-random
sampling, successive halving, resume, rescoring, calibration and report are checked on a fake
objective that needs no training (a curve per configuration, in simulated seconds).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from beyondgrad.app.optimizers import DEFAULT_LR
from beyondgrad.app.tasks import (
    SUITE_TASKS,
    TASKS,
    augment_digits,
    make_task,
    stdlib_corpus,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import optim_suite as suite

NEEDS_DIGITS = {"autoencoder", "digits-resnet"}


def _build(name: str, seed: int = 0):
    if name in NEEDS_DIGITS:
        pytest.importorskip("sklearn")
    return make_task(name, seed)


# -- tasks ---------------------------------------------------------------------------------------
def test_suite_tasks_are_trainable_tasks_and_the_suite_names_them():
    assert set(SUITE_TASKS) <= set(TASKS)
    assert sorted(suite.SUITE.values()) == sorted(SUITE_TASKS)
    assert set(suite.MAXIMIZE) == set(suite.SUITE) == set(suite.EVAL_EVERY)


def test_stdlib_corpus_is_deterministic_and_sized():
    a, b = stdlib_corpus(4096), stdlib_corpus(4096)
    assert a == b and len(a) == 4096
    assert stdlib_corpus(8192)[:4096] == a  # a prefix of the sorted concatenation
    with pytest.raises(RuntimeError, match="bytes"):
        stdlib_corpus(10**12)


@pytest.mark.parametrize("key", list(suite.SUITE))
def test_suite_task_builds_deterministically_and_trains_a_step(key):
    name = suite.SUITE[key]
    t1, t2 = _build(name), _build(name)
    assert t1.maximize == suite.MAXIMIZE[key] and t1.target is not None
    for a, b in zip(t1.model.parameters(), t2.model.parameters(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip((*t1.train, *t1.val), (*t2.train, *t2.val), strict=True):
        assert torch.equal(a, b)
    if key != "kron-lsq":  # (its trained layer starts at zero) the seed sets the init
        other = next(_build(name, 1).model.parameters())
        assert not torch.equal(other, next(t1.model.parameters()))
    p = t1.problem(2)
    loss = p.loss_fn(p.model(p.X), p.y)
    loss.backward()
    assert math.isfinite(loss.item())
    assert all(q.grad is not None for q in p.model.parameters() if q.requires_grad)


def test_char_gpt_windows_are_next_byte_targets():
    task = make_task("char-gpt")
    X, y = task.train
    assert X.shape[1] == 128 and X.dtype == torch.long and int(X.max()) < 256
    assert torch.equal(X[0, 1:], y[0, :-1]) and torch.equal(X[1, 0], y[0, -1])
    assert not task.maximize and task.reached(task.target - 0.1)
    assert not task.reached(task.target + 0.1) and not task.reached(math.nan)


def test_augmented_digits_are_seeded_and_copy_major():
    X = torch.rand(5, 64, dtype=torch.float32)
    a = augment_digits(X, 2, torch.Generator().manual_seed(0))
    b = augment_digits(X, 2, torch.Generator().manual_seed(0))
    assert a.shape == (10, 1, 16, 16) and torch.equal(a, b)
    assert not torch.equal(a[:5], a[5:])  # two different random variants
    default = torch.get_default_dtype()
    try:  # the same draws under a float64 default
        torch.set_default_dtype(torch.float64)
        c = augment_digits(X, 2, torch.Generator().manual_seed(0))
    finally:
        torch.set_default_dtype(default)
    assert c.dtype == torch.float32 and torch.equal(a, c)


def test_task_reached_and_better_follow_the_direction():
    task = make_task("kron-lsq")
    assert task.maximize and task.reached(task.target) and not task.reached(0.5)
    assert task.better(0.5, 0.4) and not task.better(math.nan, 0.4) and task.better(0.1, math.nan)
    task.maximize = False
    assert task.better(0.4, 0.5) and task.reached(0.5)


# -- sampling and successive halving -------------------------------------------------------------
def test_sobol_configs_are_reproducible_in_range_and_shared_across_optimizers():
    space = suite.search_space("kfac")
    a, b = suite.sample_configs(space, 12), suite.sample_configs(space, 12)
    assert a == b and len(a) == 12 and len({c["lr"] for c in a}) == 12
    for c in a:
        for k, d in space.items():
            assert d.lo <= c[k] <= d.hi
        assert c["warmup"] == round(c["warmup"])
    # the same Sobol points: SINGD's configurations are KFAC's, rescaled
    singd = suite.sample_configs(suite.search_space("singd"), 12)
    assert [c["damping"] for c in singd] == [c["damping"] for c in a]
    assert suite.sample_configs(space, 12, seed=1) != a


def test_keep_ranks_against_the_earlier_trials():
    assert suite.keep(0.0, [], 3) and suite.keep(0.0, [1.0], 3)  # fewer than eta: go on
    assert not suite.keep(0.0, [1.0, 2.0], 3)  # top ceil(3/3) = 1 of 3
    assert suite.keep(3.0, [1.0, 2.0], 3)
    assert suite.keep(2.5, [1.0, 2.0, 3.0], 3)  # top ceil(4/3) = 2 of 4
    assert not suite.keep(1.5, [1.0, 2.0, 3.0], 3)
    assert suite.rung_times(90.0, 3, 2) == [10.0, 30.0]


def quality(optimizer: str, hp: dict[str, float]) -> float:
    return 2.0 - abs(math.log10(hp["lr"] / DEFAULT_LR[optimizer]))


def fake_objective(calls: list[Any], maximize: bool = True, fail: bool = False):
    """Simulated training: metric ``q (1 - exp(-t))`` with ``q = 2 - |log10(lr / lr0)|`` (best
    at the factory's default lr ``lr0``; minimized tasks see ``-metric``), evaluated every 0.1
    simulated seconds."""

    def objective(task, optimizer, hp, seed, budget, eval_every, device, target, monitor):
        if fail:
            raise AssertionError("a stored run was retrained")
        calls.append((optimizer, seed, hp["lr"]))
        q = quality(optimizer, hp) + 0.01 * seed
        history, stopped, t = [], False, 0.0
        while t < budget - 1e-9:
            t = round(t + 0.1, 6)
            m = q * (1 - math.exp(-t))
            history.append([round(t * 10), t, m if maximize else -m])
            if target is not None and (m >= target if maximize else -m <= target):
                break
            if monitor is not None and not monitor(t, m):
                stopped = True
                break
        return {"steps": history[-1][0], "train_s": t, "diverged": False, "stopped": stopped,
                "final": history[-1][2], "history": history, "ms_per_step": 100.0,
                "state_mib": 1.0}  # fmt: skip

    return objective


def test_tune_stops_poor_trials_early_and_chooses_the_best(tmp_path):
    calls: list[Any] = []
    plan = suite.Plan(suite.Store(tmp_path), objective=fake_objective(calls), progress=print)
    entry = suite.tune(plan, "kron-lsq", "adamw", 9.0, 12)
    trials = plan.store.select(kind="trial")
    assert len(trials) == len(calls) == 12
    assert any(r["stopped"] for r in trials) and not all(r["stopped"] for r in trials)
    stopped = [r for r in trials if r["stopped"]]
    assert all(r["train_s"] < 9.0 for r in stopped)
    assert quality("adamw", entry["hp"]) == max(quality("adamw", r["hp"]) for r in trials)
    configs = json.loads((tmp_path / "optim_suite_configs.json").read_text())
    assert configs["kron-lsq"]["tuned"]["adamw@9s"]["hp"] == entry["hp"]


def test_tune_resumes_from_the_stored_runs(tmp_path):
    calls: list[Any] = []
    plan = suite.Plan(suite.Store(tmp_path), objective=fake_objective(calls), progress=print)
    first = suite.tune(plan, "kron-lsq", "adamw", 9.0, 12)
    runs = tmp_path / "optim_suite_runs.jsonl"
    lines = runs.read_text().splitlines()
    runs.write_text("\n".join(lines[:5]) + "\n" + lines[5][:20])  # killed while writing run 6
    again: list[Any] = []
    plan = suite.Plan(suite.Store(tmp_path), objective=fake_objective(again), progress=print)
    assert suite.tune(plan, "kron-lsq", "adamw", 9.0, 12) == first
    assert len(again) == 7  # only the runs that were lost
    plan = suite.Plan(suite.Store(tmp_path), objective=fake_objective([], fail=True))
    assert suite.tune(plan, "kron-lsq", "adamw", 9.0, 12) == first  # nothing retrained


def test_calibrate_timed_and_report_with_a_minimized_metric(tmp_path, monkeypatch):
    monkeypatch.setitem(suite.MAXIMIZE, "gpt", False)
    calls: list[Any] = []
    plan = suite.Plan(suite.Store(tmp_path), objective=fake_objective(calls, maximize=False))
    with pytest.raises(SystemExit, match="tune"):
        suite.calibrate(plan, "gpt", 3.0, 3)
    suite.tune(plan, "gpt", "adamw", 3.0, 12)
    target = suite.calibrate(plan, "gpt", 3.0, 3)
    finals = plan.store.configs()["gpt"]["calibration"]["finals"]
    assert len(finals) == 3 and target == sorted(finals)[1] and target < 0
    for name in ("adamw", "kfac"):
        suite.tune(plan, "gpt", name, 6.0, 12)
        c = suite.timed(plan, "gpt", name, 6.0, 3)
        assert c["reached"] == 3 and c["median_seconds"] < 6.0 and c["diverged"] == 0
    args = suite.parser().parse_args(["report", "--task", "gpt", "--budget", "6"])
    suite._defaults(args)
    out = suite.report(plan, args, skipped=["soap"])
    text, data = out.read_text(), json.loads(out.with_suffix(".json").read_text())
    assert "| kfac |" in text and "lower is better" in text and "soap" in text
    assert set(data["results"]["gpt"]["cells"]) == {"adamw", "kfac"}
    assert data["geomeans"]["adamw"]["geomean"] == 1.0


def test_task_budgets_replace_the_budget_per_task_and_refuse_bad_input():
    args = suite.parser().parse_args(
        ["report", "--task", "gpt", "autoencoder", "--budget", "60",
         "--task-budget", "autoencoder=20"]
    )  # fmt: skip
    assert suite.budget_for(args, "autoencoder") == 20.0 and suite.budget_for(args, "gpt") == 60.0
    assert suite.budget_for(args, "gpt", calibrating=True) == 60.0
    for bad in ("autoencoder", "cifar=3", "gpt=-1", "gpt=x"):
        args = suite.parser().parse_args(["report", "--task-budget", bad])
        with pytest.raises(SystemExit, match="TASK=SECONDS"):
            suite.budget_for(args, "gpt")


def test_outcome_rescores_a_stored_history():
    rec = {"history": [[10, 1.0, 0.5], [20, 2.0, 0.7], [30, 3.0, 0.9]], "steps": 30}
    assert suite.outcome(rec, 0.6, True, 10.0) == {"reached": True, "seconds": 2.0, "steps": 20}
    assert suite.outcome(rec, 0.95, True, 10.0) == {"reached": False, "seconds": 10.0,
                                                     "steps": 30}  # fmt: skip
    assert suite.outcome(rec, 0.6, False, 10.0)["seconds"] == 1.0
    assert suite.outcome(rec, None, True, 10.0)["reached"] is False
    rec["train_s"] = 12.0  # the last step overran a 10 s budget: a miss is never faster
    assert suite.outcome(rec, 0.95, True, 10.0)["seconds"] == 12.0


def test_train_run_warms_up_and_reports(tmp_path):
    rec = suite.train_run("kron-lsq", "adamw", {"lr": 1e-3, "weight_decay": 0.0, "warmup": 4},
                          seed=0, budget=60.0, eval_every=2, target=None,
                          monitor=lambda t, best: False)  # fmt: skip
    assert rec["stopped"] and rec["steps"] == 2 and not rec["diverged"]
    assert [h[0] for h in rec["history"]] == [2] and rec["state_mib"] > 0
    task = make_task("kron-lsq")
    opt = suite.build(task, "adamw", {"lr": 1.0, "weight_decay": 0.0, "warmup": 4})
    suite._set_warmup(opt, 1, 4)
    assert opt.param_groups[0]["lr"] == 0.5 and opt.param_groups[0]["initial_lr"] == 1.0


def test_rank_key_prefers_reached_then_survivors_and_puts_divergences_last():
    def rec(history, stopped=False, diverged=False, rungs=2):
        return {"history": history, "steps": history[-1][0], "stopped": stopped,
                "diverged": diverged, "rungs": [0.0] * rungs}  # fmt: skip

    fast = rec([[10, 1.0, 0.95]])
    slow = rec([[10, 1.0, 0.5], [20, 2.0, 0.9]])
    full = rec([[10, 1.0, 0.5], [20, 2.0, 0.7]])
    cut = rec([[10, 1.0, 0.8]], stopped=True, rungs=1)
    diverged = rec([[10, 1.0, 0.85], [20, 2.0, math.nan]], diverged=True)
    runs = [diverged, cut, full, slow, fast]
    ranked = sorted(runs, key=lambda r: suite.rank_key(r, 0.9, True, 10.0))
    assert ranked == [fast, slow, full, cut, diverged]
    no_target = sorted(runs, key=lambda r: suite.rank_key(r, None, True, 10.0))
    assert no_target == [fast, slow, full, cut, diverged]  # full runs by their best metric


# -- batch size in the search space --------------------------------------------------------------
@pytest.mark.parametrize("key", list(suite.SUITE))
def test_default_batch_sizes_are_the_tasks_and_inside_the_searched_range(key):
    lo, hi = suite.BATCH_RANGE[key]
    assert lo <= suite.DEFAULT_BATCH[key] <= hi
    assert _build(suite.SUITE[key]).batch_size == suite.DEFAULT_BATCH[key]


def test_batch_size_is_searched_per_task_in_powers_of_two():
    assert "batch_size" not in suite.search_space("kfac")
    space = suite.search_space("kfac", "autoencoder")
    assert list(space)[-1] == "batch_size"  # last: the other dimensions keep their order
    sizes = [c["batch_size"] for c in suite.sample_configs(space, 12)]
    assert all(32 <= b <= 1024 and math.log2(b) == round(math.log2(b)) for b in sizes)
    assert len(set(sizes)) > 3
    assert suite.eval_steps("autoencoder", 50, None) == 50
    assert suite.eval_steps("autoencoder", 50, 512) == 12  # every as many samples
    assert suite.eval_steps("gpt", 20, 1024) == 1


def test_train_run_uses_the_batch_size_and_evaluates_on_time(tmp_path):
    hp = {"lr": 1e-3, "weight_decay": 0.0, "warmup": 1, "batch_size": 64}
    rec = suite.train_run("kron-lsq", "adamw", hp, seed=0, budget=0.05, eval_every=10**6)
    assert rec["steps"] >= 1 and len(rec["history"]) >= 1  # time-spaced evaluations only
    task = make_task("kron-lsq", 0, 64)
    opt = suite.build(task, "adamw", hp)  # batch_size and warmup are not optimizer options
    assert "batch_size" not in opt.param_groups[0]
    assert next(task.batches(0))[0].shape[0] == 64


@pytest.mark.slow  # builds two autoencoders and steps KFAC: minutes on a busy machine
def test_step_timing_script_runs_interleaved_and_writes_its_table(tmp_path):
    """``benchmarks/optim.py --smoke``: one round per optimizer, ratios to the first."""
    pytest.importorskip("sklearn")
    import optim as steps

    out = tmp_path / "steps.md"
    args = ["--smoke", "--tasks", "autoencoder", "--optimizers", "adamw",
            "kfac:damping_mode='pi'", "--out", str(out)]  # fmt: skip
    assert steps.main(args) == 0
    data = json.loads(out.with_suffix(".json").read_text())
    cells = data["results"]["autoencoder"]
    assert set(cells) == {"adamw", "kfac:damping_mode='pi'"} and cells["adamw"]["ratio"] == 1.0
    assert "| kfac:damping_mode='pi' |" in out.read_text()
    assert steps.parse_spec("kfac:refresh_every=20,damping_mode=pi") == (
        "kfac", {"refresh_every": 20, "damping_mode": "pi"})  # fmt: skip


def test_profile_script_splits_the_step_into_phases(capsys):
    """``benchmarks/optim_profile.py --smoke``: the phases, eigh, matmul and sync counts."""
    pytest.importorskip("sklearn")
    import optim_profile as prof

    args = ["--smoke", "--tasks", "autoencoder", "--optimizers", "adamw", "kfac"]
    assert prof.main(args) == 0
    text = capsys.readouterr().out
    assert "autoencoder adamw:" in text and "autoencoder kfac:" in text
    assert "statistics" in text and "eigh" in text and "host syncs" in text
    parsed = prof.build("autoencoder", "kfac:stats_every=3", 8)[1]
    assert parsed.stats_every == 3


def test_tuning_for_a_calibration_ignores_an_older_target(tmp_path):
    """``tune --no-target`` (and ``all`` for AdamW's calibration tuning) runs for the whole
    budget whatever target an older calibration stored; runs stopped at a target are redone."""
    calls: list[Any] = []
    plan = suite.Plan(suite.Store(tmp_path), objective=fake_objective(calls), progress=print)
    plan.store.update_configs("kron-lsq", target=0.0)  # an older calibration's, easy to reach
    suite.tune(plan, "kron-lsq", "adamw", 9.0, 12)
    stopped_at_target = [r for r in plan.store.select(kind="trial") if r["reached_target"]]
    assert stopped_at_target and all(r["train_s"] < 1.0 for r in stopped_at_target)
    again: list[Any] = []
    plan = suite.Plan(suite.Store(tmp_path), objective=fake_objective(again), progress=print)
    suite.tune(plan, "kron-lsq", "adamw", 9.0, 12, use_target=False)
    assert len(again) == len(stopped_at_target)  # those stopped at the target are redone
    latest = plan.store.select(kind="trial")[-len(again) :]
    assert not any(r["reached_target"] for r in latest)
    assert all(r["train_s"] >= 1.0 for r in latest)  # ran on (to the budget or a rung)
    args = suite.parser().parse_args(["tune", "--task", "kron-lsq", "--no-target"])
    assert args.no_target


def test_geometric_means_with_and_without_the_sanity_problem():
    def entry(adamw: float, kfac: float) -> dict:
        return {"cells": {"adamw": {"median_seconds": adamw}, "kfac": {"median_seconds": kfac}}}

    results = {"gpt": entry(10.0, 20.0), "autoencoder": entry(10.0, 5.0), "kron-lsq": entry(2, 0.5)}
    every = suite.geometric_means(results)
    assert every["kfac"]["tasks"] == 3
    assert every["kfac"]["geomean"] == pytest.approx((2.0 * 0.5 * 0.25) ** (1 / 3))
    real = suite.geometric_means(results, exclude=("kron-lsq",))
    assert real["kfac"] == {"geomean": pytest.approx(1.0), "tasks": 2}
    table = "\n".join(suite._geomean_table(results))
    assert "without kron-lsq" in table and "| kfac | 0.63 | 3 | 1.00 | 2 |" in table
    assert suite._fmt_hp({"batch_size": 1024.0, "lr": 0.00123456}) == "batch_size=1024, lr=0.00123"


def test_changed_factory_settings_retune_and_rerun_that_optimizer_alone(tmp_path, monkeypatch):
    """Runs and tuned entries carry the factory's settings (stored ones without: the legacy
    settings); a changed setting of one optimizer makes its tuning and timed runs stale, the
    others' stay reused."""
    calls: list[Any] = []
    plan = suite.Plan(suite.Store(tmp_path), objective=fake_objective(calls))
    for name in ("adamw", "kfac"):
        suite.tune(plan, "kron-lsq", name, 3.0, 4)
    plan.store.update_configs("kron-lsq", target=1.0)
    for name in ("adamw", "kfac"):
        suite.timed(plan, "kron-lsq", name, 3.0, 2)
    assert all(r["settings"] == suite.settings(r["optimizer"]) for r in plan.store.runs)
    # a run stored before runs recorded their settings counts as made with the legacy ones
    legacy = {k: v for k, v in plan.store.runs[0].items() if k != "settings"}
    assert suite.Store(tmp_path).select(**{**legacy, "settings": suite.LEGACY_SETTINGS["adamw"]})
    changed = {**suite.SETTINGS["kfac"], "max_block": 7}
    monkeypatch.setitem(suite.SETTINGS, "kfac", changed)
    plan = suite.Plan(suite.Store(tmp_path), objective=fake_objective(calls))
    assert suite.tuned(plan.store, "kron-lsq", "kfac", 3.0) is None  # stale entry
    args = suite.parser().parse_args(["report", "--task", "kron-lsq", "--budget", "3"])
    suite._defaults(args)
    assert set(suite.collect(plan, {"kron-lsq": 3.0}, ["adamw", "kfac"])["kron-lsq"]["cells"]) == {
        "adamw"
    }
    before = len(calls)
    suite.timed(plan, "kron-lsq", "adamw", 3.0, 2)  # reused
    assert len(calls) == before
    with pytest.raises(SystemExit, match="tune"):
        suite.timed(plan, "kron-lsq", "kfac", 3.0, 2)
    suite.tune(plan, "kron-lsq", "kfac", 3.0, 4)
    assert len(calls) == before + 4  # retuned under the new settings
    suite.timed(plan, "kron-lsq", "kfac", 3.0, 2)
    assert len(calls) == before + 6
    assert plan.store.select(optimizer="kfac", kind="timed", settings=changed)


def test_since_reruns_the_older_timed_runs_and_reports_the_latest(tmp_path):
    """``--since``: timed runs recorded before it are rerun (seeds 1..S again), the report
    uses the latest run per seed; runs stored before runs were stamped count as older."""
    calls: list[Any] = []
    plan = suite.Plan(suite.Store(tmp_path), objective=fake_objective(calls))
    suite.tune(plan, "kron-lsq", "adamw", 3.0, 4)
    plan.store.update_configs("kron-lsq", target=1.0)
    suite.timed(plan, "kron-lsq", "adamw", 3.0, 2)
    runs = tmp_path / "optim_suite_runs.jsonl"
    lines = [json.loads(line) for line in runs.read_text().splitlines()]
    lines[-1].pop("recorded")  # as stored before the stamps
    lines[-2]["recorded"] = "2026-01-01T00:00:00+00:00"
    runs.write_text("".join(json.dumps(r) + "\n" for r in lines))
    before = len(calls)
    plan = suite.Plan(suite.Store(tmp_path), objective=fake_objective(calls))
    suite.timed(plan, "kron-lsq", "adamw", 3.0, 2)
    assert len(calls) == before  # no since: reused
    plan.since = "2026-06-01"
    suite.timed(plan, "kron-lsq", "adamw", 3.0, 2)
    assert len(calls) == before + 2  # both older: rerun
    suite.timed(plan, "kron-lsq", "adamw", 3.0, 2)
    assert len(calls) == before + 2  # now current: reused
    cells = suite.collect(plan, {"kron-lsq": 3.0}, ["adamw"])["kron-lsq"]["cells"]
    assert cells["adamw"]["seeds"] == 2
    args = suite.parser().parse_args(["report", "--task", "kron-lsq", "--budget", "3",
                                      "--since", "2026-06-01"])  # fmt: skip
    assert args.since == "2026-06-01"


def test_since_reruns_the_older_trials_and_every_run_names_its_cpu(tmp_path):
    """``tune --since``: trials recorded before it are rerun (a machine change retunes), the
    current ones reused; every stored run records the CPU it ran on."""
    calls: list[Any] = []
    plan = suite.Plan(suite.Store(tmp_path), objective=fake_objective(calls))
    suite.tune(plan, "kron-lsq", "adamw", 3.0, 4)
    assert len(calls) == 4
    runs = tmp_path / "optim_suite_runs.jsonl"
    lines = [json.loads(line) for line in runs.read_text().splitlines()]
    assert all(r["cpu"] == suite.cpu_description() for r in lines)
    assert "bf16" in suite.cpu_description()
    lines[0]["recorded"] = "2026-01-01T00:00:00+00:00"
    runs.write_text("".join(json.dumps(r) + "\n" for r in lines))
    plan = suite.Plan(suite.Store(tmp_path), objective=fake_objective(calls))
    plan.since = "2026-06-01"
    suite.tune(plan, "kron-lsq", "adamw", 3.0, 4)
    assert len(calls) == 5  # the older trial alone
    suite.tune(plan, "kron-lsq", "adamw", 3.0, 4)
    assert len(calls) == 5  # now current: reused
    plan.since = None
    suite.tune(plan, "kron-lsq", "adamw", 3.0, 4)
    assert len(calls) == 5
