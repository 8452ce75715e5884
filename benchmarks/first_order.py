"""Benchmark beyondgrad's first-order quantities against one forward+backward and against peers.

One command regenerates ``benchmarks/results/first_order_{device}.md`` and a JSON file with the
raw numbers next to it::

    python benchmarks/first_order.py                 # CPU, all problems, all peers
    python benchmarks/first_order.py --device cuda   # GPU
    python benchmarks/first_order.py --quick --problems mlp --only-beyondgrad   # smoke test

Peers (BackPACK, Opacus) are optional imports: where one is missing, its rows read "n/a".
torch.func ships with torch. See ``benchmarks/README.md`` for the venv with the peers.

Protocol (DESIGN.md section 6):

* Each cell (one quantity, one library, one problem) runs in its own forked child process on CPU
  (in the main process on CUDA). It builds a fresh copy of the problem for the candidate and
  another for the baseline, so hooks one library leaves on a model cannot slow down the other.
* Warm-up, then the peak memory of one call of each, then calibration: each timed sample
  averages ``k`` calls so that it lasts at least ``--target-ms``. Then ``reps`` samples of the
  baseline and the candidate, alternated rep by rep (ABBA). Reported: median candidate time, median
  candidate / median baseline, and the median of the per-rep ratios ("paired").
* A cell is re-timed while the machine looks disturbed (samples spread > 1.5x, its baseline
  1.5x slower than the problem's fastest so far, or other processes using > 20 % of the CPUs);
  the attempt with the fastest baseline is kept, marked NOISY if it was still disturbed.
* Baseline: ``model.zero_grad(set_to_none=True); loss_fn(model(X), y).backward()``.
* Set-up a user pays once per model (BackPACK ``extend``, Opacus wrapping) runs once in the
  cell's set-up and is not timed. Everything else is inside the timed call, such as the
  ``with backpack(...)`` block, building the parameter dict for ``torch.func`` and all of
  ``bg.compute``.
* Peak memory on CPU: resident-set high-water mark (``VmHWM``, after a ``clear_refs`` reset)
  above the resident set just before the call, taken after ``malloc_trim`` so that freed heap
  memory is not silently reused. On CUDA: ``max_memory_allocated`` above ``memory_allocated``.
  The call's outputs (returned, or stored on the parameters) are alive when the peak is read.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime as _dt
import gc
import importlib.metadata as _md
import json
import math
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import beyondgrad as bg
from beyondgrad.problems import PROBLEMS, Problem, make_problem

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MIB = 1024.0 * 1024.0

# --------------------------------------------------------------------------------------------
# Configuration and result records
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """Settings shared by every cell."""

    device: str
    reps: int
    threads: int
    warmup: int
    target_s: float
    max_cell_s: float
    cell_timeout_s: float
    only_beyondgrad: bool
    quick: bool
    noise_spread: float = 1.5
    noise_retries: int = 2
    max_foreign_load: float = 0.2
    retry_wait_s: float = 2.0

    @property
    def isolate(self) -> bool:
        """Whether each cell runs in a forked child (CPU only: CUDA does not survive a fork)."""
        return self.device == "cpu"

    @property
    def tol(self) -> float:
        """Relative tolerance above which an agreement check flags a parameter (float32)."""
        return 1e-4 if self.device == "cpu" else 1e-2


@dataclass
class Candidate:
    """What a cell's set-up returns.

    ``call``: the timed call; its return value is kept alive until its peak memory is read.
    ``reset``: drops results the call left on the model (``.grad``, savefields), not timed.
    ``inspect``: notes about the first call's output (e.g. parameters a library skipped).
    """

    call: Callable[[], object]
    reset: Callable[[], None] = lambda: None
    inspect: Callable[[object], list[str]] | None = None
    notes: list[str] = field(default_factory=list)


Setup = Callable[[Problem], Candidate]


@dataclass(frozen=True)
class CellSpec:
    """One row of the table: a quantity computed by one library (``setup`` None: n/a)."""

    group: str
    library: str
    setup: Setup | None
    note: str = ""
    peer: bool = True


@dataclass
class Row:
    """A measured (or skipped) cell."""

    group: str
    library: str
    status: str  # "ok", "error", "n/a"
    note: str = ""
    time_ms: float | None = None
    base_ms: float | None = None
    ratio: float | None = None
    paired: float | None = None
    mem_mib: float | None = None
    base_mem_mib: float | None = None
    mem_ratio: float | None = None
    k: int | None = None
    k_base: int | None = None
    reps: int | None = None
    spread: float | None = None
    foreign_load: float | None = None
    samples_ms: list[float] = field(default_factory=list)
    base_samples_ms: list[float] = field(default_factory=list)
    wall_s: float | None = None


GROUPS: dict[str, str] = {
    "baseline": "fwd+bwd (baseline re-measured)",
    "batch_grad": "BatchGrad (per-sample gradients)",
    "batch_l2": "BatchL2 (per-sample squared norms)",
    "grad_batch_l2": "Grad + BatchL2 together",
    "sgs": "SumGradSquared",
    "variance": "Variance",
    "batch_dot": "BatchDot (per-sample Gram matrix)",
    "grad": "Grad alone",
}

# --------------------------------------------------------------------------------------------
# Helpers: problems, parameters, peers
# --------------------------------------------------------------------------------------------


def fresh_problem(name: str, device: str) -> Problem:
    """A new, identically seeded instance of a built-in problem on ``device``."""
    return make_problem(name).to(device)


def tied_parameters(model: nn.Module) -> dict[str, int]:
    """Parameter names (as in ``named_parameters``) used by more than one module, with counts."""
    names = {id(p): n for n, p in model.named_parameters()}
    uses: dict[int, int] = {}
    for module in model.modules():
        for _, p in module.named_parameters(recurse=False, remove_duplicate=False):
            uses[id(p)] = uses.get(id(p), 0) + 1
    return {names[i]: c for i, c in uses.items() if c > 1 and i in names}


def owner_types(model: nn.Module) -> dict[int, str]:
    """Map ``id(parameter)`` to the class name of a module owning it directly."""
    owners: dict[int, str] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), type(module).__name__)
    return owners


def baseline_setup(p: Problem) -> Candidate:
    """One plain forward and backward pass (the denominator of every ratio)."""
    model, loss_fn, X, y = p.model, p.loss_fn, p.X, p.y

    def call() -> None:
        model.zero_grad(set_to_none=True)
        loss_fn(model(X), y).backward()

    return Candidate(call, reset=lambda: model.zero_grad(set_to_none=True))


def _has_module(name: str) -> str | None:
    """None if ``name`` imports, else the reason it does not."""
    try:
        __import__(name)
    except Exception as exc:
        return f"{name} not importable ({type(exc).__name__}: {exc})"
    return None


# -- beyondgrad -------------------------------------------------------------------------------


def beyondgrad_setup(*quantities: type[bg.Quantity]) -> Setup:
    """``bg.compute`` for the given quantities; everything happens inside the timed call."""

    def setup(p: Problem) -> Candidate:
        qs = tuple(q() for q in quantities)
        n_params = len(dict(p.model.named_parameters()))

        def call() -> bg.Result:
            return bg.compute(p.model, p.loss_fn, p.X, p.y, *qs)

        def inspect(res: object) -> list[str]:
            assert isinstance(res, bg.Result)
            got = len(res[qs[0]])
            if got < n_params:
                return [f"PARTIAL: {got}/{n_params} parameter tensors"]
            return []

        return Candidate(call, inspect=inspect)

    return setup


# -- BackPACK ---------------------------------------------------------------------------------

BACKPACK_SAVEFIELDS = {
    "BatchGrad": "grad_batch",
    "BatchL2Grad": "batch_l2",
    "SumGradSquared": "sum_grad_squared",
    "Variance": "variance",
}


def backpack_setup(extension: str) -> Setup:
    """BackPACK first-order extension; ``extend`` runs once in set-up (not timed)."""

    def setup(p: Problem) -> Candidate:
        import backpack
        import backpack.extensions as ext

        model = backpack.extend(p.model)
        loss_fn = backpack.extend(p.loss_fn)
        X, y = p.X, p.y
        make_ext = getattr(ext, extension)
        savefield = BACKPACK_SAVEFIELDS[extension]
        params = list(model.parameters())
        owners = owner_types(model)

        def call() -> None:
            model.zero_grad(set_to_none=True)
            with backpack.backpack(make_ext()):
                loss_fn(model(X), y).backward()

        def reset() -> None:
            model.zero_grad(set_to_none=True)
            for q in params:
                if hasattr(q, savefield):
                    delattr(q, savefield)

        def inspect(_: object) -> list[str]:
            missing = [q for q in params if not hasattr(q, savefield)]
            if not missing:
                return []
            kinds: dict[str, int] = {}
            for q in missing:
                kinds[owners.get(id(q), "?")] = kinds.get(owners.get(id(q), "?"), 0) + 1
            detail = ", ".join(f"{k}: {v}" for k, v in sorted(kinds.items()))
            return [
                f"PARTIAL: {len(missing)}/{len(params)} parameter tensors got no "
                f"'{savefield}' ({detail}); BackPACK only warns"
            ]

        return Candidate(
            call, reset=reset, inspect=inspect, notes=["extend() once in set-up (not timed)"]
        )

    return setup


# -- Opacus -----------------------------------------------------------------------------------


def opacus_setup(norms: bool) -> Setup:
    """Opacus ``GradSampleModule`` (hooks); with ``norms`` also the per-sample L2 norms."""

    def setup(p: Problem) -> Candidate:
        from opacus import GradSampleModule

        gsm = GradSampleModule(p.model, batch_first=True, loss_reduction="mean")
        loss_fn, X, y = p.loss_fn, p.X, p.y
        params = [q for q in p.model.parameters() if q.requires_grad]

        def call() -> Tensor | None:
            gsm.zero_grad(set_to_none=True)
            loss_fn(gsm(X), y).backward()
            if not norms:
                return None
            sq = [q.grad_sample.flatten(1).pow(2).sum(1) for q in params]  # type: ignore[union-attr]
            return torch.stack(sq).sum(0).sqrt()

        def reset() -> None:
            gsm.zero_grad(set_to_none=True)

        notes = ["GradSampleModule wrapping once in set-up (not timed)"]
        if norms:
            notes.append("per-sample grads materialized, then norms")
        return Candidate(call, reset=reset, notes=notes)

    return setup


def opacus_ghost_setup(p: Problem) -> Candidate:
    """Opacus ghost clipping: per-sample gradient norms without materializing the gradients."""
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    gsm = GradSampleModuleFastGradientClipping(
        p.model,
        batch_first=True,
        loss_reduction="mean",
        max_grad_norm=1.0,
        use_ghost_clipping=True,
    )
    loss_fn, X, y = p.loss_fn, p.X, p.y

    def call() -> Tensor:
        gsm.zero_grad(set_to_none=True)
        loss_fn(gsm(X), y).backward()
        return gsm.get_norm_sample()

    return Candidate(
        call,
        reset=lambda: gsm.zero_grad(set_to_none=True),
        notes=["GradSampleModuleFastGradientClipping once in set-up (not timed)"],
    )


# -- torch.func -------------------------------------------------------------------------------


def func_per_sample_fn(p: Problem) -> Callable[[], dict[str, Tensor]]:
    """``vmap(grad)`` over ``functional_call``: gradients of each sample's own loss.

    They are ``N`` times beyondgrad's per-sample gradients for ``reduction="mean"`` (the loss of
    a single sample is its own mean). Tied weights: ``functional_call`` ties them by default.
    """
    from torch.func import functional_call, grad, vmap

    model, loss_fn = p.model, p.loss_fn

    def loss_one(
        params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor, t: Tensor
    ) -> Tensor:
        out = functional_call(model, (params, buffers), (x.unsqueeze(0),))
        return loss_fn(out, t.unsqueeze(0))

    per_sample = vmap(grad(loss_one), in_dims=(None, None, 0, 0))

    def run() -> dict[str, Tensor]:
        params = {n: q.detach() for n, q in model.named_parameters()}
        buffers = {n: b.detach() for n, b in model.named_buffers()}
        return per_sample(params, buffers, p.X, p.y)

    return run


def func_setup(norms: bool) -> Setup:
    """torch.func per-sample gradients, optionally reduced to per-sample L2 norms."""

    def setup(p: Problem) -> Candidate:
        run = func_per_sample_fn(p)

        def call() -> object:
            gs = run()
            if not norms:
                return gs
            return torch.stack([g.flatten(1).pow(2).sum(1) for g in gs.values()]).sum(0).sqrt()

        return Candidate(call)

    return setup


# --------------------------------------------------------------------------------------------
# The cells
# --------------------------------------------------------------------------------------------


def cell_specs(cfg: Config) -> list[CellSpec]:
    """Every row, in table order. Peers without an implementation get a reason instead."""
    no_bp = _has_module("backpack")
    no_op = _has_module("opacus")

    def bp(ext: str, group: str) -> CellSpec:
        return CellSpec(
            group, "backpack", None if no_bp else backpack_setup(ext), no_bp or f"extensions.{ext}"
        )

    def op(group: str, setup: Setup, note: str, library: str = "opacus") -> CellSpec:
        return CellSpec(group, library, None if no_op else setup, no_op or note)

    def na(group: str, library: str, reason: str) -> CellSpec:
        return CellSpec(group, library, None, reason)

    bgs = beyondgrad_setup
    specs = [
        CellSpec("baseline", "torch", baseline_setup, "loss.backward(); noise level", False),
        CellSpec("batch_grad", "beyondgrad", bgs(bg.BatchGrad), "", False),
        bp("BatchGrad", "batch_grad"),
        op("batch_grad", opacus_setup(norms=False), "GradSampleModule"),
        CellSpec(
            "batch_grad", "torch.func", func_setup(norms=False), "vmap(grad) + functional_call"
        ),
        CellSpec("batch_l2", "beyondgrad", bgs(bg.BatchL2), "", False),
        bp("BatchL2Grad", "batch_l2"),
        op("batch_l2", opacus_ghost_setup, "ghost clipping norms", "opacus ghost"),
        op("batch_l2", opacus_setup(norms=True), "GradSampleModule, then norms"),
        CellSpec("batch_l2", "torch.func", func_setup(norms=True), "vmap(grad), then norms"),
        CellSpec("grad_batch_l2", "beyondgrad", bgs(bg.Grad, bg.BatchL2), "", False),
        na("grad_batch_l2", "backpack", "same call as its BatchL2 row (fills .grad too)"),
        na("grad_batch_l2", "opacus", "same call as its BatchL2 rows (fills .grad too)"),
        na(
            "grad_batch_l2",
            "torch.func",
            "no separate API (the gradient is the sum of its per-sample gradients)",
        ),
        CellSpec("sgs", "beyondgrad", bgs(bg.SumGradSquared), "", False),
        bp("SumGradSquared", "sgs"),
        na("sgs", "opacus", "no API"),
        na(
            "sgs",
            "torch.func",
            "no API (reduce the per-sample gradients: at least its BatchGrad cost)",
        ),
        CellSpec("variance", "beyondgrad", bgs(bg.Variance), "", False),
        bp("Variance", "variance"),
        na("variance", "opacus", "no API"),
        na(
            "variance",
            "torch.func",
            "no API (reduce the per-sample gradients: at least its BatchGrad cost)",
        ),
        CellSpec("batch_dot", "beyondgrad", bgs(bg.BatchDot), "", False),
        na("batch_dot", "backpack", "no extension for per-sample gradient inner products"),
        na("batch_dot", "opacus", "no API"),
        na(
            "batch_dot",
            "torch.func",
            "no API (Gram of the per-sample gradients: at least its BatchGrad cost)",
        ),
        CellSpec("grad", "beyondgrad", bgs(bg.Grad), "", False),
        na("grad", "peers", "plain autograd is the baseline row"),
    ]
    if cfg.only_beyondgrad:
        specs = [s for s in specs if not s.peer and s.library != "peers"]
    return specs


# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------


class CpuMemory:
    """Resident-set high-water mark above the level before a call (Linux ``/proc``)."""

    def __init__(self) -> None:
        self._libc: Any = None
        with contextlib.suppress(OSError):
            self._libc = ctypes.CDLL("libc.so.6")
        self.resettable = self._try_reset()

    @staticmethod
    def _status_kib(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        raise RuntimeError(f"{key} not in /proc/self/status")

    @staticmethod
    def _try_reset() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            return False
        return True

    def method(self) -> str:
        """How the peak is measured, for the table header."""
        if self.resettable:
            return (
                "resident-set high-water mark (VmHWM, reset via /proc/self/clear_refs) above "
                "the resident set before the call, after gc + malloc_trim"
            )
        return (
            "FALLBACK: clear_refs reset not permitted; ru_maxrss after the call minus the "
            "resident set before it (an upper bound when the call did not raise the "
            "process's high-water mark)"
        )

    def peak_mib(self, fn: Callable[[], object]) -> float:
        gc.collect()
        if self._libc is not None:
            self._libc.malloc_trim(0)
        before = self._status_kib("VmRSS")
        if self.resettable:
            self._try_reset()
        out = fn()
        if self.resettable:
            peak = self._status_kib("VmHWM")
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        del out
        return max(0, peak - before) / 1024.0


def cuda_peak_mib(fn: Callable[[], object]) -> float:
    """Peak CUDA memory allocated during ``fn`` above what was allocated before it."""
    gc.collect()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del out
    return max(0, peak - before) / MIB


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_sample(fn: Callable[[], object], k: int, device: str) -> float:
    """Seconds per call, averaged over ``k`` back-to-back calls."""
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(k):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / k


@contextlib.contextmanager
def recorded_warnings() -> Iterator[list[warnings.WarningMessage]]:
    """Record every warning in the block."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught


