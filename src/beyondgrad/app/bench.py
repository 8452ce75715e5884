"""Time to target, AlgoPerf-style, for beyondgrad's optimizers and their peers
(``beyondgrad bench optim``).

Protocol (every optimizer, AdamW included, gets the same budget):

1. ``trials`` random configurations from the optimizer's documented search space
   (:data:`SEARCH_SPACES`; log-uniform ranges, one fixed RNG per optimizer), each run once
   (seed 0) for at most ``max_seconds`` of training time;
2. the configuration that reaches the task's target fastest (or, if none does, gets the best
   validation metric) is rerun with ``seeds`` new seeds;
3. reported per task: the median wall-clock training time to target over those seeds (a run
   that never reaches it counts as the budget plus one second), median steps to target, median
   ms per step, optimizer-state memory, how many seeds reached the target, divergences
   (non-finite loss or a refused step); the ratio of the median time to AdamW's and the
   geometric mean of these ratios over the tasks.

Evaluation time is excluded from the training time; the first step (warm-up, torch.compile in
peers) is included. SINGD and SIRFShampoo are also rerun with bfloat16 preconditioner factors
(the chosen fp32 configuration) to compare their time to target.
"""

from __future__ import annotations

import contextlib
import functools
import math
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .optimizers import DEFAULT_LR, available, make_optimizer
from .tasks import SMALL_TASKS, make_task


@functools.cache
def cpu_description() -> str:
    """The CPU's model name and whether it computes in bfloat16 natively (the ``avx512_bf16``
    or ``amx_bf16`` flag of ``/proc/cpuinfo``; "unknown" without it). Peers that compute in
    bfloat16 (``torch.optim.Muon`` orthogonalizes in it) ran ~100x slower per step on a CPU
    without it (2026-12-04: 3.3 s per autoencoder step against 25 ms on one with it), so a
    table names the CPU it ran on."""
    model, flags = platform.processor() or "unknown CPU", set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    if not flags:
        return f"{model} (bf16 support unknown)"
    bf16 = "native bf16" if flags & {"avx512_bf16", "amx_bf16"} else "no native bf16"
    return f"{model} ({bf16})"


def _log_uniform(lo: float, hi: float) -> Callable[[torch.Generator], float]:
    def sample(g: torch.Generator) -> float:
        u = float(torch.rand((), generator=g, dtype=torch.float64))
        return float(10 ** (math.log10(lo) + u * (math.log10(hi) - math.log10(lo))))

    return sample


LR_SPAN = (20, 5)
"""``lr`` is searched from the factory's default (:data:`~.optimizers.DEFAULT_LR`) divided by
``LR_SPAN[0]`` to the default times ``LR_SPAN[1]``: a changed default (e.g. KFAC's Adam
grafting) moves the range with it. Shared with the optimizer suite
(``benchmarks/optim_suite.py``)."""
DAMPED = ("kfac", "kfac-bf16", "singd", "sirfshampoo")
"""The optimizers whose ``damping`` is searched too (1e-4..1e-1, here and in the suite)."""


def _search_space(name: str) -> dict[str, Callable[[torch.Generator], float]]:
    """``lr`` over :data:`LR_SPAN` of the default, ``weight_decay`` 1e-5..1e-1, ``damping``
    1e-4..1e-1 for :data:`DAMPED`."""
    base = DEFAULT_LR[name]
    lr = _log_uniform(base / LR_SPAN[0], base * LR_SPAN[1])
    space = {"lr": lr, "weight_decay": _log_uniform(1e-5, 1e-1)}
    if name in DAMPED:
        space["damping"] = _log_uniform(1e-4, 1e-1)
    return space


SEARCH_SPACES: dict[str, dict[str, Callable[[torch.Generator], float]]] = {
    name: _search_space(name) for name in ("adamw", "kfac", "singd", "sirfshampoo", "muon", "soap")
}
"""The random-search space per optimizer (fixed hyperparameters are in :func:`build`)."""

OPTIMIZERS = tuple(SEARCH_SPACES)

FIXED: dict[str, dict[str, Any]] = {
    "kfac": {"stats_every": 10, "refresh_every": 10},
    "singd": {"refresh_every": 10},
    "sirfshampoo": {"refresh_every": 10, "max_dense": 512},
    "muon": {"adam_lr": 1e-3},
}
"""The benchmark's fixed settings (on top of :data:`~beyondgrad.app.optimizers.SETTINGS`)."""


def build(
    name: str, model: nn.Module, loss_fn: nn.Module, hp: dict[str, float], bf16: bool = False
) -> Any:
    """Optimizer ``name`` with hyperparameters ``hp`` from the search space and the fixed
    choices of :data:`FIXED` (KFAC MC Fisher, statistics and refresh every 10 steps; SINGD
    dense factors, refresh every 10 steps; SIRFShampoo dense factors up to 512, refresh every
    10 steps; Muon's AdamW part at lr 1e-3), through the app's one factory
    :func:`~beyondgrad.app.optimizers.make_optimizer`."""
    return make_optimizer(name, model, loss_fn, bf16=bf16, **{**FIXED.get(name, {}), **hp})


