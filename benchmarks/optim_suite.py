"""The optimizer suite: time to target on tasks that take a tuned AdamW about a minute (issue 12).

AlgoPerf's rules, scaled down to 2 CPU cores:

* **Tasks** (:data:`SUITE`, built by ``beyondgrad.app.tasks.make_task``; nothing downloaded):
  ``gpt`` (a 4-layer pre-LN character GPT on the standard library's sources, validation loss),
  ``autoencoder`` (64-1000-500-250-30 and back on the digits, validation reconstruction error),
  ``resnet`` (a residual CNN with BatchNorm on augmented 16x16 digits, validation accuracy),
  ``kron-lsq`` (least squares with a known, ill-conditioned Kronecker Hessian).
* **Targets** (``calibrate``): the median over seeds of AdamW's validation metric at the end of
  a fixed training-time budget, AdamW at its configuration tuned for that budget.
* **Tuning** (``tune``): per (task, optimizer) the same number of quasi-random trials (a
  scrambled Sobol sequence with one fixed seed, :func:`sample_configs`) over the documented
  search space (:func:`search_space`: learning rate, weight decay, warm-up, damping, and the
  task's batch size), each trained with seed 0 for at most the budget.
  Asynchronous successive halving stops poor trials early: at the rung times ``budget / eta^k``
  a trial goes on only while its best metric so far ranks among the top ``ceil(n / eta)`` of the
  ``n`` trials (itself included) that reached that rung before (:func:`keep`). The chosen
  configuration is the fastest to the target (if none reaches it: the best metric); it is
  written to ``results/optim_suite_configs.json``.
* **Timed** (``timed``): each chosen configuration with seeds 1..S; reported are the median time
  to target (a miss counts as the budget), median steps (to target, or in the budget), median
  ms per step, optimizer-state MiB, reached and diverged counts, the ratio to AdamW and the
  geometric mean of the ratios over the tasks.

Every run is appended to ``results/optim_suite_runs.jsonl`` as it finishes, stamped with the
time; a rerun skips the runs found there (same kind, task, optimizer, index, budget, device
and the factory's fixed settings of the optimizer: a changed default retunes that optimizer;
``--since`` reruns the trials and timed runs recorded before a time, so that a table compares
one day's machine; every run records the CPU it ran on, as the table's header does). A run
stores its evaluation history, so a later target rescores it without retraining. Training
time counts the optimizer's steps only (forward, backward, update; the first step included),
not evaluation or batch assembly. Warm-up (a search dimension) scales every parameter group's
``lr`` linearly over its first steps (and, through ``initial_lr``, beyondgrad's AdamW
fallback).

Usage (``--quick``: a smoke run of seconds, written to a temporary directory)::

    python benchmarks/optim_suite.py tune --task gpt --optimizer adamw --budget 40 --no-target
    python benchmarks/optim_suite.py calibrate --task gpt --budget 40 --seeds 3
    python benchmarks/optim_suite.py tune --task gpt --budget 60
    python benchmarks/optim_suite.py timed --seeds 5 --budget 60   # the committed table
    python benchmarks/optim_suite.py timed --since 2026-12-05T04:47:03   # every cell again
    python benchmarks/optim_suite.py report --task gpt autoencoder --task-budget autoencoder=20
    python benchmarks/optim_suite.py all --quick
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from beyondgrad.app.bench import DAMPED, LR_SPAN, cpu_description, state_bytes
from beyondgrad.app.optimizers import DEFAULT_LR, SETTINGS, available, make_optimizer
from beyondgrad.app.tasks import Task, make_task

RESULTS = Path(__file__).resolve().parent / "results"
SUITE: dict[str, str] = {
    "gpt": "char-gpt",
    "autoencoder": "autoencoder",
    "resnet": "digits-resnet",
    "kron-lsq": "kron-lsq",
}
"""Suite name -> zoo name (``beyondgrad.app.tasks``)."""
EVAL_EVERY: dict[str, int] = {"gpt": 20, "autoencoder": 50, "resnet": 40, "kron-lsq": 50}
"""Steps between evaluations at the task's default batch size (scaled inversely with the batch
size, so that evaluations come every as many samples; see :func:`eval_steps`)."""
EVALS_PER_BUDGET = 40
"""An evaluation also comes every ``budget / EVALS_PER_BUDGET`` seconds of training, so that a
slow step does not coarsen the time to target."""
DEFAULT_BATCH: dict[str, int] = {"gpt": 16, "autoencoder": 128, "resnet": 128, "kron-lsq": 256}
"""The tasks' own batch sizes (``Task.batch_size``; tested)."""
BATCH_RANGE: dict[str, tuple[int, int]] = {
    "gpt": (8, 64),
    "autoencoder": (32, 1024),
    "resnet": (32, 512),
    "kron-lsq": (32, 1024),
}
"""Per task the batch-size search range (log-uniform, rounded to a power of two): curvature
methods pay their per-step preconditioning once per batch, so their best batch may be larger
than AdamW's. The autoencoder's 1,437 training images make 1024 one batch per epoch."""
OPTIMIZERS = ("adamw", "kfac", "kfac-bf16", "kfac-adam", "singd", "sirfshampoo", "muon", "soap")
"""torch.optim.AdamW, beyondgrad's three, torch.optim.Muon (AdamW for the non-matrices),
heavyball's SOAP; built by ``beyondgrad.app.optimizers.make_optimizer``."""
BUDGET: dict[str, float] = {"gpt": 60.0, "autoencoder": 60.0, "resnet": 60.0, "kron-lsq": 15.0}
"""Default seconds of training per tuning and timed run (``kron-lsq``, the sanity problem, is
solved in seconds)."""
CALIBRATE_BUDGET: dict[str, float] = {k: round(v * 2 / 3) for k, v in BUDGET.items()}
"""Default seconds of training of AdamW's tuning and calibration runs (2/3 of the budget, so
that AdamW at its tuned configuration has room to reach the target in the timed runs)."""
MAXIMIZE: dict[str, bool] = {"gpt": False, "autoencoder": False, "resnet": True, "kron-lsq": True}
"""Whether the task's metric is maximized (as its ``Task.maximize``; tested)."""
LEGACY_SETTINGS: dict[str, dict[str, Any]] = {
    "adamw": {},
    "kfac": {"damping": 5e-2, "stats_every": 10, "refresh_every": 20, "damping_mode": "pi"},
    "kfac-adam": {"stats_every": 10, "refresh_every": 20},
    "singd": {"damping": 1e-2, "refresh_every": 20},
    "sirfshampoo": {"max_dense": 512},
    "muon": {"adam_lr": 1e-3},
    "soap": {},
}
"""The factory's fixed settings (``beyondgrad.app.optimizers.SETTINGS``) of the runs and tuned
configurations stored before they were recorded with each run (2026-12-05)."""