IGNORED_WARNINGS = (
    "Full backward hook is firing",  # BackPACK's hook on a first layer fed with integer ids
    "does not have an extension for Module",  # BackPACK skips: summarized by the PARTIAL note
)


def summarize_warnings(caught: list[warnings.WarningMessage], limit: int = 2) -> list[str]:
    """Distinct warning messages worth a note, shortened."""
    out: list[str] = []
    for w in caught:
        msg = " ".join(str(w.message).split())
        if any(s in msg for s in IGNORED_WARNINGS):
            continue
        msg = f"warning: {msg[:140]}"
        if msg not in out:
            out.append(msg)
    return out[:limit]


@dataclass
class Timing:
    """Interleaved samples (seconds per call) of the baseline and the candidate."""

    base: list[float]
    cand: list[float]
    k_base: int
    k_cand: int
    reps: int
    foreign_load: float | None  # share of all CPUs that other processes used (CPU only)

    @property
    def spread(self) -> float:
        """Max/min ratio of the noisier of the two sample series (1 = perfectly steady)."""
        return max(max(x) / min(x) for x in (self.base, self.cand))

    @property
    def base_median(self) -> float:
        return statistics.median(self.base)

    def disturbances(self, cfg: Config, ref_base_s: float | None) -> list[str]:
        """Why these samples look disturbed (empty: they look fine)."""
        out = []
        if self.spread > cfg.noise_spread:
            out.append(f"samples spread {self.spread:.2g}x (max/min)")
        if ref_base_s is not None and self.base_median > cfg.noise_spread * ref_base_s:
            out.append(
                f"baseline {self.base_median / ref_base_s:.2g}x slower than the problem's fastest"
            )
        if self.foreign_load is not None and self.foreign_load > cfg.max_foreign_load:
            out.append(f"other processes used {self.foreign_load:.0%} of the CPUs")
        return out