def state_bytes(opt: Any) -> int:
    """Bytes of optimizer state (tensors found anywhere in ``opt.state``, nested or not)."""
    if hasattr(opt, "optimizer_state_bytes"):
        return int(opt.optimizer_state_bytes())
    seen: set[int] = set()

    def walk(v: Any) -> int:
        if torch.is_tensor(v):
            if v.ndim == 0 or id(v) in seen:
                return 0
            seen.add(id(v))
            return v.numel() * v.element_size()
        if isinstance(v, dict):
            return sum(walk(x) for x in v.values())
        if isinstance(v, (list, tuple)):
            return sum(walk(x) for x in v)
        return 0

    return walk(dict(opt.state))


@dataclass
class Run:
    reached: bool
    seconds: float  # training time to target (or until the budget ran out)
    steps: int
    ms_per_step: float
    state_bytes: int
    diverged: bool
    metric: float
    history: list[tuple[int, float, float]] = field(default_factory=list)  # step, s, metric


def run(
    task_name: str,
    opt_name: str,
    hp: dict[str, float],
    seed: int,
    max_seconds: float,
    max_steps: int = 100_000,
    eval_every: int = 10,
    device: str = "cpu",
    bf16: bool = False,
) -> Run:
    """Train until the task's target, ``max_seconds`` of training time or ``max_steps``."""
    task = make_task(task_name, seed)
    model = task.model.to(device)
    opt = build(opt_name, model, task.loss_fn, hp, bf16)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    elapsed, steps, metric, history = 0.0, 0, -math.inf, []
    reached = diverged = False
    batches = task.batches(seed)
    while steps < max_steps and elapsed < max_seconds and not (reached or diverged):
        X, y = (t.to(device) for t in next(batches))
        start = time.perf_counter()
        if not _step(opt, model, task.loss_fn, X, y):
            diverged = True
            break
        sync()
        elapsed += time.perf_counter() - start
        steps += 1
        if steps % eval_every == 0:
            metric = task.evaluate(model)
            history.append((steps, elapsed, metric))
            diverged = not math.isfinite(metric)
            reached = task.reached(metric)
    ms = 1e3 * elapsed / max(steps, 1)
    return Run(reached, elapsed, steps, ms, state_bytes(opt), diverged, metric, history)


def _step(opt: Any, model: nn.Module, loss_fn: nn.Module, X: torch.Tensor, y: torch.Tensor) -> bool:
    """One training step; False (and no update) when the loss or the statistics diverged."""
    try:
        opt.zero_grad()
        with getattr(opt, "capture", contextlib.nullcontext)():
            loss = loss_fn(model(X), y)
        if not bool(torch.isfinite(loss)):
            return False
        loss.backward()
        opt.step()
    except FloatingPointError:
        return False
    return True


def _score(r: Run, budget: float) -> float:
    return r.seconds if r.reached else budget + 1.0


@dataclass
class Cell:
    hp: dict[str, float]
    runs: list[Run]
    budget: float

    @property
    def median_seconds(self) -> float:
        """Median over the runs of the time to target (the budget + 1 s for a miss)."""
        return statistics.median(_score(r, self.budget) for r in self.runs)

    def summary(self) -> dict[str, Any]:
        """The cell's row: hyperparameters, medians, state MiB, reached and diverged counts."""
        reached = [r for r in self.runs if r.reached]
        return {
            "hp": self.hp,
            "median_seconds": self.median_seconds,
            "median_steps": statistics.median(r.steps for r in reached) if reached else None,
            "ms_per_step": statistics.median(r.ms_per_step for r in self.runs),
            "state_mib": max(r.state_bytes for r in self.runs) / 2**20,
            "reached": f"{len(reached)}/{len(self.runs)}",
            "diverged": sum(r.diverged for r in self.runs),
        }


def tune_and_measure(
    task: str,
    opt_name: str,
    trials: int,
    seeds: int,
    max_seconds: float,
    device: str = "cpu",
    progress: Callable[[str], None] = print,
) -> tuple[Cell, list[Run]]:
    """Random search (``trials`` configurations, seed 0), then ``seeds`` reruns of the best."""
    g = torch.Generator().manual_seed(sum(map(ord, opt_name)))
    space = SEARCH_SPACES[opt_name]
    best: tuple[float, float, dict[str, float]] | None = None
    search: list[Run] = []
    for t in range(trials):
        hp = {k: sample(g) for k, sample in space.items()}
        r = run(task, opt_name, hp, 0, max_seconds, device=device)
        search.append(r)
        key = (_score(r, max_seconds), -r.metric if math.isfinite(r.metric) else math.inf)
        progress(f"  {task} {opt_name} trial {t}: {_fmt_hp(hp)} -> {_fmt_run(r)}")
        if best is None or key < best[:2]:
            best = (*key, hp)
    assert best is not None
    hp = best[2]
    runs = [run(task, opt_name, hp, s, max_seconds, device=device) for s in range(1, seeds + 1)]
    for s, r in enumerate(runs, 1):
        progress(f"  {task} {opt_name} seed {s}: {_fmt_run(r)}")
    return Cell(hp, runs, max_seconds), search


