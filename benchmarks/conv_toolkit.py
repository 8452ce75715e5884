"""Benchmark the convolution toolkit: N-d ``unfold`` (im2col) and the KFAC-reduce input factor.

One command regenerates ``benchmarks/results/conv_toolkit_{device}.md`` and a JSON file with the
raw numbers next to it::

    python benchmarks/conv_toolkit.py                  # CPU, every case
    python benchmarks/conv_toolkit.py --device cuda    # GPU
    python benchmarks/conv_toolkit.py --quick --cases 1d   # smoke test

What is compared (float32, realistic layer shapes; see ``CASES``):

* ``unfold``: ``beyondgrad.conv.unfold`` (strided views) and the index-pattern einsum
  (``beyondgrad.conv.einsum.unfold_expression``) against ``torch.nn.functional.unfold`` in 2-d,
  and against the one-hot convolution in 1-d and 3-d: a grouped convolution of ``x`` with the
  kernel ``eye(prod(K)).reshape(prod(K), 1, *K)`` repeated ``C`` times (``groups=C``), reshaped
  to ``[N, C * prod(K), prod(O)]``. Its kernel is built inside the timed call.
* ``kfac_reduce``: ``beyondgrad.conv.einsum.kfac_reduce`` (index patterns, the unfolded input
  is never formed) against "unfold, then average": ``U = unfold(x)``, ``u = U.mean(-1)``, then
  ``u_g^T u_g`` per group, with the reference unfold above. Also timed: ``kfac_reduce`` with
  torch's ``opt_einsum`` path optimization switched off (what a user without the ``opt-einsum``
  package gets), and ``beyondgrad.conv.unfold`` followed by the same averaging.

The measurement protocol is the one of ``first_order.py`` (its helpers are imported): each cell
(one case, one candidate) runs in a forked child on CPU; warm-up; the peak memory of one call of
the reference and of the candidate; calibrated samples of both, alternated rep by rep (ABBA);
re-timing while the machine looks disturbed. Every cell also checks that the candidate's result
equals the reference's.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))

from beyondgrad.conv import conv_output_size
from beyondgrad.conv import einsum as conv_einsum
from beyondgrad.conv import unfold as bg_unfold
from first_order import (
    Config,
    CpuMemory,
    _short,
    _sync,
    cpu_model,
    cuda_peak_mib,
    fmt,
    run_isolated,
    timed_reps,
    version,
)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MIB = 1024.0 * 1024.0

# --------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One convolution layer's input and hyper-parameters (same value in every dimension)."""

    layer: str
    N: int
    C: int
    size: tuple[int, ...]
    kernel: int
    padding: int = 0
    stride: int = 1
    dilation: int = 1
    groups: int = 1

    @property
    def d(self) -> int:
        return len(self.size)

    @property
    def name(self) -> str:
        hyper = f"k{self.kernel}"
        hyper += f" p{self.padding}" if self.padding else ""
        hyper += f" s{self.stride}" if self.stride > 1 else ""
        hyper += f" d{self.dilation}" if self.dilation > 1 else ""
        hyper += f" g{self.groups}" if self.groups > 1 else ""
        spatial = "x".join(str(s) for s in self.size)
        return f"{self.d}d N{self.N} C{self.C} {spatial} {hyper}"

    @property
    def out_size(self) -> tuple[int, ...]:
        return tuple(
            conv_output_size(i, self.kernel, self.stride, self.padding, self.dilation)
            for i in self.size
        )

    @property
    def taps(self) -> int:
        return self.kernel**self.d

    def unfolded_mib(self, itemsize: int = 4) -> float:
        """Size of the unfolded input ``[N, C * prod(K), prod(O)]``."""
        return self.N * self.C * self.taps * math.prod(self.out_size) * itemsize / MIB

    def factor_mib(self, itemsize: int = 4) -> float:
        """Size of the KFAC factor ``[G, C/G * prod(K), C/G * prod(K)]``."""
        side = self.C // self.groups * self.taps
        return self.groups * side * side * itemsize / MIB

    def input(self, device: str) -> Tensor:
        gen = torch.Generator().manual_seed(0)
        return torch.randn(self.N, self.C, *self.size, generator=gen).to(device)