def settings(optimizer: str) -> dict[str, Any]:
    """The factory's current fixed settings of ``optimizer``, JSON-able: part of every run's
    key, so that a changed default reruns (and retunes) that optimizer alone."""
    return json.loads(json.dumps(SETTINGS[optimizer]))


def _run_settings(rec: dict[str, Any]) -> dict[str, Any] | None:
    """The settings a stored run or tuned entry was made with (:data:`LEGACY_SETTINGS` for
    those stored before runs recorded them)."""
    if "settings" in rec:
        return rec["settings"]
    return LEGACY_SETTINGS.get(rec.get("optimizer", ""))


QUICK = {"budget": 1.0, "trials": 3, "seeds": 1, "eval_every": 5}
"""``--quick``: what a smoke run uses instead."""
ETA, RUNGS = 3, 2
"""Successive halving: keep the top 1/ETA at ``budget / ETA^k``, ``k = RUNGS..1``."""


# --------------------------------------------------------------------------------------------
# Search spaces and quasi-random trials
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Dim:
    """One search dimension: log-uniform in ``[lo, hi]`` (rounded where ``integer``)."""

    lo: float
    hi: float
    integer: bool = False
    power_of_two: bool = False

    def value(self, u: float) -> float:
        """The value at quantile ``u`` in ``[0, 1)``."""
        x = math.exp(math.log(self.lo) + u * (math.log(self.hi) - math.log(self.lo)))
        if self.power_of_two:
            return float(2 ** round(math.log2(x)))
        return float(round(x)) if self.integer else x


def search_space(optimizer: str, task: str | None = None) -> dict[str, Dim]:
    """The search space of ``optimizer``: ``lr`` from 1/20 to 5 times the factory's default
    (:data:`~beyondgrad.app.optimizers.DEFAULT_LR`, so a changed default moves the range),
    decoupled ``weight_decay`` 1e-5..1e-1, linear ``warmup`` 1..200 steps; KFAC, SINGD and
    SIRFShampoo also ``damping`` 1e-4..1e-1; with a ``task``, last, its ``batch_size``
    (:data:`BATCH_RANGE`, powers of two). Every other setting is the factory's."""
    base = DEFAULT_LR[optimizer]
    space = {
        "lr": Dim(base / LR_SPAN[0], base * LR_SPAN[1]),
        "weight_decay": Dim(1e-5, 1e-1),
        "warmup": Dim(1, 200, integer=True),
    }
    if optimizer in DAMPED:
        space["damping"] = Dim(1e-4, 1e-1)
    if task is not None:
        space["batch_size"] = Dim(*BATCH_RANGE[task], integer=True, power_of_two=True)
    return space


def eval_steps(task: str, eval_every: int, batch_size: int | None) -> int:
    """Steps between evaluations: ``eval_every`` at the task's default batch size, scaled by
    ``default / batch_size`` (at least 1)."""
    if batch_size is None:
        return eval_every
    return max(1, round(eval_every * DEFAULT_BATCH[task] / batch_size))


def sample_configs(space: dict[str, Dim], n: int, seed: int = 0) -> list[dict[str, float]]:
    """The first ``n`` points of a scrambled Sobol sequence (``seed``: the same sequence for
    every optimizer with as many dimensions), mapped into ``space`` in its key order."""
    engine = torch.quasirandom.SobolEngine(len(space), scramble=True, seed=seed)
    points = engine.draw(n, dtype=torch.float64).tolist()
    return [{k: d.value(u) for (k, d), u in zip(space.items(), p, strict=True)} for p in points]


# --------------------------------------------------------------------------------------------
# Successive halving
# --------------------------------------------------------------------------------------------
def keep(value: float, others: list[float], eta: int) -> bool:
    """Whether a trial with ``value`` (higher is better) at a rung goes on, given the values
    of the earlier trials at that rung: it must rank among the top ``ceil(n / eta)`` of the
    ``n = len(others) + 1``; with fewer than ``eta`` trials every one goes on."""
    n = len(others) + 1
    if n < eta:
        return True
    better = sum(o > value for o in others)
    return better < math.ceil(n / eta)


