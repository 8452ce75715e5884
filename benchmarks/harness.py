"""The shared harness of the benchmark scripts: protocol, problems, peers, environment, tables.

Every script in ``benchmarks/`` declares its cells (what is timed against what) and its tables;
everything else lives here, once:

* **Problems.** The built-in problems ``mlp``, ``cnn``, ``transformer`` of the package are
  imported in this module only (:func:`fresh_problem`); ``--smoke`` shrinks their batch.
* **Protocol** (DESIGN.md section 6). A cell times a candidate call against a baseline call
  (one plain forward+backward, or a reference) in the same process: warm-up, the peak memory of
  one call of each, calibration (each sample averages ``k`` calls so that it lasts at least
  ``--target-ms``), then ``reps`` samples of both, alternated rep by rep in ABBA order. Reported:
  the median candidate time, median candidate / median baseline, and the median of the per-rep
  ratios ("paired"). A cell is re-timed while the machine looks disturbed (samples spread more
  than 1.5x, its baseline 1.2x slower than the problem's fastest so far, or other processes
  using more than 20 % of the CPUs); the attempt with the fastest baseline is kept, NOISY where
  it was still disturbed.
* **Isolation and memory.** On CPU each cell runs in its own forked child, whose glibc malloc
  thresholds are first settled as a long-running process has them (:func:`settle_malloc`); its
  peak memory is the resident-set high-water mark (``VmHWM`` after a ``clear_refs`` reset)
  above the resident set before the call, after ``gc``, ``malloc_trim`` and
  ``bg.release_result_pool()`` (beyondgrad keeps freed results mapped for reuse). On CUDA the cells
  run in the main process and the peak is ``torch.cuda.max_memory_allocated`` above
  ``memory_allocated``. The call's outputs are alive when the peak is read.
* **Peers** (BackPACK, Opacus, curvlinops, PyHessian) are optional: :func:`peer_spec` turns a
  cell whose peer does not import into an "n/a" row with the reason.
* **Environment and output.** Every table states torch version, thread count, device, machine
  and library versions; results go to ``benchmarks/results/<script>_<device>.md`` and a JSON
  file with every sample next to it (``--smoke``: a temporary directory).
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
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from functools import cache, partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

# The package's built-in problems: imported here only (a move of the module is a one-line fix).
import beyondgrad as bg
from beyondgrad.app.tasks import PROBLEMS, Problem, make_problem

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MIB = 1024.0 * 1024.0
SMOKE_BATCH = 4  # batch of every problem under --smoke
REFUSED = "refused (by design)"

# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """Settings shared by every cell of a run."""

    device: str
    reps: int
    threads: int
    warmup: int
    target_s: float
    max_cell_s: float
    cell_timeout_s: float
    only_beyondgrad: bool
    quick: bool
    smoke: bool = False
    batch_size: int | None = None  # None: the problem's own batch
    noise_spread: float = 1.5
    # a cell's baseline this much slower than the problem's fastest so far: disturbed (1.5
    # until 2026-12-06 let a 1.31x slower baseline through, in the linops table of 2026-12-05:
    # PyHessian's cnn Hessian @ V 2218 ms against our 2318 ms read 23.6x against 32.4x)
    base_drift: float = 1.2
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
    """One row of a table: a quantity computed by one library (``setup`` None: n/a)."""

    group: str
    library: str
    setup: Setup | None
    note: str = ""
    peer: bool = True


@dataclass
class Measured:
    """The numbers of one timed cell (times in ms, memory in MiB)."""

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


@dataclass
class Row(Measured):
    """A measured (or skipped) cell of a problem's table; status "ok", "error", "n/a" or
    "refused"."""

    group: str = ""
    library: str = ""
    status: str = "ok"
    note: str = ""
    wall_s: float | None = None

    def record(self, m: Measured) -> None:
        """Copy the measured numbers into the row."""
        for f in fields(Measured):
            setattr(self, f.name, getattr(m, f.name))


class Refused(RuntimeError):
    """beyondgrad's documented refusal of a cell (e.g. an exact quantity with too many
    outputs per sample); the row then reads "refused (by design)"."""


# --------------------------------------------------------------------------------------------
# Problems and parameters
# --------------------------------------------------------------------------------------------


def fresh_problem(name: str, cfg: Config) -> Problem:
    """A new, identically seeded instance of a built-in problem on the run's device."""
    return make_problem(name, batch_size=cfg.batch_size).to(cfg.device)


def copy_problem(p: Problem) -> Problem:
    """A new, identically seeded instance of ``p`` (same batch size, same device)."""
    return make_problem(p.name, batch_size=p.X.shape[0]).to(p.X.device)


def trainable(model: nn.Module) -> list[nn.Parameter]:
    """Trainable parameters in ``named_parameters()`` order (a tied tensor once)."""
    return [q for q in model.parameters() if q.requires_grad]


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


def count_kinds(kinds: list[str], template: str = "{k}: {v}") -> str:
    """``"LayerNorm: 5, Linear: 1"``: how often each name occurs, sorted by name."""
    counts: dict[str, int] = {}
    for k in kinds:
        counts[k] = counts.get(k, 0) + 1
    return ", ".join(template.format(k=k, v=v) for k, v in sorted(counts.items()))


def baseline_setup(p: Problem) -> Candidate:
    """One plain forward and backward pass (the denominator of every ratio)."""
    model, loss_fn, X, y = p.model, p.loss_fn, p.X, p.y

    def call() -> None:
        model.zero_grad(set_to_none=True)
        loss_fn(model(X), y).backward()

    return Candidate(call, reset=lambda: model.zero_grad(set_to_none=True))


BASELINE = CellSpec("baseline", "torch", baseline_setup, "loss.backward(); noise level", False)