CASES: list[Case] = [
    Case("conv", 32, 96, (32, 32), 3, padding=1),
    Case("conv", 32, 128, (16, 16), 5, padding=2),
    Case("dilated conv", 32, 32, (32, 32), 3, dilation=2),
    Case("strided conv", 32, 64, (32, 32), 3, stride=2),
    Case("3C3D conv1", 64, 3, (32, 32), 5),
    Case("3C3D conv2", 64, 64, (15, 15), 3),
    Case("3C3D conv3", 64, 96, (7, 7), 3, padding=1),
    Case("conv", 32, 64, (1024,), 5, padding=2),
    Case("strided conv", 32, 128, (256,), 3, stride=2),
    Case("conv", 8, 16, (16, 16, 16), 3, padding=1),
    Case("conv", 8, 32, (8, 8, 8), 3),
]
GROUPED_CASES: list[Case] = [Case("grouped conv", 32, 128, (16, 16), 3, padding=1, groups=4)]

# --------------------------------------------------------------------------------------------
# References and candidates
# --------------------------------------------------------------------------------------------

Call = Callable[[], Tensor]


def onehot_unfold(x: Tensor, kernel_size: int, dilation: int, padding: int, stride: int) -> Tensor:
    """im2col by a grouped convolution with a one-hot kernel (layout of ``F.unfold``).

    Output channel ``c * prod(K) + t`` of the convolution copies input channel ``c`` at kernel
    tap ``t`` (row-major over the kernel dimensions), which is row ``c * prod(K) + t`` of
    ``F.unfold``'s result.
    """
    d = x.ndim - 2
    N, C = x.shape[:2]
    kernel = (kernel_size,) * d
    taps = math.prod(kernel)
    one_hot = torch.eye(taps, dtype=x.dtype, device=x.device).reshape(taps, 1, *kernel)
    weight = one_hot.repeat(C, *(1,) * (d + 1))
    conv = (F.conv1d, F.conv2d, F.conv3d)[d - 1]
    y = conv(x, weight, stride=stride, padding=padding, dilation=dilation, groups=C)
    return y.reshape(N, C * taps, -1)


def reference_unfold(case: Case) -> tuple[str, Callable[[Tensor], Tensor]]:
    """The reference im2col of a case: ``F.unfold`` in 2-d, the one-hot convolution otherwise."""
    hyper = (case.kernel, case.dilation, case.padding, case.stride)
    if case.d == 2:
        return "F.unfold", lambda x: F.unfold(x, *hyper)
    return f"one-hot conv{case.d}d", lambda x: onehot_unfold(x, *hyper)


def average_gram(U: Tensor, groups: int) -> Tensor:
    """``sum_n u_n u_n^T`` per group with ``u = U.mean(-1)``: ``[G, D/G, D/G]``."""
    N = U.shape[0]
    u = U.mean(-1).reshape(N, groups, -1).transpose(0, 1)  # [G, N, D/G]
    return u.transpose(1, 2) @ u


def opt_einsum_state() -> str:
    """How ``torch.einsum`` orders contractions here."""
    oe = torch.backends.opt_einsum
    if oe.is_available() and oe.enabled:
        return f"opt_einsum path optimization (strategy {oe.strategy!r})"
    if oe.is_available():
        return "left to right (opt_einsum installed but disabled)"
    return "left to right (the opt-einsum package is not installed)"


@dataclass(frozen=True)
class Method:
    """A candidate row: ``build(case, x)`` returns the timed call."""

    key: str
    label: str
    build: Callable[[Case, Tensor], Call]
    note: str = ""
    only_if: Callable[[], bool] = lambda: True


def _bg_unfold(case: Case, x: Tensor) -> Call:
    return lambda: bg_unfold(x, case.kernel, case.dilation, case.padding, case.stride)


def _einsum_unfold(case: Case, x: Tensor) -> Call:
    def call() -> Tensor:
        expr = conv_einsum.unfold_expression(
            x, case.kernel, stride=case.stride, padding=case.padding, dilation=case.dilation
        )
        return expr()

    return call


def _kfac_reduce(case: Case, x: Tensor, opt_einsum: bool = True) -> Call:
    def call() -> Tensor:
        return conv_einsum.kfac_reduce(
            x,
            case.kernel,
            stride=case.stride,
            padding=case.padding,
            dilation=case.dilation,
            groups=case.groups,
        )

    if opt_einsum:
        return call

    def call_without() -> Tensor:
        with torch.backends.opt_einsum.flags(enabled=False):
            return call()

    return call_without