def rung_times(budget: float, eta: int, rungs: int) -> list[float]:
    """The times at which successive halving looks: ``budget / eta^k``, ``k = rungs..1``."""
    return [budget / eta**k for k in range(rungs, 0, -1)]


@dataclass
class Monitor:
    """Successive halving for one trial: called at every evaluation with the training time and
    the best (signed: higher is better) metric so far; ``False`` stops the trial."""

    times: list[float]
    earlier: list[list[float]]  # per rung: the values of the earlier trials
    eta: int
    values: list[float] = field(default_factory=list)  # this trial's value at each rung passed

    def __call__(self, elapsed: float, best: float) -> bool:
        """Record the rungs passed by ``elapsed``; whether the trial goes on."""
        while len(self.values) < len(self.times) and elapsed >= self.times[len(self.values)]:
            k = len(self.values)
            self.values.append(best)
            if not keep(best, self.earlier[k], self.eta):
                return False
        return True


# --------------------------------------------------------------------------------------------
# One training run
# --------------------------------------------------------------------------------------------
def signed(task: Task, metric: float) -> float:
    """The metric with higher = better (``-inf`` when not finite)."""
    if not math.isfinite(metric):
        return -math.inf
    return metric if task.maximize else -metric


def _step(opt: Any, task: Task, model: torch.nn.Module, X: torch.Tensor, y: torch.Tensor) -> bool:
    """One optimizer step; False where the loss, the statistics or a factorization diverged."""
    try:
        opt.zero_grad()
        with getattr(opt, "capture", contextlib.nullcontext)():
            loss = task.loss_fn(model(X), y)
        if not bool(torch.isfinite(loss)):
            return False
        loss.backward()
        opt.step()
    except (FloatingPointError, torch.linalg.LinAlgError):
        return False
    return True


def _set_warmup(opt: Any, step: int, warmup: int) -> None:
    """Scale every group's lr to ``min(1, (step + 1) / warmup)`` of its ``initial_lr``."""
    factor = min(1.0, (step + 1) / max(warmup, 1))
    for group in opt.param_groups:
        group.setdefault("initial_lr", group["lr"])
        group["lr"] = group["initial_lr"] * factor


def build(task: Task, optimizer: str, hp: dict[str, float]) -> Any:
    """The optimizer with the hyperparameters ``hp`` (``warmup`` and ``batch_size`` are the
    harness's)."""
    options = {k: v for k, v in hp.items() if k not in ("warmup", "batch_size")}
    return make_optimizer(optimizer, task.model, task.loss_fn, **options)


def train_run(
    task_key: str,
    optimizer: str,
    hp: dict[str, float],
    seed: int,
    budget: float,
    eval_every: int,
    device: str = "cpu",
    target: float | None = None,
    monitor: Callable[[float, float], bool] | None = None,
) -> dict[str, Any]:
    """Train ``task_key`` with ``optimizer`` for ``budget`` seconds of training time, stopping
    at the ``target`` (if given), a divergence or when ``monitor`` says so. ``hp`` may hold a
    ``batch_size`` (else the task's); evaluations every :func:`eval_steps` steps and every
    ``budget / EVALS_PER_BUDGET`` seconds of training.

    Returns:
        A JSON-able record: ``steps``, ``train_s``, ``ms_per_step``, ``state_mib``,
        ``diverged``, ``stopped`` (by the monitor), ``final`` (the last validation metric),
        ``history`` (``[step, seconds, metric]`` per evaluation; the last one at the end).
    """
    batch_size = int(hp["batch_size"]) if "batch_size" in hp else None
    task = make_task(SUITE[task_key], seed, batch_size)
    task.target = target  # None: train for the whole budget
    every, spacing = eval_steps(task_key, eval_every, batch_size), budget / EVALS_PER_BUDGET
    next_eval = spacing  # the training time of the next time-spaced evaluation
    model = task.model.to(device)
    opt = build(task, optimizer, hp)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    batches, warmup = task.batches(seed), int(hp.get("warmup", 1))
    rec: dict[str, Any] = {"steps": 0, "train_s": 0.0, "diverged": False, "stopped": False}
    history: list[list[float]] = []
    best = -math.inf
    while rec["train_s"] < budget:
        X, y = (t.to(device) for t in next(batches))
        _set_warmup(opt, rec["steps"], warmup)
        start = time.perf_counter()
        ok = _step(opt, task, model, X, y)
        sync()
        rec["train_s"] += time.perf_counter() - start
        rec["steps"] += 1
        if not ok:
            rec["diverged"] = True
            break
        if rec["steps"] % every and rec["train_s"] < next_eval:
            continue
        next_eval = (math.floor(rec["train_s"] / spacing) + 1) * spacing
        metric = task.evaluate(model)
        history.append([rec["steps"], rec["train_s"], metric])
        best = max(best, signed(task, metric))
        if not math.isfinite(metric):
            rec["diverged"] = True
            break
        if task.reached(metric):
            break
        if monitor is not None and not monitor(rec["train_s"], best):
            rec["stopped"] = True
            break
    return _finish(rec, history, task, model, opt)