def generator(device: str | torch.device, seed: int = 0) -> torch.Generator:
    """A seeded generator on ``device`` (draws on CUDA tensors need a CUDA generator)."""
    return torch.Generator(device=device).manual_seed(seed)


# --------------------------------------------------------------------------------------------
# Peers
# --------------------------------------------------------------------------------------------


@cache
def peer_missing(module: str) -> str | None:
    """None if the peer's module imports, else the reason it does not."""
    try:
        __import__(module)
    except Exception as exc:
        return f"{module} not importable ({type(exc).__name__}: {exc})"
    return None


def peer_spec(group: str, library: str, module: str, setup: Setup, note: str = "") -> CellSpec:
    """A peer's cell, or an "n/a" row with the reason where ``module`` does not import."""
    missing = peer_missing(module)
    return CellSpec(group, library, None if missing else setup, missing or note)


def na(group: str, library: str, reason: str) -> CellSpec:
    """A row that is not run (no such API, or the same call as another row)."""
    return CellSpec(group, library, None, reason)


def backpack_setup(
    extension: str,
    savefield: str,
    kwargs: dict[str, int] | None = None,
    notes: tuple[str, ...] = (),
) -> Setup:
    """A BackPACK extension (``extend`` once in set-up, not timed; ``with backpack(ext)`` and
    the backward pass timed). Parameters left without ``savefield`` are noted as PARTIAL."""

    def setup(p: Problem) -> Candidate:
        import backpack
        import backpack.extensions as ext

        model, loss_fn = backpack.extend(p.model), backpack.extend(p.loss_fn)
        X, y = p.X, p.y
        make_ext = getattr(ext, extension)
        params = list(model.parameters())
        owners = owner_types(model)

        def call() -> None:
            model.zero_grad(set_to_none=True)
            with backpack.backpack(make_ext(**(kwargs or {}))):
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
            detail = count_kinds([owners.get(id(q), "?") for q in missing])
            return [
                f"PARTIAL: {len(missing)}/{len(params)} parameter tensors got no "
                f"'{savefield}' ({detail}); BackPACK only warns"
            ]

        return Candidate(call, reset=reset, inspect=inspect, notes=list(notes))

    return setup


def func_per_sample_fn(p: Problem) -> Callable[[], dict[str, Tensor]]:
    """torch.func ``vmap(grad)`` over ``functional_call``: gradients of each sample's own loss.

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


CURVLINOPS_MODULES = (nn.Linear, nn.Conv2d)


def curvlinops_params(model: nn.Module) -> tuple[list[nn.Parameter], int]:
    """The parameters curvlinops' KFAC supports (owned by Linear/Conv2d; a tied tensor counts
    once), and the number of distinct parameter tensors of the model."""
    seen: set[int] = set()
    params = []
    for module in model.modules():
        if isinstance(module, CURVLINOPS_MODULES):
            for q in module.parameters(recurse=False):
                if id(q) not in seen:
                    seen.add(id(q))
                    params.append(q)
    return params, len(dict(model.named_parameters()))


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------


def _libc() -> Any:
    """glibc (``libc.so.6``), or None where it does not load."""
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


class CpuMemory:
    """Resident-set high-water mark above the level before a call (Linux ``/proc``)."""

    def __init__(self) -> None:
        self._libc: Any = _libc()
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
                "the resident set before the call, after gc + malloc_trim and "
                "bg.release_result_pool()"
            )
        return (
            "FALLBACK: clear_refs reset not permitted; ru_maxrss after the call minus the "
            "resident set before it (an upper bound when the call did not raise the "
            "process's high-water mark)"
        )

    def peak_mib(self, fn: Callable[[], object]) -> float:
        """Peak resident set of one call of ``fn`` above the level before it, in MiB."""
        gc.collect()
        if self._libc is not None:
            self._libc.malloc_trim(0)
        bg.release_result_pool()  # mappings beyondgrad keeps for reuse would hide its peak
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


CUDA_MEMORY = (
    "torch.cuda.max_memory_allocated (after reset_peak_memory_stats) "
    "above torch.cuda.memory_allocated before the call"
)


def cuda_peak_mib(fn: Callable[[], object]) -> float:
    """Peak CUDA memory allocated during ``fn`` above what was allocated before it, in MiB."""
    gc.collect()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del out
    return max(0, peak - before) / MIB


def peak_meter(memory: CpuMemory | None) -> Callable[[Callable[[], object]], float]:
    """The peak-memory function of the run: VmHWM on CPU, the CUDA allocator's peak on GPU."""
    return memory.peak_mib if memory is not None else cuda_peak_mib


def forked_peak_mib(fn: Callable[[], object]) -> float:
    """Peak memory of one call of ``fn``, isolated from this process's history: on CPU in a
    forked child (one torch thread: the parent's OpenMP pool does not survive the fork),
    measured by :class:`CpuMemory` (after gc + ``malloc_trim``, so that heap the parent freed
    but kept does not hide the child's allocations); on an initialized CUDA device
    :func:`cuda_peak_mib` in this process. Used by the peer scripts whose calls are whole
    library workflows (``laplace_peers.py``, ``influence_peers.py``).

    Args:
        fn: the call.

    Returns:
        MiB above the level before the call (``nan`` if the child reported nothing).
    """
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return cuda_peak_mib(fn)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.close(read)
            torch.set_num_threads(1)
            os.write(write, str(CpuMemory().peak_mib(fn)).encode())
        finally:
            os._exit(0)
    os.close(write)
    value = os.read(read, 64).decode()
    os.close(read)
    os.waitpid(pid, 0)
    return float(value) if value else float("nan")