def _fmt_hp(hp: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.2g}" for k, v in hp.items())


def _fmt_run(r: Run) -> str:
    state = (
        f"reached in {r.seconds:.1f}s/{r.steps} steps" if r.reached else f"metric {r.metric:.4f}"
    )
    return state + (" DIVERGED" if r.diverged else "")


def benchmark(
    tasks: tuple[str, ...] = SMALL_TASKS,
    optimizers: tuple[str, ...] = OPTIMIZERS,
    trials: int = 4,
    seeds: int = 2,
    max_seconds: float = 20.0,
    device: str = "cpu",
    bf16: bool = True,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Every (task, optimizer) cell; returns a JSON-able dict (see :func:`render`)."""
    results: dict[str, Any] = {
        "meta": {
            "torch": torch.__version__,
            "device": device if device == "cpu" else torch.cuda.get_device_name(),
            "threads": torch.get_num_threads(),
            "machine": f"{platform.machine()}, {cpu_description()}",
            "trials": trials,
            "seeds": seeds,
            "max_seconds": max_seconds,
        },
        "tasks": {},
    }
    for task in tasks:
        cells: dict[str, Any] = {}
        for name in optimizers:
            if not available(name):
                progress(f"  {name}: not installed, skipped")
                continue
            cell, _ = tune_and_measure(task, name, trials, seeds, max_seconds, device, progress)
            cells[name] = cell.summary()
            if bf16 and name in ("singd", "sirfshampoo"):
                runs = [
                    run(task, name, cell.hp, s, max_seconds, device=device, bf16=True)
                    for s in range(1, seeds + 1)
                ]
                cells[name + "-bf16"] = Cell(cell.hp, runs, max_seconds).summary()
                progress(f"  {task} {name}-bf16: {[_fmt_run(r) for r in runs]}")
        results["tasks"][task] = {"target": make_task(task).target, "cells": cells}
    return results


def render(results: dict[str, Any]) -> str:
    """Markdown tables: one per task, then the geometric means of time ratios to AdamW."""
    meta = results["meta"]
    lines = [
        "# Optimizers: time to target (AlgoPerf-style)",
        "",
        f"torch {meta['torch']}, {meta['device']}, {meta['threads']} threads"
        + (f" ({meta['machine']})" if meta.get("machine") else "")
        + "; random search "
        f"with {meta['trials']} trials per optimizer, then {meta['seeds']} seeds of the best "
        f"configuration; budget {meta['max_seconds']:.0f} s of training per run (a run that "
        "misses the target counts as budget + 1 s). Regenerate: `beyondgrad bench optim`.",
        "",
    ]
    ratios: dict[str, list[float]] = {}
    for task, entry in results["tasks"].items():
        cells = entry["cells"]
        base = cells.get("adamw", {}).get("median_seconds")
        lines += [
            f"## {task} (target {entry['target']})",
            "",
            "| optimizer | config | median s to target | ratio to AdamW | median steps | "
            "ms/step | state MiB | reached | diverged |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, c in cells.items():
            ratio = c["median_seconds"] / base if base else float("nan")
            ratios.setdefault(name, []).append(ratio)
            steps = "–" if c["median_steps"] is None else f"{c['median_steps']:.0f}"
            lines.append(
                f"| {name} | {_fmt_hp(c['hp'])} | {c['median_seconds']:.1f} | {ratio:.2f} | "
                f"{steps} | {c['ms_per_step']:.1f} | {c['state_mib']:.2f} | {c['reached']} | "
                f"{c['diverged']} |"
            )
        lines.append("")
    lines += [
        "## Geometric mean over tasks of the time ratio to AdamW",
        "",
        "| optimizer | geometric mean | tasks |",
        "|---|---|---|",
    ]
    for name, rs in ratios.items():
        finite = [r for r in rs if math.isfinite(r) and r > 0]
        gm = math.exp(sum(map(math.log, finite)) / len(finite)) if finite else float("nan")
        lines.append(f"| {name} | {gm:.2f} | {len(finite)} |")
    return "\n".join(lines) + "\n"


__all__ = [
    "DAMPED",
    "LR_SPAN",
    "OPTIMIZERS",
    "SEARCH_SPACES",
    "available",
    "benchmark",
    "build",
    "cpu_description",
    "render",
    "run",
]