def _bg_unfold_average(case: Case, x: Tensor) -> Call:
    unfold = _bg_unfold(case, x)
    return lambda: average_gram(unfold(), case.groups)


def reference(op: str, case: Case, x: Tensor) -> tuple[str, Call]:
    """Label and call of a cell's reference."""
    name, unfold = reference_unfold(case)
    if op == "unfold":
        return name, lambda: unfold(x)
    return f"{name}, then average", lambda: average_gram(unfold(x), case.groups)


METHODS: dict[str, list[Method]] = {
    "unfold": [
        Method("bg_unfold", "beyondgrad.conv.unfold", _bg_unfold, "strided views"),
        Method(
            "einsum_unfold",
            "index-pattern einsum",
            _einsum_unfold,
            "conv.einsum.unfold_expression",
        ),
    ],
    "kfac_reduce": [
        Method("kfac_reduce", "beyondgrad.conv.einsum.kfac_reduce", _kfac_reduce, "index patterns"),
        Method(
            "kfac_reduce_no_opt",
            "kfac_reduce, opt_einsum off",
            partial(_kfac_reduce, opt_einsum=False),
            "torch.einsum contracts left to right",
            only_if=lambda: torch.backends.opt_einsum.is_available(),
        ),
        Method("bg_unfold_average", "beyondgrad.conv.unfold, then average", _bg_unfold_average),
    ],
}
OPS: dict[str, str] = {
    "unfold": "unfold (im2col) `[N, C*prod(K), prod(O)]`",
    "kfac_reduce": "KFAC-reduce input factor `[G, C/G*prod(K), C/G*prod(K)]`",
}

# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------


@dataclass
class ConvRow:
    """A measured (or failed) cell: one case, one candidate, against the case's reference."""

    op: str
    case: str
    layer: str
    method: str
    label: str
    reference: str
    status: str = "ok"
    note: str = ""
    time_ms: float | None = None
    ref_ms: float | None = None
    ratio: float | None = None
    paired: float | None = None
    mem_mib: float | None = None
    ref_mem_mib: float | None = None
    mem_ratio: float | None = None
    rel_err: float | None = None
    k: int | None = None
    k_ref: int | None = None
    reps: int | None = None
    spread: float | None = None
    foreign_load: float | None = None
    samples_ms: list[float] = field(default_factory=list)
    ref_samples_ms: list[float] = field(default_factory=list)
    wall_s: float | None = None


def rel_error(value: Tensor, ref: Tensor) -> float:
    """Max abs difference over max abs reference value (inf on a shape mismatch)."""
    if value.shape != ref.shape:
        return math.inf
    v, r = value.detach().double(), ref.detach().double()
    d, m = float((v - r).abs().max()), float(r.abs().max())
    return d / m if m > 0 else (0.0 if d == 0 else math.inf)


def measure(op: str, case: Case, method: Method, cfg: Config, memory: CpuMemory | None) -> dict:
    """Check agreement, warm up, measure peak memory, then time candidate against reference."""
    x = case.input(cfg.device)
    ref_label, ref = reference(op, case, x)
    cand = method.build(case, x)
    row = ConvRow(op, case.name, case.layer, method.key, method.label, ref_label)
    notes = [method.note] if method.note else []
    try:
        row.rel_err = rel_error(cand(), ref())
        if row.rel_err > cfg.tol:
            notes.append(f"DISAGREES (rel {row.rel_err:.2g} > {cfg.tol:g})")
        for _ in range(cfg.warmup):
            ref()
            cand()
        _sync(cfg.device)
        peak = memory.peak_mib if memory is not None else cuda_peak_mib
        row.ref_mem_mib = peak(ref)
        row.mem_mib = peak(cand)
        attempts = [timed_reps(ref, cand, cfg)]
        while attempts[-1].disturbances(cfg, None) and len(attempts) <= cfg.noise_retries:
            time.sleep(cfg.retry_wait_s)
            attempts.append(timed_reps(ref, cand, cfg))
        best = min(attempts, key=lambda t: t.base_median)
        if len(attempts) > 1:
            notes.append(f"re-timed {len(attempts) - 1}x (disturbed machine)")
        if issues := best.disturbances(cfg, None):
            notes.append("NOISY: " + ", ".join(issues))
        if best.reps < cfg.reps:
            notes.append(f"{best.reps} reps (time cap)")
    except Exception as exc:
        row.status = "error"
        row.note = "; ".join([f"error: {type(exc).__name__}: {_short(str(exc))}", *notes])
        return asdict(row)
    row.samples_ms = [c * 1e3 for c in best.cand]
    row.ref_samples_ms = [b * 1e3 for b in best.base]
    row.time_ms = statistics.median(row.samples_ms)
    row.ref_ms = statistics.median(row.ref_samples_ms)
    row.ratio = row.time_ms / row.ref_ms
    row.paired = statistics.median(c / b for c, b in zip(best.cand, best.base))
    if row.ref_mem_mib:
        row.mem_ratio = row.mem_mib / row.ref_mem_mib
    row.k, row.k_ref, row.reps, row.spread = best.k_cand, best.k_base, best.reps, best.spread
    row.foreign_load = best.foreign_load
    row.note = "; ".join(notes)
    return asdict(row)