def _finish(rec: dict[str, Any], history: list[list[float]], task: Task,
            model: torch.nn.Module, opt: Any) -> dict[str, Any]:  # fmt: skip
    """A last evaluation (unless the last step had one); the record's summary fields."""
    if not history or history[-1][0] != rec["steps"]:
        history.append([rec["steps"], rec["train_s"], task.evaluate(model)])
    rec["final"] = history[-1][2]
    rec["history"] = history
    rec["ms_per_step"] = 1e3 * rec["train_s"] / max(rec["steps"], 1)
    rec["state_mib"] = state_bytes(opt) / 2**20
    return rec


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------
def outcome(rec: dict[str, Any], target: float | None, maximize: bool, budget: float) -> dict:
    """Rescore a run against ``target``: ``reached``, ``seconds`` (to the first evaluation at
    or beyond the target; for a miss the budget, or the run's training time where its last
    step overran the budget), ``steps`` (to target, or all the run's)."""
    for step, seconds, metric in rec["history"]:
        if target is not None and math.isfinite(metric):
            if (metric >= target) if maximize else (metric <= target):
                return {"reached": True, "seconds": seconds, "steps": step}
    seconds = max(budget, rec.get("train_s", budget))  # a step can overrun the budget
    return {"reached": False, "seconds": seconds, "steps": rec["steps"]}


def best_metric(rec: dict[str, Any], maximize: bool) -> float:
    """The run's best validation metric, signed so that higher is better."""
    values = [m if maximize else -m for _, _, m in rec["history"] if math.isfinite(m)]
    return max(values, default=-math.inf)


def rank_key(rec: dict[str, Any], target: float | None, maximize: bool, budget: float) -> tuple:
    """Sort key of a trial (smallest = chosen): reached trials by time to target, then the
    others by how many rungs they survived and their best metric, diverged trials last."""
    o = outcome(rec, target, maximize, budget)
    if o["reached"]:
        return (0, o["seconds"], 0.0)
    if rec["diverged"]:
        return (2, 0, -best_metric(rec, maximize))
    return (
        1,
        -len(rec.get("rungs", [])) - (0 if rec["stopped"] else 1),
        -best_metric(rec, maximize),
    )


# --------------------------------------------------------------------------------------------
# Storage: runs as JSON lines, chosen configurations as one JSON file
# --------------------------------------------------------------------------------------------
class Store:
    """The runs file (append-only JSON lines) and the configurations file of a results dir."""

    def __init__(self, root: Path, quick: bool = False):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.runs_path = root / "optim_suite_runs.jsonl"
        self.configs_path = root / "optim_suite_configs.json"
        self.quick = quick
        self.runs: list[dict[str, Any]] = []
        if self.runs_path.exists():
            text = self.runs_path.read_text()
            if text and not text.endswith("\n"):  # killed while writing: end the cut line
                with self.runs_path.open("a") as f:
                    f.write("\n")
            for line in text.splitlines():
                with contextlib.suppress(json.JSONDecodeError):  # a run cut off mid-write
                    self.runs.append(json.loads(line))

    def select(self, **key: Any) -> list[dict[str, Any]]:
        """The stored runs whose fields equal ``key`` (and this store's quick flag); a run's
        ``settings`` are :func:`_run_settings` (the legacy ones where it has none)."""
        key = {**key, "quick": self.quick}

        def field(r: dict[str, Any], k: str) -> Any:
            return _run_settings(r) if k == "settings" else r.get(k)

        return [r for r in self.runs if all(field(r, k) == v for k, v in key.items())]

    def find(self, **key: Any) -> dict[str, Any] | None:
        """The first stored run whose fields equal ``key``, ``None`` without one."""
        found = self.select(**key)
        return found[0] if found else None

    def add(self, rec: dict[str, Any]) -> None:
        """Append a run (flushed at once), stamped with the UTC time it was recorded."""
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        rec = {**rec, "quick": self.quick, "recorded": now, "cpu": cpu_description()}
        self.runs.append(rec)
        with self.runs_path.open("a") as f:
            f.write(json.dumps(rec) + "\n")

    def configs(self) -> dict[str, Any]:
        """The recorded configurations and targets, ``{task: {...}}``."""
        if not self.configs_path.exists():
            return {}
        return json.loads(self.configs_path.read_text())

    def update_configs(self, task: str, **entries: Any) -> None:
        """Merge ``entries`` into the task's record (``tuned`` merged one level deeper)."""
        configs = self.configs()
        rec = configs.setdefault(task, {})
        for k, v in entries.items():
            if k == "tuned":
                rec.setdefault("tuned", {}).update(v)
            else:
                rec[k] = v
        self.configs_path.write_text(json.dumps(configs, indent=1, sort_keys=True) + "\n")


# --------------------------------------------------------------------------------------------
# The sub-steps: tune, calibrate, timed
# --------------------------------------------------------------------------------------------
Objective = Callable[..., dict[str, Any]]
"""``train_run``'s signature: ``(task, optimizer, hp, seed, budget, eval_every, device,
target, monitor) -> record``; tests pass a fake one."""