def interleaved_medians(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Median wall seconds per call, the calls alternating rep by rep after one warm-up call
    each (a slow phase of a loaded machine hits every candidate alike).

    Args:
        fns: name -> call.
        reps: timed calls per name.

    Returns:
        name -> median seconds.
    """
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(reps):
        for key, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def sync(device: str) -> None:
    """Wait for the device's queued work (a no-op on CPU)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_sample(fn: Callable[[], object], k: int, device: str) -> float:
    """Seconds per call, averaged over ``k`` back-to-back calls."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(k):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / k


def measured_call(
    fn: Callable[[], Any], device: str, memory: CpuMemory | None
) -> tuple[Any, float, float]:
    """``(result, wall seconds, peak memory MiB)`` of one call of ``fn``."""
    out: dict[str, Any] = {}

    def run() -> None:
        sync(device)
        t0 = time.perf_counter()
        out["result"] = fn()
        sync(device)
        out["s"] = time.perf_counter() - t0

    mib = peak_meter(memory)(run)
    return out["result"], out["s"], mib


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
        """Median baseline sample (seconds per call)."""
        return statistics.median(self.base)

    def disturbances(self, cfg: Config, ref_base_s: float | None) -> list[str]:
        """Why these samples look disturbed (empty: they look fine)."""
        out = []
        if self.spread > cfg.noise_spread:
            out.append(f"samples spread {self.spread:.2g}x (max/min)")
        if ref_base_s is not None and self.base_median > cfg.base_drift * ref_base_s:
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
                fields_ = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields_[3] + (fields_[4] if len(fields_) > 4 else 0)  # idle + iowait
        return (sum(fields_[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own_s() -> float:
        t = os.times()
        return t.user + t.system

    def start(self) -> None:
        """Start observing."""
        self._t0, self._own0 = time.perf_counter(), self._own_s()
        self._busy0 = self._busy_s() or 0.0

    def stop(self) -> float | None:
        """Share of all CPUs other processes used since ``start`` (None: unknown)."""
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


def steadiest(
    base: Callable[[], object],
    cand: Callable[[], object],
    cfg: Config,
    notes: list[str],
    ref_base_s: float | None = None,
) -> Timing:
    """:func:`timed_reps`, re-timed (recalibrating) while the machine looks disturbed; the
    attempt with the fastest baseline is kept (contention only ever slows things down)."""
    attempts = [timed_reps(base, cand, cfg)]
    while attempts[-1].disturbances(cfg, ref_base_s) and len(attempts) <= cfg.noise_retries:
        time.sleep(cfg.retry_wait_s)
        attempts.append(timed_reps(base, cand, cfg))
    best = min(attempts, key=lambda t: t.base_median)
    if len(attempts) > 1:
        notes.append(f"re-timed {len(attempts) - 1}x (disturbed machine)")
    if issues := best.disturbances(cfg, ref_base_s):
        notes.append("NOISY: " + ", ".join(issues))
    if best.reps < cfg.reps:
        notes.append(f"{best.reps} reps (time cap)")
    return best


IGNORED_WARNINGS = (
    "Full backward hook is firing",  # BackPACK's hook on a first layer fed with integer ids
    "does not have an extension for Module",  # BackPACK skips: summarized by the PARTIAL note
    "torch.jit.script` is deprecated",  # raised once by torch.func / curvlinops imports
    "will create a reference cycle",  # PyHessian's backward(create_graph=True)
)


@contextlib.contextmanager
def recorded_warnings() -> Iterator[list[warnings.WarningMessage]]:
    """Record every warning in the block."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught


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


def measure_pair(
    base: Candidate,
    cand: Candidate,
    cfg: Config,
    memory: CpuMemory | None,
    notes: list[str],
    ref_base_s: float | None = None,
) -> Measured:
    """The protocol of one cell: a first call of the candidate (its notes and warnings), warm-up,
    the peak memory of one call of each from a clean state, then the interleaved timing.
    Notes are appended to ``notes``; errors propagate."""
    with recorded_warnings() as caught:
        first = cand.call()
    sync(cfg.device)
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
        base.reset()
        cand.reset()
        peak = peak_meter(memory)
        base_mem = peak(base.call)
        base.reset()
        mem = peak(cand.call)
        cand.reset()
        best = steadiest(base.call, cand.call, cfg, notes, ref_base_s)
    cs, bs = [c * 1e3 for c in best.cand], [b * 1e3 for b in best.base]
    m = Measured(
        time_ms=statistics.median(cs),
        base_ms=statistics.median(bs),
        paired=statistics.median(c / b for c, b in zip(cs, bs)),
        mem_mib=mem,
        base_mem_mib=base_mem,
        mem_ratio=mem / base_mem if base_mem > 0 else None,
        k=best.k_cand,
        k_base=best.k_base,
        reps=best.reps,
        spread=best.spread,
        foreign_load=best.foreign_load,
        samples_ms=cs,
        base_samples_ms=bs,
    )
    m.ratio = m.time_ms / m.base_ms
    return m


# --------------------------------------------------------------------------------------------
# Cells
# --------------------------------------------------------------------------------------------


def short(msg: str, limit: int = 220) -> str:
    """``msg`` on one line, cut to ``limit`` characters."""
    msg = " ".join(msg.split())
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its repr where it has none), shortened."""
    return short(str(exc).splitlines()[0] if str(exc) else repr(exc))


def measure_cell(
    problem: str,
    spec: CellSpec,
    cfg: Config,
    memory: CpuMemory | None,
    ref_base_s: float | None = None,
) -> Row:
    """Set up one cell on fresh copies of the problem (one for the candidate, one for the
    baseline: hooks one library leaves cannot slow down the other) and measure it.

    ``ref_base_s``: the fastest baseline median seen so far on this problem; a cell whose own
    baseline is much slower ran on a disturbed machine and is re-timed."""
    assert spec.setup is not None
    row = Row(group=spec.group, library=spec.library)
    notes: list[str] = [spec.note] if spec.note else []
    try:
        base = baseline_setup(fresh_problem(problem, cfg))
        cand = spec.setup(fresh_problem(problem, cfg))
        notes += cand.notes
        row.record(measure_pair(base, cand, cfg, memory, notes, ref_base_s))
    except Exception as exc:
        row.status = "error"
        row.note = "; ".join([f"error: {type(exc).__name__}: {short(str(exc))}", *notes])
        return row
    row.note = "; ".join(notes)
    return row


#: bytes of the block :func:`settle_malloc` maps and frees: just under glibc's 32 MiB ceiling for
#: its dynamic mmap threshold (a freed mapping larger than that does not raise it)
SETTLE_BYTES = 31 << 20


def settle_malloc() -> None:
    """Advance glibc's adaptive malloc thresholds to where a long-running PyTorch process has
    them: map and free one block of :data:`SETTLE_BYTES` (untouched, so no page is faulted),
    which raises the mmap threshold to it and the heap-trim threshold to twice that.

    Without it, a cell's child inherits whatever its parent's history left, and calls whose
    blocks sit just above that threshold map, fault in and unmap their memory on every call
    while others do not: e.g. the mlp's KFAC factors (5.1 MiB freed at once, the largest 2.5
    MiB) against a plain forward+backward whose largest freed block was 1.6 MiB. glibc only
    (elsewhere a no-op); baseline and candidates of a cell share the settled state."""
    if os.environ.get("BEYONDGRAD_BENCH_UNSETTLED"):  # the former behaviour, for A/B runs
        return
    lib = _libc()
    if lib is None or not hasattr(lib, "malloc"):
        return
    lib.malloc.restype = ctypes.c_void_p
    lib.free.argtypes = [ctypes.c_void_p]
    block = lib.malloc(SETTLE_BYTES)
    if block:
        lib.free(block)


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
            settle_malloc()
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


def log(msg: str) -> None:
    """Progress on stderr (the tables go to files)."""
    print(msg, file=sys.stderr, flush=True)


def _mark_refusal(row: Row, spec: CellSpec) -> None:
    marker = f"error: {Refused.__name__}: "
    if row.status == "error" and marker in row.note:
        row.status = "refused"
        row.note = f"{spec.note}; {REFUSED}: {row.note.split(marker, 1)[1][:160]}"


def run_cells(
    problem: str,
    specs: list[CellSpec],
    cfg: Config,
    memory: CpuMemory | None,
    groups: dict[str, str],
    cfg_for: Callable[[CellSpec], Config] | None = None,
) -> list[Row]:
    """Every cell of one problem, in order, each isolated (:func:`run_isolated`); rows that are
    not run read "n/a", beyondgrad's refusals "refused (by design)". ``cfg_for``: a cell's own
    settings (default: ``cfg``)."""
    rows: list[Row] = []
    for spec in specs:
        if spec.setup is None:
            rows.append(Row(group=spec.group, library=spec.library, status="n/a", note=spec.note))
            continue
        tc = time.perf_counter()
        ref = min((r.base_ms for r in rows if r.base_ms is not None), default=None)
        cell_cfg = cfg_for(spec) if cfg_for is not None else cfg
        job = partial(measure_cell, problem, spec, cell_cfg, memory, ref / 1e3 if ref else None)
        try:
            row = run_isolated(job, cfg.cell_timeout_s, cfg.isolate)
        except Exception as exc:
            row = Row(group=spec.group, library=spec.library, status="error")
            row.note = f"error: {first_line(exc)}"
        _mark_refusal(row, spec)
        row.wall_s = time.perf_counter() - tc
        rows.append(row)
        label = f"[{problem}] {groups[spec.group]} / {spec.library}"
        if row.status == "ok":
            log(
                f"{label}: {row.time_ms:.3g} ms, x{row.ratio:.3g} (paired x{row.paired:.3g}), "
                f"mem {row.mem_mib:.3g} MiB  [{row.wall_s:.0f} s]"
            )
        else:
            log(f"{label}: {row.note[:200]}")
    return rows


#: a beyondgrad cell within this factor of the fastest peer's (either way) is timed once more
#: head to head with that peer (:func:`head_to_heads`)
CLOSE_CALL = 1.3


def head_to_head(problem: str, ours: CellSpec, peer: CellSpec, cfg: Config) -> dict[str, Any]:
    """beyondgrad's call against a peer's, each set up on a fresh copy of the problem in one
    process, warmed up, then timed alternately (:func:`timed_reps`, ABBA): the ratio of the
    median times (ours / the peer's) and the median of the per-rep ratios. Each cell's own
    ratio divides by a baseline timed at another moment; this one needs no baseline."""
    assert ours.setup is not None and peer.setup is not None
    theirs = peer.setup(fresh_problem(problem, cfg))
    mine = ours.setup(fresh_problem(problem, cfg))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(max(1, cfg.warmup)):
            theirs.call()
            mine.call()
        t = timed_reps(theirs.call, mine.call, cfg)
    return {
        "ours": ours.library,
        "peer": peer.library,
        "ratio": statistics.median(t.cand) / statistics.median(t.base),
        "paired": statistics.median(c / b for c, b in zip(t.cand, t.base)),
        "reps": t.reps,
    }


def head_to_heads(
    problem: str,
    specs: list[CellSpec],
    rows: list[Row],
    cfg: Config,
    exclude: tuple[str, ...] = (),
) -> dict[str, dict[str, Any]]:
    """Per group where beyondgrad's fastest row and the fastest peer row are within
    :data:`CLOSE_CALL` of each other: the two timed head to head (:func:`head_to_head`, in a
    child of its own); ``{"error": ...}`` where that failed. ``specs`` and ``rows`` are
    :func:`run_cells`' input and output (same order); libraries in ``exclude`` are not
    candidates for the peer (as in :func:`summary_table`)."""
    out: dict[str, dict[str, Any]] = {}
    for group in dict.fromkeys(spec.group for spec in specs):
        ok = [(s, r) for s, r in zip(specs, rows) if s.group == group and r.status == "ok"]
        mine = [(s, r) for s, r in ok if is_ours(s.library)]
        theirs = [
            (s, r) for s, r in ok if not is_ours(s.library) and s.library not in (*exclude, "torch")
        ]
        if not mine or not theirs:
            continue
        (ours, r_ours), (peer, r_peer) = (
            min(x, key=lambda sr: sr[1].ratio) for x in (mine, theirs)
        )
        if not 1 / CLOSE_CALL <= r_ours.ratio / r_peer.ratio <= CLOSE_CALL:
            continue
        job = partial(head_to_head, problem, ours, peer, cfg)
        try:
            out[group] = run_isolated(job, cfg.cell_timeout_s, cfg.isolate)
        except Exception as exc:
            out[group] = {"error": first_line(exc)}
        log(f"[{problem}] {group} head to head: {out[group]}")
    return out


def run_problem(
    problem: str,
    specs: list[CellSpec],
    agreement: Callable[[], dict[str, Any]],
    cfg: Config,
    memory: CpuMemory | None,
    groups: dict[str, str],
) -> dict[str, Any]:
    """Every cell of one problem, then its agreement checks (in a child of their own)."""
    t0 = time.perf_counter()
    rows = run_cells(problem, specs, cfg, memory, groups)
    return {
        "problem": problem,
        "rows": [asdict(r) for r in rows],
        "head_to_head": head_to_heads(problem, specs, rows, cfg),
        "agreement": run_agreement(problem, agreement, cfg),
        "wall_s": time.perf_counter() - t0,
    }


# --------------------------------------------------------------------------------------------
# Agreement checks
# --------------------------------------------------------------------------------------------


@dataclass
class Check:
    """One agreement check: ``value`` against ``reference`` over some parameter tensors.
    ``library``/``groups``: the table rows it concerns (flagged DISAGREES on mismatch)."""

    name: str
    library: str
    groups: list[str]
    status: str = "ok"
    max_abs: float | None = None
    rel: float | None = None
    detail: str = ""
    mismatch: list[str] = field(default_factory=list)


TensorDict = dict[str, Tensor]


def rel_error(value: Tensor, ref: Tensor) -> float:
    """Max abs difference over max abs reference value (float64; inf on a shape mismatch)."""
    if value.shape != ref.shape:
        return math.inf
    v, r = value.detach().double(), ref.detach().double()
    d, m = float((v - r).abs().max()), float(r.abs().max())
    return d / m if m > 0 else (0.0 if d == 0 else math.inf)


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
        per[n] = rel_error(x, r)
        max_abs, max_ref = (
            max(max_abs, float((x - r).abs().max())),
            max(max_ref, float(r.abs().max())),
        )
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


class Checks:
    """Collects agreement checks; a check whose body raises is recorded as an error (or as
    "refused" for :class:`Refused`). ``annotate``: extra detail for mismatching tensors."""

    def __init__(self, annotate: Callable[[list[str]], str] | None = None):
        self.items: list[Check] = []
        self.annotate = annotate

    def attempt(self, check: Check, body: Callable[[Check], Check]) -> None:
        """Run ``body(check)`` and record the check, whatever happens."""
        try:
            check = body(check)
        except Refused as exc:
            check.status = "refused"
            check.detail = short(str(exc))
        except Exception as exc:
            check.status = "error"
            check.detail = f"error: {type(exc).__name__}: {short(str(exc))}"
        if check.mismatch and self.annotate is not None:
            check.detail += f" (mismatching tensors belong to {self.annotate(check.mismatch)})"
        self.items.append(check)

    def compare(
        self,
        check: Check,
        value: TensorDict | Callable[[], TensorDict],
        ref: TensorDict | Callable[[], TensorDict],
        tol: float,
        n_total: int,
        extra: str = "",
        flag: bool = True,
    ) -> None:
        """:meth:`attempt` of :func:`fill_check`; ``value``/``ref`` may be computed lazily
        (zero-argument callables), so that an error is recorded in the check."""

        def body(c: Check) -> Check:
            a = value() if callable(value) else value
            b = ref() if callable(ref) else ref
            return fill_check(c, a, b, tol, n_total, extra, flag)

        self.attempt(check, body)

    def result(self, info: dict[str, Any]) -> dict[str, Any]:
        """The agreement record of a problem: its facts and every check."""
        return {"info": info, "checks": [asdict(c) for c in self.items]}


def run_agreement(problem: str, fn: Callable[[], dict[str, Any]], cfg: Config) -> dict[str, Any]:
    """Run a problem's agreement checks in a child of their own; an error is recorded."""
    try:
        agree = run_isolated(fn, cfg.cell_timeout_s, cfg.isolate)
    except Exception as exc:
        agree = {"info": {}, "checks": [], "error": first_line(exc)}
    for c in agree.get("checks", []):
        log(f"[{problem}] check {c['name']}: rel {c['rel']} {c['detail'][:200]}")
    return agree


# --------------------------------------------------------------------------------------------
# Environment
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


def git_revision() -> str | None:
    """The checkout's commit (``+dirty src`` with uncommitted changes), or None outside git."""
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "src"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return None
    return (rev + ("+dirty src" if dirty else "")) or None


ISOLATION = {
    True: "each cell in its own forked child process",
    False: "all cells in one process, one after the other",
}


def environment(
    cfg: Config, memory: CpuMemory | None, argv: list[str] | None, packages: tuple[str, ...]
) -> dict[str, Any]:
    """What every table header and JSON file records: date, command, machine, torch version,
    threads, device, library versions, commit and the protocol's settings."""
    machine = f"{cpu_model()}, {os.cpu_count()} logical CPUs"
    if cfg.device != "cpu":
        machine = f"{torch.cuda.get_device_name()} (host: {machine})"
    return {
        "date": _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv or sys.argv[1:])]),
        "device": cfg.device,
        "machine": machine,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "versions": {pkg: version(pkg) for pkg in packages[: 1 if cfg.only_beyondgrad else None]},
        "git": git_revision(),
        "reps": cfg.reps,
        "warmup": cfg.warmup,
        "target_ms": cfg.target_s * 1e3,
        "max_cell_s": cfg.max_cell_s,
        "tol": cfg.tol,
        "noise_spread": cfg.noise_spread,
        "base_drift": cfg.base_drift,
        "noise_retries": cfg.noise_retries,
        "max_foreign_load": cfg.max_foreign_load,
        "quick": cfg.quick,
        "smoke": cfg.smoke,
        "only_beyondgrad": cfg.only_beyondgrad,
        "memory_method": memory.method() if memory is not None else CUDA_MEMORY,
        "isolation": ISOLATION[cfg.isolate],
    }