class ForeignLoad:
    """Share of the machine's CPU time used by other processes between ``start`` and ``stop``
    (from ``/proc/stat``, minus this process's own CPU time)."""

    def __init__(self) -> None:
        self._t0 = self._busy0 = self._own0 = 0.0

    @staticmethod
    def _busy_s() -> float | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own_s() -> float:
        t = os.times()
        return t.user + t.system

    def start(self) -> None:
        self._t0, self._own0 = time.perf_counter(), self._own_s()
        self._busy0 = self._busy_s() or 0.0

    def stop(self) -> float | None:
        busy = self._busy_s()
        wall = time.perf_counter() - self._t0
        if busy is None or wall <= 0:
            return None
        foreign = (busy - self._busy0) - (self._own_s() - self._own0)
        return max(0.0, foreign) / (wall * (os.cpu_count() or 1))


def timed_reps(base: Callable[[], object], cand: Callable[[], object], cfg: Config) -> Timing:
    """Calibrate ``k`` (calls per sample, so that a sample lasts >= the target), then take
    ``reps`` samples of each, alternated rep by rep in ABBA order (drift within a rep favours
    neither side). Reps are cut (to at least 3) where they would exceed the cell's budget."""
    device = cfg.device
    t_b = time_sample(base, 1, device)
    t_c = time_sample(cand, 1, device)
    k_b = max(1, math.ceil(cfg.target_s / max(t_b, 1e-9)))
    k_c = max(1, math.ceil(cfg.target_s / max(t_c, 1e-9)))
    per_rep = k_b * t_b + k_c * t_c
    reps = min(cfg.reps, max(min(3, cfg.reps), int(cfg.max_cell_s / max(per_rep, 1e-9))))
    bs: list[float] = []
    cs: list[float] = []
    gc.collect()
    load = ForeignLoad()
    load.start()
    for rep in range(reps):
        if rep % 2 == 0:
            bs.append(time_sample(base, k_b, device))
            cs.append(time_sample(cand, k_c, device))
        else:
            cs.append(time_sample(cand, k_c, device))
            bs.append(time_sample(base, k_b, device))
    foreign = load.stop() if device == "cpu" else None
    return Timing(bs, cs, k_b, k_c, reps, foreign)