@dataclass
class Plan:
    """What a sub-step runs: device, evaluation spacing, the objective, where to log."""

    store: Store
    device: str = "cpu"
    eval_every: int | None = None  # None: the task's own (EVAL_EVERY)
    objective: Objective = train_run
    progress: Callable[[str], None] = print
    since: str | None = None  # timed runs and trials recorded before (ISO UTC) are not used

    def current(self, runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``runs`` recorded at or after :attr:`since` (all without one; a run stored before
        runs were stamped counts as older than any ``since``)."""
        if self.since is None:
            return runs
        since = _utc(self.since)
        return [r for r in runs if "recorded" in r and _utc(r["recorded"]) >= since]

    def every(self, task: str) -> int:
        """Steps between evaluations on ``task``."""
        return self.eval_every or EVAL_EVERY[task]


def _utc(stamp: str) -> datetime.datetime:
    """An ISO date or time as an aware UTC time (a naive one is taken as UTC)."""
    t = datetime.datetime.fromisoformat(stamp)
    return t if t.tzinfo else t.replace(tzinfo=datetime.timezone.utc)


def _rung_values(rec: dict[str, Any], monitor: Monitor, task: str) -> list[float]:
    """The trial's values at every rung: those the monitor saw, then (a trial not stopped by
    it) its best metric for the rungs it skipped by reaching the target or the end, ``-inf``
    after a divergence."""
    values = list(monitor.values)
    if not rec["stopped"]:
        fill = -math.inf if rec["diverged"] else best_metric(rec, MAXIMIZE[task])
        values += [fill] * (len(monitor.times) - len(values))
    return values


def tune(
    plan: Plan, task: str, optimizer: str, budget: float, trials: int, use_target: bool = True
) -> dict[str, Any]:
    """``trials`` quasi-random configurations of ``optimizer`` on ``task`` (seed 0) with
    successive halving; stored runs are reused. Records and returns the chosen trial.

    ``use_target=False`` (``--no-target``; ``all`` for AdamW's calibration tuning): the runs
    ignore the stored target (a calibration defines it; an older one would stop them early)."""
    target = plan.store.configs().get(task, {}).get("target") if use_target else None
    times = rung_times(budget, ETA, RUNGS)
    earlier: list[list[float]] = [[] for _ in times]
    done = []
    for i, hp in enumerate(sample_configs(search_space(optimizer, task), trials)):
        key = {"kind": "trial", "task": task, "optimizer": optimizer, "index": i,
               "budget": budget, "device": plan.device, "hp": hp,
               "settings": settings(optimizer)}  # fmt: skip
        found = plan.current(plan.store.select(**key))
        rec = found[-1] if found else None
        if rec is not None and not use_target and rec.get("reached_target"):
            rec = None  # stopped at a target: not a run for the whole budget
        if rec is None:
            monitor = Monitor(times, earlier, ETA)
            out = plan.objective(task, optimizer, hp, 0, budget, plan.every(task), plan.device,
                                 target, monitor)  # fmt: skip
            rec = {**key, **out, "rungs": _rung_values(out, monitor, task)}
            rec["reached_target"] = target is not None and _reached(out, target, task)
            plan.store.add(rec)
        for k, v in enumerate(rec["rungs"]):
            earlier[k].append(v)
        done.append(rec)
        plan.progress(f"{task} {optimizer} trial {i}: {_fmt_hp(hp)} -> {_fmt_rec(rec, task)}")
    best = min(done, key=lambda r: rank_key(r, target, MAXIMIZE[task], budget))
    entry = {"hp": best["hp"], "trial": best["index"], "trials": trials, "device": plan.device,
             "target": target, "settings": settings(optimizer)}  # fmt: skip
    plan.store.update_configs(task, tuned={tuned_key(optimizer, budget): entry})
    return entry


def _reached(out: dict[str, Any], target: float, task: str) -> bool:
    """Whether a run's history reached ``target``."""
    return any(signed_value(h[2], task) >= signed_value(target, task) for h in out["history"])


def signed_value(metric: float, task: str) -> float:
    """``metric`` with higher = better for ``task``."""
    return metric if MAXIMIZE[task] else -metric


def tuned_key(optimizer: str, budget: float) -> str:
    """The key of a tuned configuration in the configurations file, e.g. ``kfac@60s``."""
    return f"{optimizer}@{budget:g}s"


def tuned(store: Store, task: str, optimizer: str, budget: float) -> dict[str, Any] | None:
    """The configuration recorded by ``tune`` for ``optimizer`` at ``budget`` with the
    factory's current settings, or ``None``."""
    entry = store.configs().get(task, {}).get("tuned", {}).get(tuned_key(optimizer, budget))
    if entry is None or _run_settings({"optimizer": optimizer, **entry}) != settings(optimizer):
        return None
    return entry


def seeded_runs(
    plan: Plan, kind: str, task: str, optimizer: str, hp: dict[str, float],
    budget: float, seeds: int, target: float | None,
) -> list[dict[str, Any]]:  # fmt: skip
    """Seeds 1..``seeds`` of one configuration (stored runs reused)."""
    runs = []
    for seed in range(1, seeds + 1):
        key = {"kind": kind, "task": task, "optimizer": optimizer, "seed": seed,
               "budget": budget, "device": plan.device, "hp": hp, "target": target,
               "settings": settings(optimizer)}  # fmt: skip
        found = plan.store.select(**key)
        found = plan.current(found) if kind == "timed" else found
        rec = found[-1] if found else None
        if rec is None:
            out = plan.objective(task, optimizer, hp, seed, budget, plan.every(task),
                                 plan.device, target, None)  # fmt: skip
            rec = {**key, **out}
            plan.store.add(rec)
        plan.progress(f"{task} {optimizer} {kind} seed {seed}: {_fmt_rec(rec, task, target)}")
        runs.append(rec)
    return runs


def calibrate(plan: Plan, task: str, budget: float, seeds: int) -> float:
    """The task's target: the median over ``seeds`` seeds of AdamW's final validation metric
    after ``budget`` seconds, AdamW at its best trial tuned for that budget (no target)."""
    best = tuned(plan.store, task, "adamw", budget)
    if best is None:
        raise SystemExit(f"calibrate {task}: first `tune --task {task} --optimizer adamw "
                         f"--budget {budget:g}`")  # fmt: skip
    runs = seeded_runs(plan, "calibrate", task, "adamw", best["hp"], budget, seeds, None)
    finals = [r["final"] for r in runs]
    target = statistics.median(finals)
    calibration = {"hp": best["hp"], "budget": budget, "finals": finals, "device": plan.device}
    plan.store.update_configs(task, target=target, zoo=SUITE[task], calibration=calibration)
    plan.progress(f"{task}: target {target:.6g} (AdamW finals {finals})")
    return target


def timed(plan: Plan, task: str, optimizer: str, budget: float, seeds: int) -> dict[str, Any]:
    """Seeds 1..``seeds`` of the recorded configuration; the table's cell."""
    target = plan.store.configs().get(task, {}).get("target")
    entry = tuned(plan.store, task, optimizer, budget)
    if target is None or entry is None:
        raise SystemExit(f"timed {task} {optimizer}: calibrate, then tune at {budget:g} s")
    runs = seeded_runs(plan, "timed", task, optimizer, entry["hp"], budget, seeds, target)
    return cell(runs, target, MAXIMIZE[task], budget, entry["hp"])


def cell(runs: list[dict[str, Any]], target: float, maximize: bool, budget: float,
         hp: dict[str, float]) -> dict[str, Any]:  # fmt: skip
    """Medians over the seeds: seconds to target (a miss: the budget), steps, ms per step;
    the largest state; reached and diverged counts."""
    outs = [outcome(r, target, maximize, budget) for r in runs]
    return {
        "hp": hp,
        "median_seconds": statistics.median(o["seconds"] for o in outs),
        "median_steps": statistics.median(o["steps"] for o in outs),
        "ms_per_step": statistics.median(r["ms_per_step"] for r in runs),
        "state_mib": max(r["state_mib"] for r in runs),
        "reached": sum(o["reached"] for o in outs),
        "seeds": len(runs),
        "diverged": sum(r["diverged"] for r in runs),
    }


def _fmt_hp(hp: dict[str, float]) -> str:
    """``key=value, ...``; whole numbers (batch size, warm-up) as integers."""
    return ", ".join(f"{k}={int(v)}" if float(v).is_integer() else f"{k}={v:.3g}"
                     for k, v in hp.items())  # fmt: skip


def _fmt_rec(rec: dict[str, Any], task: str, target: float | None = None) -> str:
    state = "diverged" if rec["diverged"] else "stopped" if rec["stopped"] else "ran"
    o = outcome(rec, target, MAXIMIZE[task], rec["train_s"])
    reached = f", target at {o['seconds']:.1f} s" if o["reached"] else ""
    return (f"{state}, {rec['steps']} steps in {rec['train_s']:.1f} s "
            f"({rec['ms_per_step']:.0f} ms/step), final {rec['final']:.4g}{reached}")  # fmt: skip


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------
def environment(device: str, command: str) -> dict[str, Any]:
    """Date, command, machine, Python, torch, threads, device, heavyball, git commit."""
    import subprocess
    from importlib import metadata

    try:
        hb = metadata.version("heavyball")
    except metadata.PackageNotFoundError:
        hb = "not installed"
    cmd = ["git", "rev-parse", "--short", "HEAD"]
    where = Path(__file__).parent
    git = subprocess.run(cmd, capture_output=True, text=True, cwd=where, check=False)
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": command,
        "machine": f"{platform.machine()}, {platform.system()}, {cpu_description()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": device if device == "cpu" else torch.cuda.get_device_name(),
        "heavyball": hb,
        "git": git.stdout.strip(),
    }