# --------------------------------------------------------------------------------------------
# Command line and output
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Script:
    """What a benchmark script declares about its run; the rest is shared.

    ``name``: results go to ``results/<name>_<device>.md`` (and ``.json``). ``packages``: the
    distributions whose versions the header lists (beyondgrad first). ``peers``: help text of
    ``--only-beyondgrad`` (None: no such option). ``max_cell_s``: the per-cell timing budget
    on CPU and on CUDA.
    """

    name: str
    doc: str
    packages: tuple[str, ...] = ("beyondgrad", "numpy")
    problems: tuple[str, ...] | None = PROBLEMS
    peers: str | None = None
    reps: int = 7
    max_cell_s: tuple[float, float] = (25.0, 10.0)
    cell_timeout_s: float = 600.0

    def parser(self) -> argparse.ArgumentParser:
        """The shared options; a script adds its own to the returned parser."""
        ap = argparse.ArgumentParser(
            description=self.doc.split("\n\n")[0],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if self.problems is not None:
            ap.add_argument(
                "--problems",
                nargs="+",
                default=None,
                choices=PROBLEMS,
                help=f"built-in problems (default {' '.join(self.problems)}; --smoke: mlp)",
            )
        ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
        ap.add_argument("--reps", type=int, default=self.reps, help="timed samples per cell")
        ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
        ap.add_argument(
            "--out",
            type=Path,
            default=None,
            help=f"markdown output (default benchmarks/results/{self.name}_{{device}}.md); "
            "the JSON goes next to it",
        )
        ap.add_argument(
            "--quick", action="store_true", help="short run: 2 reps, 1 warm-up, short samples"
        )
        ap.add_argument(
            "--smoke",
            action="store_true",
            help=f"does it run: batch {SMOKE_BATCH}, 1 rep, tiny sizes, output to a temporary "
            "directory (unless --out); the numbers mean nothing",
        )
        if self.peers is not None:
            ap.add_argument("--only-beyondgrad", action="store_true", help=self.peers)
        ap.add_argument(
            "--target-ms", type=float, default=None, help="minimum sample length (50 CPU / 20 CUDA)"
        )
        cpu_s, cuda_s = self.max_cell_s
        ap.add_argument(
            "--max-cell-s",
            type=float,
            default=None,
            help=f"per-cell timing budget before reps are cut ({cpu_s:g} CPU / {cuda_s:g} CUDA)",
        )
        return ap

    def configure(self, args: argparse.Namespace) -> tuple[Config, CpuMemory | None]:
        """The run's :class:`Config` from the shared options; sets torch's threads."""
        cpu = args.device == "cpu"
        q = args.quick
        cfg = Config(
            device=args.device,
            reps=2 if q else args.reps,
            threads=args.threads,
            warmup=1 if q else 3,
            target_s=(args.target_ms or (20.0 if q or not cpu else 50.0)) / 1e3,
            max_cell_s=args.max_cell_s or self.max_cell_s[0 if cpu else 1],
            cell_timeout_s=self.cell_timeout_s,
            only_beyondgrad=getattr(args, "only_beyondgrad", False),
            quick=q,
        )
        if args.smoke:
            cfg = replace(
                cfg,
                reps=1,
                threads=1,  # on a busy machine 2 OpenMP threads can wait on each other
                warmup=1,
                target_s=0.0,
                max_cell_s=1.0,
                cell_timeout_s=120.0,
                smoke=True,
                batch_size=SMOKE_BATCH,
                noise_retries=0,
            )
        torch.set_num_threads(cfg.threads)
        with contextlib.suppress(RuntimeError):
            torch.set_num_interop_threads(cfg.threads)
        return cfg, (CpuMemory() if cpu else None)

    def output(self, args: argparse.Namespace) -> Path:
        """Where the markdown goes (the JSON next to it)."""
        if args.out is not None:
            return args.out
        name = f"{self.name}_{args.device}.md"
        if args.smoke:
            return Path(tempfile.mkdtemp(prefix=f"bench-{self.name}-")) / name
        return RESULTS_DIR / name

    def start(
        self, args: argparse.Namespace, argv: list[str] | None
    ) -> tuple[Config, CpuMemory | None, dict[str, Any]]:
        """Check the device, configure, and describe the environment (exits 2 without CUDA)."""
        if args.device == "cuda" and not torch.cuda.is_available():
            log("--device cuda: CUDA is not available")
            raise SystemExit(2)
        if self.problems is not None and not args.problems:
            args.problems = ["mlp"] if args.smoke else list(self.problems)
        cfg, memory = self.configure(args)
        gc.collect()
        gc.freeze()  # the imported modules are never garbage: every later gc.collect skips them
        return cfg, memory, environment(cfg, memory, argv, self.packages)


def timed_runs(meta: dict[str, Any], jobs: list[Callable[[], Any]]) -> list[Any]:
    """Run the jobs in order; their total wall time goes into ``meta["wall_s"]``."""
    t0 = time.perf_counter()
    out = [job() for job in jobs]
    meta["wall_s"] = time.perf_counter() - t0
    return out


def problems_main(
    script: Script,
    argv: list[str] | None,
    run_problem: Callable[[str, Config, CpuMemory | None], dict[str, Any]],
    render: Callable[[dict[str, Any], list[dict[str, Any]]], str],
) -> int:
    """The whole run of a script whose tables are one per problem: options, environment,
    ``run_problem`` for each problem, then the JSON and the markdown."""
    args = script.parser().parse_args(argv)
    cfg, memory, meta = script.start(args, argv)
    out = script.output(args)
    results = timed_runs(meta, [partial(run_problem, p, cfg, memory) for p in args.problems])
    write_results(out, {"meta": meta, "results": results}, lambda: render(meta, results))
    return 0


def write_results(out: Path, payload: Any, markdown: Callable[[], str]) -> None:
    """Write the JSON (first: it survives a failing render) and the markdown next to it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1))
    out.write_text(markdown())
    log(f"wrote {out} and {out.with_suffix('.json').name}")


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


def fmt(x: float | None, digits: int = 3) -> str:
    """Compact number: 3 significant digits, thousands separated."""
    if x is None:
        return ""
    if x != x or math.isinf(x):
        return str(x)
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def escape(text: str) -> str:
    """Text for a markdown table cell."""
    return text.replace("|", "\\|")


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


def header_lines(meta: dict[str, Any], title: str, torch_extra: str = "") -> list[str]:
    """Title, command, machine, torch version / device / threads and library versions."""
    lines = [
        f"# {title} ({meta['device']})",
        "",
        f"*Generated {meta['date']} by `{meta['command']}`.*",
        "",
        f"* **Machine**: {meta['machine']}; Python {meta['python']}.",
        f"* **torch {meta['torch']}**, device `{meta['device']}`, torch threads "
        f"{meta['threads']} (interop {meta['interop_threads']}){torch_extra}.",
    ]
    if meta.get("versions"):
        lines.append(
            "* **Libraries**: "
            + ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
            + (f" (beyondgrad at commit {meta['git']})" if meta.get("git") else "")
            + "."
        )
    return lines


def protocol_lines(
    meta: dict[str, Any],
    base: str = "baseline",
    ratio: str = "x fwd+bwd",
    inputs: str = "its own copies of the problem (one for the candidate, one for the baseline)",
) -> list[str]:
    """The timing, memory and isolation bullets of a header (the protocol of this module)."""
    spread = meta.get("noise_spread", 1.5)
    drift = meta.get("base_drift", spread)
    return [
        f"* **Timing** (`benchmarks/harness.py`): {meta['warmup']} warm-up call(s); each sample "
        f"averages k calls so that it lasts >= {meta['target_ms']:g} ms; {meta['reps']} samples "
        f"of the {base} and of the candidate (fewer, but at least {min(3, meta['reps'])}, where "
        f"a cell's timing would exceed {meta['max_cell_s']:g} s), alternated rep by rep (order "
        f"swapped every other rep). *time*: median of the candidate's samples. *{ratio}*: its "
        f"median / the {base}'s median, the {base} re-measured in the same process. *paired x*: "
        f"median of the per-rep ratios. A cell is re-timed (recalibrated) up to "
        f"{meta.get('noise_retries', 2)} more times while the machine looks disturbed: samples "
        f"spread more than {spread:g}x (max/min), its {base} median {drift:g}x slower than the "
        f"problem's fastest so far, or other processes using more than "
        f"{meta.get('max_foreign_load', 0.2):.0%} of the CPUs (CPU only). The attempt with the "
        f"fastest {base} is kept; NOISY says it was still disturbed.",
        f"* **Memory**: {meta['memory_method']}; one call of each, after warm-up, from a clean "
        "state (results of earlier calls dropped); the outputs are alive when the peak is "
        f"read. *mem {ratio}*: over the {base}'s peak in the same process.",
        f"* **Isolation**: {meta.get('isolation', ISOLATION[meta['device'] == 'cpu'])}. "
        f"Each cell builds {inputs}.",
    ]


def ratio_cell(row: dict[str, Any], with_mem: bool) -> str:
    """A summary cell: ``ratio`` (``ratio (mem ratio) [NOISY]`` with memory), else the status."""
    if row["status"] != "ok":
        return row["status"]
    if not with_mem:
        return fmt(row["ratio"])
    noisy = " NOISY" if "NOISY" in row["note"] else ""
    return f"{fmt(row['ratio'])} ({fmt(row['mem_ratio'])}){noisy}"


def is_ours(library: str) -> bool:
    """Whether a row's library is beyondgrad (``"beyondgrad"`` or a labelled variant of it,
    e.g. ``"beyondgrad (per-parameter)"``)."""
    return library == "beyondgrad" or library.startswith("beyondgrad (")


def _ours_cell(res: dict[str, Any], group: str, with_mem: bool) -> str:
    """beyondgrad's summary cell: its plain row, or the fastest of its rows where it has
    variants (the variant named, e.g. ``2.1 (per-parameter)``)."""
    rows = [x for x in res["rows"] if x["group"] == group and is_ours(x["library"])]
    if not rows:
        return ""
    ok = [x for x in rows if x["status"] == "ok"]
    best = min(ok, key=lambda x: x["ratio"]) if ok else rows[0]
    cell = ratio_cell(best, with_mem)
    variant = best["library"][len("beyondgrad (") : -1] if best["library"] != "beyondgrad" else ""
    cell = f"{cell} ({variant})" if variant else cell
    duel = res.get("head_to_head", {}).get(group, {})
    return f"{cell} [{fmt(duel['ratio'])}x]" if "ratio" in duel else cell


def _best_peer_cell(
    res: dict[str, Any], group: str, with_mem: bool, exclude: tuple[str, ...]
) -> str:
    rows = [x for x in res["rows"] if x["group"] == group]
    peers = [
        x
        for x in rows
        if x["status"] == "ok" and not is_ours(x["library"]) and x["library"] not in exclude
    ]
    if not peers:
        failed = sorted({x["library"] for x in rows if x["status"] == "error"})
        return "- (" + ", ".join(failed) + " failed)" if failed else "-"
    best = min(peers, key=lambda x: x["ratio"])
    checks = res.get("agreement", {}).get("checks", [])
    marks = [
        m
        for m, bad in (
            ("partial", "PARTIAL" in best["note"]),
            ("disagrees", bool(flags_for(best, checks))),
            ("different matrix", "DIFFERENT MATRIX" in best["note"]),
        )
        if bad
    ]
    cell = f"{ratio_cell(best, with_mem)} {best['library']}"
    if not marks:
        return cell
    return cell + (f", {', '.join(marks)}" if with_mem else f" ({', '.join(marks)})")


def summary_table(
    results: list[dict[str, Any]],
    groups: dict[str, str],
    title: str,
    intro: str,
    with_mem: bool = True,
    exclude: tuple[str, ...] = (),
) -> list[str]:
    """beyondgrad's ratio per quantity and problem, next to the fastest peer row that ran
    (libraries in ``exclude`` are not candidates for the best peer)."""
    results = [r for r in results if "rows" in r]
    if not results:
        return []
    if any("ratio" in d for r in results for d in r.get("head_to_head", {}).values()):
        intro += (
            f" [r x] after beyondgrad's cell (where it is within {CLOSE_CALL}x of the best "
            "peer's either way): beyondgrad's time over that peer's, the two timed alternately "
            "in one process (no baseline in between; below 1: beyondgrad is faster)."
        )
    head = " | ".join(f"{r['problem']}: beyondgrad | {r['problem']}: best peer" for r in results)
    lines = [f"## {title}", "", intro, "", f"| quantity | {head} |"]
    lines.append("|---|" + "---:|---|" * len(results))
    for group, label in groups.items():
        if group == "baseline":
            continue
        cells = []
        for r in results:
            cells.append(_ours_cell(r, group, with_mem))
            cells.append(_best_peer_cell(r, group, with_mem, exclude))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def problem_intro(res: dict[str, Any], info: dict[str, Any], base_mem: bool = True) -> list[str]:
    """The problem's facts (batch, parameters, tied weights) and its baseline's numbers."""
    lines = []
    if info:
        tied = info.get("tied") or {}
        tied_s = (
            f"; tied weights: {', '.join(tied)} (one tensor used by {max(tied.values())} modules)"
            if tied
            else ""
        )
        lines.append(
            f"Batch {info['batch']}, {info['num_params']:,} parameters in "
            f"{info['param_tensors']} tensors{tied_s}."
        )
    base = [r for r in res["rows"] if r["status"] == "ok" and r["base_ms"] is not None]
    if base:
        ms = [r["base_ms"] for r in base]
        mem = [r["base_mem_mib"] for r in base if r["base_mem_mib"] is not None]
        mem_s = (
            f", peak memory {fmt(statistics.median(mem)) if mem else '?'} MiB" if base_mem else ""
        )
        lines.append(
            f"Baseline fwd+bwd: **{fmt(statistics.median(ms))} ms** (median over the cells' "
            f"processes, range {fmt(min(ms))}-{fmt(max(ms))} ms){mem_s}. "
            f"Wall time {res['wall_s']:.0f} s{'' if base_mem else ' (all sections)'}."
        )
    return lines


def rows_table(
    rows: list[dict[str, Any]],
    checks: list[dict[str, Any]],
    groups: dict[str, str],
    ratio_head: str = "x fwd+bwd",
) -> list[str]:
    """One problem's table: a row per cell, its agreement flags in the notes."""
    lines = [
        f"| quantity | library | time [ms] | {ratio_head} | paired x | peak mem [MiB] | "
        "mem x fwd+bwd | notes |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        note = escape("; ".join(x for x in [r["note"], *flags_for(r, checks)] if x))
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
            f"| {groups[r['group']]} | {r['library']} | " + " | ".join(cols) + f" | {note} |"
        )
    return lines


def agreement_table(
    problem: str, agree: dict[str, Any], tol: float, intro: str, extra: list[str] = ()
) -> list[str]:
    """The agreement checks of one problem (``extra``: rows before the checks)."""
    lines = [
        "",
        f"### Agreement ({problem}, float32, flagged above rel {tol:g})",
        "",
        intro,
        "",
        "| check | max abs diff | relative | detail |",
        "|---|---:|---:|---|",
        *extra,
    ]
    if "error" in agree:
        lines.append(f"| agreement run | error | | {agree['error']} |")
    for c in agree.get("checks", []):
        detail = escape(c["detail"])
        if c["status"] != "ok":
            lines.append(f"| {c['name']} | {c['status']} | | {detail} |")
        else:
            mx = f"{c['max_abs']:.3g}" if c["max_abs"] is not None else ""
            lines.append(f"| {c['name']} | {mx} | {c['rel']:.3g} | {detail} |")
    return [*lines, ""]