def measure_cell(
    problem: str,
    spec: CellSpec,
    cfg: Config,
    memory: CpuMemory | None,
    ref_base_s: float | None = None,
) -> Row:
    """Set up, warm up, measure memory, calibrate and time one cell against the baseline.

    ``ref_base_s``: the fastest baseline median seen so far on this problem; a cell whose own
    baseline is much slower ran on a disturbed machine and is re-timed."""
    assert spec.setup is not None
    row = Row(spec.group, spec.library, "ok")
    notes: list[str] = [spec.note] if spec.note else []
    device = cfg.device
    try:
        base = baseline_setup(fresh_problem(problem, device))
        cand_problem = fresh_problem(problem, device)
        cand = spec.setup(cand_problem)
        notes += cand.notes
        with recorded_warnings() as caught:
            first = cand.call()
        _sync(device)
        if cand.inspect is not None:
            notes += cand.inspect(first)
        del first
        notes += summarize_warnings(caught)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(cfg.warmup):
                base.call()
            for _ in range(max(0, cfg.warmup - 1)):
                cand.call()

            # peak memory of one call each, from a clean state
            base.reset()
            cand.reset()
            peak = memory.peak_mib if memory is not None else cuda_peak_mib
            row.base_mem_mib = peak(base.call)
            base.reset()
            row.mem_mib = peak(cand.call)
            cand.reset()

            # re-time (recalibrating) while the machine looks disturbed; keep the attempt
            # with the fastest baseline (contention only ever slows things down)
            attempts = [timed_reps(base.call, cand.call, cfg)]
            while attempts[-1].disturbances(cfg, ref_base_s) and len(attempts) <= cfg.noise_retries:
                time.sleep(cfg.retry_wait_s)
                attempts.append(timed_reps(base.call, cand.call, cfg))
            best = min(attempts, key=lambda t: t.base_median)
            if len(attempts) > 1:
                notes.append(f"re-timed {len(attempts) - 1}x (disturbed machine)")
            if issues := best.disturbances(cfg, ref_base_s):
                notes.append("NOISY: " + ", ".join(issues))
            if best.reps < cfg.reps:
                notes.append(f"{best.reps} reps (time cap)")
    except Exception as exc:
        row.status = "error"
        row.note = "; ".join([f"error: {type(exc).__name__}: {_short(str(exc))}", *notes])
        return row

    bs, cs = best.base, best.cand
    row.samples_ms = [c * 1e3 for c in cs]
    row.base_samples_ms = [b * 1e3 for b in bs]
    row.time_ms = statistics.median(row.samples_ms)
    row.base_ms = statistics.median(row.base_samples_ms)
    row.ratio = row.time_ms / row.base_ms
    row.paired = statistics.median(c / b for c, b in zip(cs, bs))
    if row.base_mem_mib and row.base_mem_mib > 0 and row.mem_mib is not None:
        row.mem_ratio = row.mem_mib / row.base_mem_mib
    row.k, row.k_base, row.reps, row.spread = best.k_cand, best.k_base, best.reps, best.spread
    row.foreign_load = best.foreign_load
    row.note = "; ".join(notes)
    return row


def _short(msg: str, limit: int = 220) -> str:
    msg = " ".join(msg.split())
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def run_isolated(fn: Callable[[], Any], timeout_s: float, isolate: bool) -> Any:
    """Run ``fn`` in a forked child (result sent back through a pipe) or in this process."""
    if not isolate:
        try:
            return fn()
        finally:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)

    def child() -> None:
        try:
            send.send(("ok", fn()))
        except BaseException as exc:
            send.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        finally:
            send.close()

    proc = ctx.Process(target=child, daemon=True)
    proc.start()
    send.close()
    try:
        if not recv.poll(timeout_s):
            raise TimeoutError(f"child did not finish within {timeout_s:.0f} s")
        status, payload = recv.recv()
    except EOFError:
        proc.join(5)
        raise RuntimeError(f"child died (exit code {proc.exitcode}; killed for memory?)") from None
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join(5)
        recv.close()
    if status != "ok":
        raise RuntimeError(payload)
    return payload