def self_check(device: str) -> dict[str, float]:
    """The one-hot reference against ``F.unfold`` in 2-d (it is the reference in 1-d and 3-d)."""
    out = {}
    for case in (CASES[1], CASES[2], CASES[3]):
        x = case.input(device)[:4]
        hyper = (case.kernel, case.dilation, case.padding, case.stride)
        out[case.name] = rel_error(onehot_unfold(x, *hyper), F.unfold(x, *hyper))
    return out


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def _cell(x: float | None, bold: bool = False) -> str:
    s = fmt(x)
    return f"**{s}**" if bold and s else s


def render(meta: dict[str, Any], rows: list[dict[str, Any]], cases: list[Case]) -> str:
    """The markdown report."""
    lines = [
        f"# Convolution toolkit: unfold and KFAC-reduce ({meta['device']})",
        "",
        f"*Generated {meta['date']} by `{meta['command']}`.*",
        "",
        f"* **Machine**: {meta['machine']}; Python {meta['python']}.",
        f"* **torch {meta['torch']}**, device `{meta['device']}`, torch threads "
        f"{meta['threads']} (interop {meta['interop_threads']}); beyondgrad "
        f"{meta['beyondgrad']}; float32. `torch.einsum` order: {meta['einsum']}.",
        f"* **Timing**: {meta['warmup']} warm-up call(s); each sample averages k calls so that "
        f"it lasts >= {meta['target_ms']:g} ms; {meta['reps']} samples of the reference and of "
        f"the candidate (fewer, but at least {min(3, meta['reps'])}, where a cell would exceed "
        f"{meta['max_cell_s']:g} s), alternated rep by rep (order swapped every other rep). "
        "*time*: median of the candidate's samples; *x ref*: that over the median of the "
        "reference's samples, measured in the same process; *paired x*: median of the per-rep "
        f"ratios. A cell is re-timed up to {meta['noise_retries']} more times while samples "
        f"spread more than {meta['noise_spread']:g}x or other processes use more than "
        f"{meta['max_foreign_load']:.0%} of the CPUs (CPU only); NOISY: still disturbed.",
        f"* **Memory**: {meta['memory_method']}; one call of each after warm-up, the input "
        "already allocated; the call's output is alive when the peak is read (so the peak of "
        "an unfold is at least the size of `U`). *mem x ref*: over the reference's peak in the "
        "same process.",
        f"* **Isolation**: {meta['isolation']}.",
        "* **References**: 2-d `F.unfold`; 1-d and 3-d the one-hot convolution (grouped "
        "`F.conv1d`/`F.conv3d` with the kernel `eye(prod(K)).reshape(prod(K), 1, *K)` repeated "
        "C times, `groups=C`, built inside the timed call; checked against `F.unfold` in 2-d: "
        "max rel error "
        + ", ".join(f"{v:.2g}" for v in meta["self_check"].values())
        + "). KFAC-reduce reference: that unfold, `u = U.mean(-1)`, then `u_g^T u_g` per group "
        "(batched matmul).",
        f"* **Agreement**: *rel err* = max abs difference / max abs reference value; DISAGREES "
        f"above {meta['tol']:g}. Reference rows show the median over the cells of that case.",
        "",
    ]
    lines += render_summary(rows, cases)
    for op in OPS:
        lines += render_op(op, rows, cases)
    return "\n".join(lines) + "\n"