def collect(plan: Plan, budgets: dict[str, float], optimizers: list[str]) -> dict:
    """The table's cells from the stored timed runs of the recorded configurations, per task
    at its budget (``budgets``)."""
    out: dict[str, Any] = {}
    configs = plan.store.configs()
    for task, budget in budgets.items():
        record = configs.get(task, {})
        target, cells = record.get("target"), {}
        for name in optimizers:
            entry = tuned(plan.store, task, name, budget)
            if target is None or entry is None:
                continue
            runs = plan.store.select(kind="timed", task=task, optimizer=name, hp=entry["hp"],
                                     target=target, budget=budget, device=plan.device,
                                     settings=settings(name))  # fmt: skip
            runs = list({r["seed"]: r for r in plan.current(runs)}.values())  # latest per seed
            if runs:
                cells[name] = cell(runs, target, MAXIMIZE[task], budget, entry["hp"])
        out[task] = {"zoo": SUITE[task], "target": target, "maximize": MAXIMIZE[task],
                     "budget": budget, "calibration": record.get("calibration"),
                     "cells": cells}  # fmt: skip
    return out


SANITY = "kron-lsq"
"""The sanity problem (curvature exactly Kronecker: KFAC's best case); the report also gives
the geometric means without it."""


def geometric_means(
    results: dict[str, Any], exclude: tuple[str, ...] = ()
) -> dict[str, dict[str, float]]:
    """Per optimizer: the geometric mean over tasks (except ``exclude``) of its median time /
    AdamW's."""
    ratios: dict[str, list[float]] = {}
    for task, entry in results.items():
        if task in exclude:
            continue
        base = entry["cells"].get("adamw", {}).get("median_seconds")
        for name, c in entry["cells"].items():
            if base:
                ratios.setdefault(name, []).append(c["median_seconds"] / base)
    return {
        name: {"geomean": math.exp(statistics.fmean(map(math.log, rs))), "tasks": len(rs)}
        for name, rs in ratios.items()
    }