# --------------------------------------------------------------------------------------------
# Agreement checks
# --------------------------------------------------------------------------------------------


@dataclass
class Check:
    """One agreement check: ``value`` against ``reference`` over some parameter tensors."""

    name: str
    library: str
    groups: list[str]
    status: str = "ok"
    max_abs: float | None = None
    rel: float | None = None
    detail: str = ""
    mismatch: list[str] = field(default_factory=list)


def compare(a: dict[str, Tensor], b: dict[str, Tensor]) -> tuple[float, float, dict[str, float]]:
    """Max abs difference, the same divided by max ``|b|`` (all tensors together), per-tensor
    relative errors, over the names both dicts hold."""
    names = [n for n in b if n in a]
    if not names:
        raise ValueError("nothing to compare")
    per: dict[str, float] = {}
    max_abs, max_ref = 0.0, 0.0
    for n in names:
        x, r = a[n].detach().double(), b[n].detach().double()
        if x.shape != r.shape:
            raise ValueError(f"{n}: shapes differ {tuple(x.shape)} vs {tuple(r.shape)}")
        d, m = float((x - r).abs().max()), float(r.abs().max())
        per[n] = d / m if m > 0 else (0.0 if d == 0 else math.inf)
        max_abs, max_ref = max(max_abs, d), max(max_ref, m)
    return max_abs, (max_abs / max_ref if max_ref > 0 else 0.0), per


def fill_check(
    check: Check,
    a: dict[str, Tensor],
    b: dict[str, Tensor],
    tol: float,
    n_total: int,
    extra: str = "",
    flag: bool = True,
) -> Check:
    """Compare and record: relative errors, the tensors above ``tol``, the coverage.
    ``flag``: whether mismatching tensors flag the table rows (off for sums over parameters,
    whose per-parameter check flags them by name)."""
    check.max_abs, check.rel, per = compare(a, b)
    bad = sorted(n for n, r in per.items() if r > tol)
    check.mismatch = bad if flag else []
    parts = [extra] if extra else []
    if len(per) < n_total:
        parts.append(f"on {len(per)}/{n_total} tensors")
    if bad:
        worst = ", ".join(f"{n}: {per[n]:.2g}" for n in bad[:4])
        parts.append(f"MISMATCH (rel > {tol:g}) {worst}")
    check.detail = "; ".join(parts)
    return check


def total(d: dict[str, Tensor], names: list[str] | None = None) -> dict[str, Tensor]:
    """The named tensors summed into one entry (per-sample norms summed over parameters)."""
    keys = names if names is not None else list(d)
    return {"sum over params": torch.stack([d[n] for n in keys]).sum(0)}


def agreement(problem: str, cfg: Config) -> dict[str, Any]:
    """Problem facts and the agreement checks (beyondgrad vs autograd, torch.func and peers)."""
    p = fresh_problem(problem, cfg.device)
    names = [n for n, _ in p.model.named_parameters()]
    N = p.X.shape[0]
    info = {
        "batch": N,
        "num_params": p.num_params,
        "param_tensors": len(names),
        "tied": tied_parameters(p.model),
    }
    tol = cfg.tol
    checks: list[Check] = []
    qs = (bg.Grad(), bg.BatchGrad(), bg.BatchL2(), bg.SumGradSquared(), bg.Variance())
    res = bg.compute(p.model, p.loss_fn, p.X, p.y, *qs)
    ours = {type(q).__name__: res[q] for q in qs}

    def attempt(check: Check, body: Callable[[Check], Check]) -> None:
        try:
            checks.append(body(check))
        except Exception as exc:
            check.status = "error"
            check.detail = f"error: {type(exc).__name__}: {_short(str(exc))}"
            checks.append(check)

    # autograd
    def autograd_check(c: Check) -> Check:
        p.model.zero_grad(set_to_none=True)
        p.loss_fn(p.model(p.X), p.y).backward()
        ref = {n: q.grad for n, q in p.model.named_parameters() if q.grad is not None}
        p.model.zero_grad(set_to_none=True)
        return fill_check(c, ours["Grad"], ref, tol, len(names))

    attempt(Check("Grad: beyondgrad vs loss.backward()", "beyondgrad", ["grad"]), autograd_check)

    # torch.func: gradients of each sample's own loss, i.e. N x ours (reduction mean)
    func: dict[str, Tensor] = {}

    def func_checks(c: Check) -> Check:
        func.update({n: g / N for n, g in func_per_sample_fn(p)().items()})
        return fill_check(c, ours["BatchGrad"], func, tol, len(names))

    attempt(
        Check("BatchGrad: beyondgrad vs torch.func vmap(grad) / N", "beyondgrad", ["batch_grad"]),
        func_checks,
    )
    if func:
        sq = {n: g.flatten(1).pow(2).sum(1) for n, g in func.items()}
        attempt(
            Check(
                "BatchL2 summed over params: beyondgrad vs torch.func",
                "beyondgrad",
                ["batch_l2", "grad_batch_l2"],
            ),
            lambda c: fill_check(c, total(ours["BatchL2"]), total(sq), tol, 1, flag=False),
        )
        attempt(
            Check(
                "BatchL2 per param: beyondgrad vs torch.func",
                "beyondgrad",
                ["batch_l2", "grad_batch_l2"],
            ),
            lambda c: fill_check(c, ours["BatchL2"], sq, tol, len(names)),
        )
        sgs = {n: g.pow(2).sum(0) for n, g in func.items()}
        attempt(
            Check("SumGradSquared: beyondgrad vs torch.func", "beyondgrad", ["sgs"]),
            lambda c: fill_check(c, ours["SumGradSquared"], sgs, tol, len(names)),
        )
        var = {n: (N * g).pow(2).mean(0) - (N * g).mean(0).pow(2) for n, g in func.items()}
        attempt(
            Check(
                "Variance: beyondgrad vs torch.func (of the N-scaled per-sample grads)",
                "beyondgrad",
                ["variance"],
            ),
            lambda c: fill_check(c, ours["Variance"], var, tol, len(names)),
        )
        gram = {n: g.flatten(1) @ g.flatten(1).T for n, g in func.items()}
        attempt(
            Check(
                "BatchDot: beyondgrad vs torch.func (Gram of per-sample grads)",
                "beyondgrad",
                ["batch_dot"],
            ),
            lambda c: fill_check(c, _batch_dot(p), gram, tol, len(names)),
        )

    if not cfg.only_beyondgrad:
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        if _has_module("backpack") is None:
            backpack_checks(p, ours, N, len(names), tol, attempt)
        if _has_module("opacus") is None:
            opacus_checks(problem, cfg, ours, N, len(names), tol, attempt)
    return {"info": info, "checks": [asdict(c) for c in checks]}