def _rows_for(rows: list[dict[str, Any]], op: str, case: str) -> list[dict[str, Any]]:
    return [r for r in rows if r["op"] == op and r["case"] == case]


def render_summary(rows: list[dict[str, Any]], cases: list[Case]) -> list[str]:
    """beyondgrad's main candidate per op and case: time and memory over the reference."""
    main = {"unfold": "bg_unfold", "kfac_reduce": "kfac_reduce"}
    lines = [
        "## Summary (beyondgrad over the reference)",
        "",
        "Reference: the unfold below, and for kfac_reduce that unfold followed by the averaging. "
        "Time and peak memory as multiples of the reference's (< 1: beyondgrad is faster / "
        "uses less).",
        "",
        "| case | layer | `U` [MiB] | reference unfold | unfold: time x | unfold: mem x | "
        "kfac_reduce: time x | kfac_reduce: mem x |",
        "|---|---|---:|---|---:|---:|---:|---:|",
    ]
    for case in cases:
        cols = []
        for op, key in main.items():
            hit = [r for r in _rows_for(rows, op, case.name) if r["method"] == key]
            if hit and hit[0]["status"] == "ok":
                cols += [_cell(hit[0]["ratio"], bold=True), _cell(hit[0]["mem_ratio"])]
            else:
                cols += [hit[0]["status"] if hit else "-", ""]
        ref = reference_unfold(case)[0]
        head = f"| {case.name} | {case.layer} | {fmt(case.unfolded_mib())} | {ref} | "
        lines.append(head + " | ".join(cols) + " |")
    return [*lines, ""]