def render(meta: dict[str, Any], results: dict[str, Any], skipped: list[str]) -> str:
    """The markdown: header, protocol, targets, a table per task, geometric means, spaces."""
    lines = [
        f"# Optimizer suite: time to target ({meta['device']})",
        "",
        f"*Generated {meta['date']} by `{meta['command']}`.*",
        "",
        f"* **Machine**: {meta['machine']}; Python {meta['python']}; torch {meta['torch']}, "
        f"{meta['threads']} threads; heavyball {meta['heavyball']}; beyondgrad at {meta['git']}.",
        f"* **Protocol** (`benchmarks/optim_suite.py`): {meta['trials']} scrambled-Sobol trials "
        f"per (task, optimizer), seed 0, a budget of training seconds per task, successive "
        f"halving (keep the top 1/{ETA} at budget/{ETA}^k, k = {RUNGS}..1); the chosen "
        f"configuration (fastest to target, else best metric; "
        "`results/optim_suite_configs.json`) is rerun with seeds 1.."
        f"{meta['seeds']}. Medians over the seeds; a miss counts as the budget; steps: to "
        "target (a miss: all steps in the budget). Training time excludes evaluation. "
        "ms/step: training time / steps, the first step (set-up, first factorization) "
        "included.",
        "* **Targets**: the median over seeds of AdamW's final validation metric after the "
        "calibration budget, AdamW at its configuration tuned for that budget.",
    ]
    if meta.get("since"):
        lines.append(f"* **Timed runs** recorded since {meta['since']} UTC only (every cell "
                     "measured on the same day's machine).")  # fmt: skip
    fixed = "; ".join(
        f"{n}: " + (", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                              for k, v in settings(n).items()) or "-")
        for n in OPTIMIZERS
    )  # fmt: skip
    lines.append(f"* **Fixed settings** (`beyondgrad.app.optimizers.SETTINGS`): {fixed}.")
    if skipped:
        lines.append(f"* **Not installed, skipped**: {', '.join(skipped)}.")
    for task, entry in results.items():
        lines += ["", *_task_table(task, entry)]
    lines += ["", *_geomean_table(results)]
    lines += ["", "## Search spaces (log-uniform; warm-up in steps, rounded)", "",
              "| optimizer | space |", "|---|---|"]  # fmt: skip
    for name in OPTIMIZERS:
        dims = ", ".join(f"{k} {d.lo:.3g}..{d.hi:.3g}" for k, d in search_space(name).items())
        lines.append(f"| {name} | {dims} |")
    batches = ", ".join(f"{t} {lo}..{hi}" for t, (lo, hi) in BATCH_RANGE.items())
    lines += ["", f"Every optimizer also tunes the batch size (powers of two): {batches}."]
    return "\n".join(lines) + "\n"


def _geomean_table(results: dict[str, Any]) -> list[str]:
    """Geometric means over every task and, where it was run, without :data:`SANITY`."""
    every = geometric_means(results)
    lines = ["## Geometric mean over the tasks of the time ratio to AdamW", ""]
    if SANITY not in results:
        lines += ["| optimizer | geometric mean | tasks |", "|---|---:|---:|"]
        return lines + [f"| {n} | {g['geomean']:.2f} | {g['tasks']} |" for n, g in every.items()]
    real = geometric_means(results, exclude=(SANITY,))
    lines += [f"| optimizer | geometric mean | tasks | without {SANITY} (the sanity problem) "
              "| tasks |", "|---|---:|---:|---:|---:|"]  # fmt: skip
    for name, g in every.items():
        r = real.get(name)
        without = f"{r['geomean']:.2f} | {r['tasks']}" if r else "- | 0"
        lines.append(f"| {name} | {g['geomean']:.2f} | {g['tasks']} | {without} |")
    return lines


def _task_table(task: str, entry: dict[str, Any]) -> list[str]:
    cal = entry["calibration"] or {}
    better = "higher" if entry["maximize"] else "lower"
    target = "not calibrated" if entry["target"] is None else f"{entry['target']:.7g}"
    lines = [
        f"## {task} (`{entry['zoo']}`), target {target} ({better} is better)",
        "",
        f"Budget {entry['budget']:g} s of training per run.",
        "",
        f"Calibration: AdamW {_fmt_hp(cal.get('hp', {}))}, {cal.get('budget', 0):g} s, "
        f"finals {', '.join(f'{x:.7g}' for x in cal.get('finals', []))}.",
        "",
        "| optimizer | config | median s to target | ratio to AdamW | median steps | ms/step "
        "| state MiB | reached | diverged |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = entry["cells"].get("adamw", {}).get("median_seconds")
    for name, c in entry["cells"].items():
        ratio = f"{c['median_seconds'] / base:.2f}" if base else "-"
        lines.append(
            f"| {name} | {_fmt_hp(c['hp'])} | {c['median_seconds']:.1f} | {ratio} | "
            f"{c['median_steps']:.0f} | {c['ms_per_step']:.1f} | {c['state_mib']:.2f} | "
            f"{c['reached']}/{c['seeds']} | {c['diverged']} |"
        )
    return lines


def report(plan: Plan, args: argparse.Namespace, skipped: list[str]) -> Path:
    """Write ``optim_suite_<device>.md`` and ``.json`` into the results directory."""
    meta = environment(plan.device, "python " + " ".join(sys.argv))
    budgets = {task: budget_for(args, task) for task in args.task}
    meta |= {"trials": args.trials, "seeds": args.seeds, "quick": args.quick, "since": plan.since,
             "budgets": budgets, "calibrate_budgets": {
                 t: budget_for(args, t, calibrating=True) for t in args.task}}  # fmt: skip
    results = collect(plan, budgets, args.optimizer)
    spaces = {n: {k: vars(d) for k, d in search_space(n).items()} for n in OPTIMIZERS}
    spaces["batch_size"] = {t: list(r) for t, r in BATCH_RANGE.items()}
    payload = {"meta": meta, "results": results, "geomeans": geometric_means(results),
               "search_spaces": spaces, "skipped": skipped}  # fmt: skip
    out = plan.store.root / f"optim_suite_{plan.device.split(':')[0]}.md"
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
    out.write_text(render(meta, results, skipped))
    plan.progress(f"wrote {out} and {out.with_suffix('.json').name}")
    return out


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    """``tune``, ``calibrate``, ``timed``, ``report`` and ``all`` (the four in order)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("step", choices=("tune", "calibrate", "timed", "report", "all"))
    p.add_argument("--task", nargs="+", choices=list(SUITE), default=list(SUITE))
    p.add_argument("--optimizer", nargs="+", choices=OPTIMIZERS, default=list(OPTIMIZERS))
    p.add_argument("--budget", type=float, default=None,
                   help=f"seconds of training per run (default per task: {BUDGET}; "
                   f"calibrate: {CALIBRATE_BUDGET})")  # fmt: skip
    p.add_argument(
        "--task-budget",
        nargs="+",
        default=[],
        metavar="TASK=SECONDS",
        help="per-task budgets that replace --budget (e.g. report tables tuned at other budgets)",
    )
    p.add_argument(
        "--calibrate-budget",
        type=float,
        default=None,
        help="`all`: AdamW's tuning and calibration budget (default per task, see --budget)",
    )
    p.add_argument("--trials", type=int, default=12, help="tuning trials (default 12)")
    p.add_argument("--seeds", type=int, default=3, help="seeds of calibrate and timed (3)")
    p.add_argument("--eval-every", type=int, default=None, help="(default: per task)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help="torch threads on CPU (default 2)")
    p.add_argument(
        "--results",
        type=Path,
        default=None,
        help="results directory (default benchmarks/results; --quick: a temp dir)",
    )
    p.add_argument(
        "--no-target",
        action="store_true",
        help="tune: ignore the stored target (AdamW's tuning for a calibration)",
    )
    p.add_argument(
        "--since",
        default=None,
        metavar="ISO_UTC",
        help="tune/timed/report: use only trials and timed runs recorded at or after this UTC "
        "time (rerun the older ones; e.g. all optimizers again on one day's machine)",
    )
    p.add_argument("--quick", action="store_true", help="smoke run: seconds, numbers mean nothing")
    return p


def _defaults(args: argparse.Namespace) -> None:
    """Fill the defaults that depend on the step and ``--quick``."""
    if args.quick:
        args.trials, args.seeds = QUICK["trials"], QUICK["seeds"]
        args.eval_every = args.eval_every or QUICK["eval_every"]
        args.budget = args.budget or QUICK["budget"]
        args.calibrate_budget = args.calibrate_budget or QUICK["budget"]
    if args.results is None:
        args.results = Path(tempfile.mkdtemp(prefix="optim-suite-")) if args.quick else RESULTS


def budget_for(args: argparse.Namespace, task: str, calibrating: bool = False) -> float:
    """The training budget of ``task``: ``--calibrate-budget`` (``all``) or ``--budget`` where
    given, else the task's default (:data:`CALIBRATE_BUDGET` when ``calibrating``)."""
    if calibrating:
        given = args.calibrate_budget if args.step == "all" else args.budget
        return given or CALIBRATE_BUDGET[task]
    return task_budgets(args).get(task) or args.budget or BUDGET[task]


def task_budgets(args: argparse.Namespace) -> dict[str, float]:
    """``--task-budget TASK=SECONDS ...`` as a dict (checked: known tasks, positive seconds)."""
    out = {}
    for item in args.task_budget:
        task, _, seconds = item.partition("=")
        try:
            value = float(seconds)
        except ValueError:
            value = -1.0
        if task not in SUITE or not value > 0:
            raise SystemExit(
                f"--task-budget {item!r}: expected TASK=SECONDS, TASK in {list(SUITE)}"
            )
        out[task] = value
    return out


def main(argv: list[str] | None = None, objective: Objective = train_run) -> int:
    """Run a sub-step (see the module docstring)."""
    args = parser().parse_args(argv)
    _defaults(args)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    plan = Plan(Store(args.results, args.quick), args.device, args.eval_every, objective)
    plan.since = args.since
    skipped = [o for o in args.optimizer if not available(o)]
    if skipped:
        plan.progress(f"not installed, skipped: {', '.join(skipped)}")
    optimizers = [o for o in args.optimizer if o not in skipped]
    for task in args.task:
        if args.step == "all":
            cal = budget_for(args, task, calibrating=True)
            tune(plan, task, "adamw", cal, args.trials, use_target=False)
            calibrate(plan, task, cal, args.seeds)
        if args.step in ("tune", "all"):
            for name in optimizers:
                tune(plan, task, name, budget_for(args, task), args.trials, not args.no_target)
        if args.step == "calibrate":
            calibrate(plan, task, budget_for(args, task, calibrating=True), args.seeds)
        if args.step in ("timed", "all"):
            for name in optimizers:
                timed(plan, task, name, budget_for(args, task), args.seeds)
    if args.step in ("timed", "report", "all"):
        report(plan, args, skipped)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