def _batch_dot(p: Problem) -> dict[str, Tensor]:
    return bg.compute(p.model, p.loss_fn, p.X, p.y, bg.BatchDot())[bg.BatchDot]


AttemptFn = Callable[[Check, Callable[[Check], Check]], None]


def backpack_checks(
    p: Problem,
    ours: dict[str, dict[str, Tensor]],
    N: int,
    n_total: int,
    tol: float,
    attempt: AttemptFn,
) -> None:
    """BackPACK with reduction mean uses the 1/N-scaled per-sample gradients, like ours."""
    import backpack
    import backpack.extensions as ext

    q = fresh_problem(p.name, str(p.X.device))
    model, loss_fn = backpack.extend(q.model), backpack.extend(q.loss_fn)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with backpack.backpack(
            ext.BatchGrad(), ext.BatchL2Grad(), ext.SumGradSquared(), ext.Variance()
        ):
            loss_fn(model(q.X), q.y).backward()

    def field_of(attr: str) -> dict[str, Tensor]:
        return {n: getattr(t, attr) for n, t in model.named_parameters() if hasattr(t, attr)}

    gb, l2 = field_of("grad_batch"), field_of("batch_l2")
    attempt(
        Check(
            "BatchGrad: beyondgrad vs BackPACK grad_batch (directly)", "backpack", ["batch_grad"]
        ),
        lambda c: fill_check(c, ours["BatchGrad"], gb, tol, n_total),
    )
    attempt(
        Check(
            "BatchL2 summed over the params BackPACK covers: vs BackPACK batch_l2",
            "backpack",
            ["batch_l2"],
        ),
        lambda c: fill_check(
            c,
            total(ours["BatchL2"], list(l2)),
            total(l2),
            tol,
            1,
            f"{len(l2)}/{n_total} tensors covered",
            flag=False,
        ),
    )
    attempt(
        Check("BatchL2 per param: beyondgrad vs BackPACK batch_l2", "backpack", ["batch_l2"]),
        lambda c: fill_check(c, ours["BatchL2"], l2, tol, n_total),
    )
    attempt(
        Check("SumGradSquared: beyondgrad vs BackPACK", "backpack", ["sgs"]),
        lambda c: fill_check(c, ours["SumGradSquared"], field_of("sum_grad_squared"), tol, n_total),
    )
    ours_var = {n: v / N**2 for n, v in ours["Variance"].items()}
    attempt(
        Check(
            "Variance: beyondgrad / N^2 vs BackPACK (BackPACK: variance of the "
            "1/N-scaled per-sample grads)",
            "backpack",
            ["variance"],
        ),
        lambda c: fill_check(c, ours_var, field_of("variance"), tol, n_total),
    )


def opacus_checks(
    problem: str,
    cfg: Config,
    ours: dict[str, dict[str, Tensor]],
    N: int,
    n_total: int,
    tol: float,
    attempt: AttemptFn,
) -> None:
    """Opacus (reduction mean) scales per-sample gradients by N: compare grad_sample / N."""

    def per_sample(c: Check) -> Check:
        q = fresh_problem(problem, cfg.device)
        cand = opacus_setup(norms=False)(q)
        cand.call()
        gs = {
            n: t.grad_sample / N
            for n, t in q.model.named_parameters()
            if getattr(t, "grad_sample", None) is not None
        }
        return fill_check(c, ours["BatchGrad"], gs, tol, n_total)

    def ghost(c: Check) -> Check:
        q = fresh_problem(problem, cfg.device)
        cand = opacus_ghost_setup(q)
        norms = cand.call()
        assert isinstance(norms, Tensor)
        ref = total({"x": (norms / N).pow(2)})
        c = fill_check(c, total(ours["BatchL2"]), ref, tol, 1, flag=False)
        per = {
            n: (t._norm_sample / N).pow(2)
            for n, t in q.model.named_parameters()
            if getattr(t, "_norm_sample", None) is not None
        }
        _, _, rels = compare(ours["BatchL2"], per)
        bad = sorted(n for n, r in rels.items() if r > tol)
        if bad:
            c.mismatch = bad
            c.detail = "; ".join(
                filter(
                    None,
                    [
                        c.detail,
                        "per-param MISMATCH " + ", ".join(f"{n}: {rels[n]:.2g}" for n in bad[:4]),
                    ],
                )
            )
        return c

    attempt(
        Check("BatchGrad: beyondgrad vs Opacus grad_sample / N", "opacus", ["batch_grad"]),
        per_sample,
    )
    attempt(
        Check(
            "BatchL2 summed over params: beyondgrad vs (Opacus ghost norm / N)^2",
            "opacus ghost",
            ["batch_l2"],
        ),
        ghost,
    )