def render_op(op: str, rows: list[dict[str, Any]], cases: list[Case]) -> list[str]:
    """The detailed table of one operation: per case the reference, then each candidate."""
    lines = [
        f"## {OPS[op]}",
        "",
        "| case | method | time [ms] | x ref | paired x | peak mem [MiB] | mem x ref | rel err "
        "| notes |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for case in cases:
        mine = _rows_for(rows, op, case.name)
        if not mine:
            continue
        ok = [r for r in mine if r["status"] == "ok"]
        size = (
            f"`U` {fmt(case.unfolded_mib())} MiB"
            if op == "unfold"
            else f"factor {fmt(case.factor_mib())} MiB, `U` {fmt(case.unfolded_mib())} MiB"
        )
        head = f"{case.name} ({case.layer}; {size})"
        if ok:
            ref_ms = [r["ref_ms"] for r in ok]
            ref_mem = [r["ref_mem_mib"] for r in ok]
            lines.append(
                f"| {head} | {ok[0]['reference']} (reference) | {fmt(statistics.median(ref_ms))} "
                f"| 1 | | {fmt(statistics.median(ref_mem))} | 1 | | range "
                f"{fmt(min(ref_ms))}-{fmt(max(ref_ms))} ms |"
            )
            head = ""
        for r in mine:
            note = r["note"].replace("|", "\\|")
            if r["status"] == "ok":
                cols = [
                    fmt(r["time_ms"]),
                    _cell(r["ratio"], bold=True),
                    fmt(r["paired"]),
                    fmt(r["mem_mib"]),
                    fmt(r["mem_ratio"]),
                    f"{r['rel_err']:.1g}",
                ]
            else:
                cols = [r["status"], "", "", "", "", ""]
            lines.append(f"| {head} | {r['label']} | " + " | ".join(cols) + f" | {note} |")
            head = ""
    return [*lines, ""]


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--reps", type=int, default=7, help="timed samples per cell (default 7)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--ops", nargs="+", default=list(OPS), choices=list(OPS))
    ap.add_argument(
        "--cases",
        nargs="+",
        default=None,
        metavar="TEXT",
        help="only the cases whose name or layer contains one of these (e.g. 1d 3C3D g4)",
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="markdown output (default benchmarks/results/conv_toolkit_{device}.md); "
        "the JSON goes next to it",
    )
    ap.add_argument(
        "--quick", action="store_true", help="smoke test: 2 reps, 1 warm-up, 20 ms samples"
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


def selected(cases: list[Case], filters: list[str] | None) -> list[Case]:
    if not filters:
        return cases
    return [c for c in cases if any(f in c.name or f in c.layer for f in filters)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: CUDA is not available", file=sys.stderr)
        return 2
    cpu = args.device == "cpu"
    cfg = Config(
        device=args.device,
        reps=2 if args.quick else args.reps,
        threads=args.threads,
        warmup=1 if args.quick else 3,
        target_s=(args.target_ms or (20.0 if args.quick or not cpu else 50.0)) / 1e3,
        max_cell_s=args.max_cell_s or (25.0 if cpu else 10.0),
        cell_timeout_s=600.0,
        only_beyondgrad=True,
        quick=args.quick,
    )
    torch.set_num_threads(cfg.threads)
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(cfg.threads)
    memory = CpuMemory() if cpu else None
    out = args.out or RESULTS_DIR / f"conv_toolkit_{args.device}.md"
    out.parent.mkdir(parents=True, exist_ok=True)

    machine = f"{cpu_model()}, {os.cpu_count()} logical CPUs"
    if not cpu:
        machine = f"{torch.cuda.get_device_name()} (host: {machine})"
    meta: dict[str, Any] = {
        "date": _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv or sys.argv[1:])]),
        "device": args.device,
        "machine": machine,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "beyondgrad": version("beyondgrad"),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "einsum": opt_einsum_state(),
        "reps": cfg.reps,
        "warmup": cfg.warmup,
        "target_ms": cfg.target_s * 1e3,
        "max_cell_s": cfg.max_cell_s,
        "tol": cfg.tol,
        "noise_spread": cfg.noise_spread,
        "noise_retries": cfg.noise_retries,
        "max_foreign_load": cfg.max_foreign_load,
        "quick": cfg.quick,
        "memory_method": (
            memory.method()
            if memory is not None
            else "torch.cuda.max_memory_allocated (after reset_peak_memory_stats) "
            "above torch.cuda.memory_allocated before the call"
        ),
        "isolation": (
            "each cell (one case, one candidate, with its reference) in its own forked child "
            "process"
            if cfg.isolate
            else "all cells in one process, one after the other"
        ),
    }
    meta["self_check"] = run_isolated(partial(self_check, args.device), 120.0, cfg.isolate)
    if any(v > cfg.tol for v in meta["self_check"].values()):
        print(f"one-hot unfold disagrees with F.unfold: {meta['self_check']}", file=sys.stderr)

    all_cases: list[Case] = []
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for op in args.ops:
        cases = selected(CASES + (GROUPED_CASES if op == "kfac_reduce" else []), args.cases)
        all_cases += [c for c in cases if c not in all_cases]
        for case in cases:
            for method in METHODS[op]:
                if not method.only_if():
                    continue
                tc = time.perf_counter()
                try:
                    row = run_isolated(
                        partial(measure, op, case, method, cfg, memory),
                        cfg.cell_timeout_s,
                        cfg.isolate,
                    )
                except Exception as exc:
                    ref_label = reference(op, case, torch.empty(0))[0]
                    row = asdict(
                        ConvRow(
                            op,
                            case.name,
                            case.layer,
                            method.key,
                            method.label,
                            ref_label,
                            status="error",
                            note=f"error: {_short(str(exc).splitlines()[0])}",
                        )
                    )
                row["wall_s"] = time.perf_counter() - tc
                rows.append(row)
                label = f"[{op}] {case.name} / {method.label}"
                if row["status"] == "ok":
                    print(
                        f"{label}: {row['time_ms']:.3g} ms, x{row['ratio']:.3g} "
                        f"(ref {row['ref_ms']:.3g} ms), mem {row['mem_mib']:.3g} MiB "
                        f"(ref {row['ref_mem_mib']:.3g}), rel err {row['rel_err']:.1g}  "
                        f"[{row['wall_s']:.0f} s]",
                        file=sys.stderr,
                    )
                else:
                    print(f"{label}: {row['note']}", file=sys.stderr)
    meta["wall_s"] = time.perf_counter() - t0
    out.write_text(render(meta, rows, all_cases))
    payload = {"meta": meta, "cases": [asdict(c) | {"name": c.name} for c in all_cases]}
    payload["rows"] = rows
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1))
    print(
        f"wrote {out} and {out.with_suffix('.json').name} ({meta['wall_s']:.0f} s)", file=sys.stderr
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