# --------------------------------------------------------------------------------------------
# Driver and rendering
# --------------------------------------------------------------------------------------------


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (or the platform's guess)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def version(pkg: str) -> str:
    """Installed version of a distribution, or "not installed"."""
    try:
        return _md.version(pkg)
    except _md.PackageNotFoundError:
        return "not installed"


def run_problem(problem: str, cfg: Config, memory: CpuMemory | None) -> dict[str, Any]:
    """Every cell of one problem, then its agreement checks."""
    t0 = time.perf_counter()
    rows: list[Row] = []
    for spec in cell_specs(cfg):
        label = f"[{problem}] {GROUPS[spec.group]} / {spec.library}"
        if spec.setup is None:
            rows.append(Row(spec.group, spec.library, "n/a", spec.note))
            continue
        tc = time.perf_counter()
        try:
            ref = min((r.base_ms for r in rows if r.base_ms is not None), default=None)
            ref_s = ref / 1e3 if ref is not None else None
            row = run_isolated(
                partial(measure_cell, problem, spec, cfg, memory, ref_s),
                cfg.cell_timeout_s,
                cfg.isolate,
            )
        except Exception as exc:
            row = Row(
                spec.group, spec.library, "error", f"error: {_short(str(exc).splitlines()[0])}"
            )
        row.wall_s = time.perf_counter() - tc
        rows.append(row)
        if row.status == "ok":
            print(
                f"{label}: {row.time_ms:.3g} ms, x{row.ratio:.3g} (paired x{row.paired:.3g}), "
                f"mem {row.mem_mib:.3g} MiB  [{row.wall_s:.0f} s]",
                file=sys.stderr,
            )
        else:
            print(f"{label}: {row.note}", file=sys.stderr)
    try:
        agree = run_isolated(lambda: agreement(problem, cfg), cfg.cell_timeout_s, cfg.isolate)
    except Exception as exc:
        agree = {"info": {}, "checks": [], "error": _short(str(exc).splitlines()[0])}
    return {
        "problem": problem,
        "rows": [asdict(r) for r in rows],
        "agreement": agree,
        "wall_s": time.perf_counter() - t0,
    }


def fmt(x: float | None, digits: int = 3) -> str:
    """Compact number: 3 significant digits, thousands separated."""
    if x is None:
        return ""
    if x != x or math.isinf(x):
        return str(x)
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def flags_for(row: dict[str, Any], checks: list[dict[str, Any]]) -> list[str]:
    """Agreement failures that concern a row (same library, same quantity group)."""
    out = []
    for c in checks:
        if c["library"] == row["library"] and row["group"] in c["groups"] and c["mismatch"]:
            out.append(
                "DISAGREES on "
                + ", ".join(c["mismatch"][:3])
                + (" ..." if len(c["mismatch"]) > 3 else "")
                + " (see agreement)"
            )
    return sorted(set(out))


def render(meta: dict[str, Any], results: list[dict[str, Any]]) -> str:
    """The markdown report."""
    lines = [
        f"# First-order quantities: beyondgrad vs one forward+backward and peers "
        f"({meta['device']})",
        "",
        f"*Generated {meta['date']} by `{meta['command']}`.*",
        "",
        f"* **Machine**: {meta['machine']}; Python {meta['python']}.",
        f"* **torch {meta['torch']}**, device `{meta['device']}`, torch threads "
        f"{meta['threads']} (interop {meta['interop_threads']}).",
        "* **Libraries**: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ".",
        f"* **Timing**: {meta['warmup']} warm-up call(s); each sample averages k calls so that "
        f"it lasts >= {meta['target_ms']:g} ms; {meta['reps']} samples of the baseline and of the "
        f"candidate (fewer, but at least {min(3, meta['reps'])}, where a cell's timing would "
        f"exceed {meta['max_cell_s']:g} s), "
        "alternated rep by rep (order swapped every other rep). *time*: median of the "
        "candidate's samples. *x fwd+bwd*: its "
        "median / the baseline's median, the baseline re-measured in the same process. "
        "*paired x*: median of the per-rep ratios. A cell is re-timed (recalibrated) up to "
        f"{meta['noise_retries']} more times while the machine looks disturbed: samples "
        f"spread more than {meta['noise_spread']:g}x (max/min), its baseline median "
        f"{meta['noise_spread']:g}x slower than the problem's fastest so far, or other "
        f"processes using more than {meta['max_foreign_load']:.0%} of the CPUs (CPU only). "
        "The attempt with the fastest baseline is kept; NOISY says it was still disturbed.",
        f"* **Memory**: {meta['memory_method']}; one call of each, after warm-up, from a clean "
        "state (results of earlier calls dropped); the outputs are alive when the peak is "
        "read. *mem x*: over the baseline's peak in the same process.",
        f"* **Isolation**: {meta['isolation']}. Each cell builds its own copies of the problem "
        "(one for the candidate, one for the baseline).",
        "* **Set-up**: beyondgrad does everything inside `bg.compute()` (timed). BackPACK "
        "`extend()` and Opacus wrapping run once per model in set-up and are *not* timed; "
        "`with backpack(...)`, the parameter dict for torch.func and everything per step are.",
        "* Ratios in the `fwd+bwd` row show the noise level. PARTIAL: the library silently "
        "skipped some parameters. DISAGREES: its values differ from beyondgrad's on some "
        "parameters (see the agreement table below the problem).",
        "",
    ]
    lines += render_summary(results)
    for res in results:
        lines += render_problem(res, meta)
    return "\n".join(lines) + "\n"


def render_summary(results: list[dict[str, Any]]) -> list[str]:
    """beyondgrad's time ratio per quantity and problem, next to the fastest peer."""
    if not results:
        return []
    head = (
        "| quantity | "
        + " | ".join(f"{r['problem']}: beyondgrad | {r['problem']}: best peer" for r in results)
        + " |"
    )
    lines = [
        "## Summary (time x fwd+bwd)",
        "",
        "Best peer: the fastest peer row that ran, marked where it skipped parameters "
        "(partial) or failed the agreement check (disagrees).",
        "",
        head,
        "|---|" + "---:|---|" * len(results),
    ]
    for group, label in GROUPS.items():
        if group == "baseline":
            continue
        cells = []
        for r in results:
            ours = [x for x in r["rows"] if x["group"] == group and x["library"] == "beyondgrad"]
            peers = [
                x
                for x in r["rows"]
                if x["group"] == group and x["status"] == "ok" and x["library"] != "beyondgrad"
            ]
            cells.append(
                fmt(ours[0]["ratio"])
                if ours and ours[0]["status"] == "ok"
                else (ours[0]["status"] if ours else "")
            )
            if peers:
                best = min(peers, key=lambda x: x["ratio"])
                marks = [
                    m
                    for m, bad in (
                        ("partial", "PARTIAL" in best["note"]),
                        ("disagrees", bool(flags_for(best, r["agreement"].get("checks", [])))),
                    )
                    if bad
                ]
                mark = f" ({', '.join(marks)})" if marks else ""
                cells.append(f"{fmt(best['ratio'])} {best['library']}{mark}")
            else:
                cells.append("-")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def render_problem(res: dict[str, Any], meta: dict[str, Any]) -> list[str]:
    """The table and the agreement checks of one problem."""
    info = res["agreement"].get("info", {})
    checks = res["agreement"].get("checks", [])
    base = [r for r in res["rows"] if r["status"] == "ok" and r["base_ms"] is not None]
    lines = [f"## {res['problem']} ({meta['device']})", ""]
    if info:
        tied = info.get("tied") or {}
        tied_s = (
            (f"; tied weights: {', '.join(tied)} (one tensor used by {max(tied.values())} modules)")
            if tied
            else ""
        )
        lines.append(
            f"Batch {info['batch']}, {info['num_params']:,} parameters in "
            f"{info['param_tensors']} tensors{tied_s}."
        )
    if base:
        b_ms = statistics.median(r["base_ms"] for r in base)
        b_mem = [r["base_mem_mib"] for r in base if r["base_mem_mib"] is not None]
        lines.append(
            f"Baseline fwd+bwd: **{fmt(b_ms)} ms** (median over the cells' "
            f"processes, range {fmt(min(r['base_ms'] for r in base))}-"
            f"{fmt(max(r['base_ms'] for r in base))} ms), peak memory "
            f"{fmt(statistics.median(b_mem)) if b_mem else '?'} MiB. "
            f"Wall time {res['wall_s']:.0f} s."
        )
    lines += [
        "",
        "| quantity | library | time [ms] | x fwd+bwd (median ratio) | paired x | "
        "peak mem [MiB] | mem x fwd+bwd | notes |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in res["rows"]:
        notes = [r["note"]] if r["note"] else []
        notes += flags_for(r, checks)
        note = "; ".join(notes).replace("|", "\\|")
        if r["status"] == "ok":
            cols = [
                fmt(r["time_ms"]),
                f"**{fmt(r['ratio'])}**",
                fmt(r["paired"]),
                fmt(r["mem_mib"]),
                fmt(r["mem_ratio"]),
            ]
        else:
            cols = [r["status"], r["status"], "", "", ""]
        lines.append(
            f"| {GROUPS[r['group']]} | {r['library']} | " + " | ".join(cols) + f" | {note} |"
        )
    lines += [
        "",
        f"### Agreement ({res['problem']}, float32, flagged above rel {meta['tol']:g})",
        "",
        "relative = max abs difference / max abs reference value, over all compared "
        "tensors together; per-tensor mismatches are listed in *detail*.",
        "",
        "| check | max abs diff | relative | detail |",
        "|---|---:|---:|---|",
    ]
    if "error" in res["agreement"]:
        lines.append(f"| agreement run | error | | {res['agreement']['error']} |")
    for c in checks:
        if c["status"] != "ok":
            lines.append(f"| {c['name']} | error | | {c['detail']} |")
        else:
            lines.append(f"| {c['name']} | {c['max_abs']:.3g} | {c['rel']:.3g} | {c['detail']} |")
    return [*lines, ""]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=PROBLEMS)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--reps", type=int, default=7, help="timed samples per cell (default 7)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="markdown output (default benchmarks/results/first_order_{device}.md); "
        "the JSON goes next to it",
    )
    ap.add_argument(
        "--quick", action="store_true", help="smoke test: 2 reps, 1 warm-up, short samples"
    )
    ap.add_argument(
        "--only-beyondgrad",
        action="store_true",
        help="skip the peers (BackPACK, Opacus, torch.func rows)",
    )
    ap.add_argument(
        "--target-ms",
        type=float,
        default=None,
        help="minimum duration of one timed sample (default 50 on CPU, 20 on CUDA)",
    )
    ap.add_argument(
        "--max-cell-s",
        type=float,
        default=None,
        help="timing budget per cell before reps are cut (default 25 CPU, 10 CUDA)",
    )
    return ap.parse_args(argv)


def configure(args: argparse.Namespace, cell_timeout_s: float) -> tuple[Config, CpuMemory | None]:
    """The run's :class:`Config` from the shared command-line options; sets torch's threads."""
    cpu = args.device == "cpu"
    cfg = Config(
        device=args.device,
        reps=2 if args.quick else args.reps,
        threads=args.threads,
        warmup=1 if args.quick else 3,
        target_s=(args.target_ms or (20.0 if args.quick else (50.0 if cpu else 20.0))) / 1e3,
        max_cell_s=args.max_cell_s or (25.0 if cpu else 10.0),
        cell_timeout_s=cell_timeout_s,
        only_beyondgrad=args.only_beyondgrad,
        quick=args.quick,
    )
    torch.set_num_threads(cfg.threads)
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(cfg.threads)
    return cfg, (CpuMemory() if cpu else None)


def run_meta(
    args: argparse.Namespace,
    argv: list[str] | None,
    cfg: Config,
    memory: CpuMemory | None,
    packages: tuple[str, ...],
) -> dict[str, Any]:
    """What the markdown header and the JSON record about the run (machine, versions,
    protocol)."""
    machine = f"{cpu_model()}, {os.cpu_count()} logical CPUs"
    if args.device != "cpu":
        machine = f"{torch.cuda.get_device_name()} (host: {machine})"
    return {
        "date": _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv or sys.argv[1:])]),
        "device": args.device,
        "machine": machine,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "versions": {pkg: version(pkg) for pkg in packages[: 1 if cfg.only_beyondgrad else None]},
        "reps": cfg.reps,
        "warmup": cfg.warmup,
        "target_ms": cfg.target_s * 1e3,
        "max_cell_s": cfg.max_cell_s,
        "tol": cfg.tol,
        "noise_spread": cfg.noise_spread,
        "noise_retries": cfg.noise_retries,
        "max_foreign_load": cfg.max_foreign_load,
        "quick": cfg.quick,
        "only_beyondgrad": cfg.only_beyondgrad,
        "memory_method": (
            memory.method()
            if memory is not None
            else "torch.cuda.max_memory_allocated (after reset_peak_memory_stats) "
            "above torch.cuda.memory_allocated before the call"
        ),
        "isolation": (
            "each cell in its own forked child process"
            if cfg.isolate
            else "all cells in one process, one after the other"
        ),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: CUDA is not available", file=sys.stderr)
        return 2
    cfg, memory = configure(args, cell_timeout_s=600.0)
    out = args.out or RESULTS_DIR / f"first_order_{args.device}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    packages = ("beyondgrad", "backpack-for-pytorch", "opacus", "numpy")
    meta = run_meta(args, argv, cfg, memory, packages)
    results = []
    t0 = time.perf_counter()
    for problem in args.problems:
        results.append(run_problem(problem, cfg, memory))
    meta["wall_s"] = time.perf_counter() - t0
    out.write_text(render(meta, results))
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(
        f"wrote {out} and {out.with_suffix('.json').name} ({meta['wall_s']:.0f} s)", file=sys.stderr
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
