"""Benchmark the convolution toolkit: N-d ``unfold`` (im2col) and the KFAC-reduce input factor.

One command regenerates ``benchmarks/results/conv_toolkit_{device}.md`` and a JSON file with the
raw numbers next to it::

    python benchmarks/conv_toolkit.py                  # CPU, every case
    python benchmarks/conv_toolkit.py --device cuda    # GPU
    python benchmarks/conv_toolkit.py --quick --cases 1d   # short run
    python benchmarks/conv_toolkit.py --smoke          # does it run (tiny, to a temp dir)

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

The measurement protocol is the one of ``harness.py``: each cell
(one case, one candidate) runs in a forked child on CPU; warm-up; the peak memory of one call of
the reference and of the candidate; calibrated samples of both, alternated rep by rep (ABBA);
re-timing while the machine looks disturbed. Every cell also checks that the candidate's result
equals the reference's.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

import harness as h
from beyondgrad.conv import conv_output_size
from beyondgrad.conv import einsum as conv_einsum
from beyondgrad.conv import unfold as bg_unfold
from harness import Candidate, Config

SCRIPT = h.Script(name="conv_toolkit", doc=__doc__, packages=("beyondgrad",), problems=None)

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
        """Number of spatial dimensions."""
        return len(self.size)

    @property
    def name(self) -> str:
        """E.g. ``"2d N32 C96 32x32 k3 p1"``."""
        hyper = f"k{self.kernel}"
        hyper += f" p{self.padding}" if self.padding else ""
        hyper += f" s{self.stride}" if self.stride > 1 else ""
        hyper += f" d{self.dilation}" if self.dilation > 1 else ""
        hyper += f" g{self.groups}" if self.groups > 1 else ""
        spatial = "x".join(str(s) for s in self.size)
        return f"{self.d}d N{self.N} C{self.C} {spatial} {hyper}"

    @property
    def out_size(self) -> tuple[int, ...]:
        """Spatial size of the convolution's output."""
        return tuple(
            conv_output_size(i, self.kernel, self.stride, self.padding, self.dilation)
            for i in self.size
        )

    @property
    def taps(self) -> int:
        """Kernel taps ``prod(K)``."""
        return self.kernel**self.d

    def unfolded_mib(self, itemsize: int = 4) -> float:
        """Size of the unfolded input ``[N, C * prod(K), prod(O)]``."""
        return self.N * self.C * self.taps * math.prod(self.out_size) * itemsize / h.MIB

    def factor_mib(self, itemsize: int = 4) -> float:
        """Size of the KFAC factor ``[G, C/G * prod(K), C/G * prod(K)]``."""
        side = self.C // self.groups * self.taps
        return self.groups * side * side * itemsize / h.MIB

    def input(self, device: str) -> Tensor:
        """The layer's input, a seeded Gaussian ``[N, C, *size]`` on ``device``."""
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

SMOKE_BATCH = 2


def smoke_cases(cases: list[Case]) -> list[Case]:
    """One small case per dimensionality and grouping (batch 2), for ``--smoke``."""
    picked: dict[tuple[int, int], Case] = {}
    for c in cases:
        picked.setdefault((c.d, c.groups), replace(c, N=SMOKE_BATCH))
    return list(picked.values())


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

    def record(self, m: h.Measured) -> None:
        """Copy the measured numbers (the harness's baseline is this row's reference)."""
        for key, value in asdict(m).items():
            key = key.replace("base_", "ref_").replace("k_base", "k_ref")
            setattr(self, key, value)


def measure(op: str, case: Case, method: Method, cfg: Config, memory: h.CpuMemory | None) -> dict:
    """Check agreement, then the harness's protocol: candidate against the case's reference."""
    x = case.input(cfg.device)
    ref_label, ref = reference(op, case, x)
    cand = method.build(case, x)
    row = ConvRow(op, case.name, case.layer, method.key, method.label, ref_label)
    notes = [method.note] if method.note else []
    try:
        row.rel_err = h.rel_error(cand(), ref())
        if row.rel_err > cfg.tol:
            notes.append(f"DISAGREES (rel {row.rel_err:.2g} > {cfg.tol:g})")
        row.record(h.measure_pair(Candidate(ref), Candidate(cand), cfg, memory, notes))
    except Exception as exc:
        row.status = "error"
        row.note = "; ".join([f"error: {type(exc).__name__}: {h.short(str(exc))}", *notes])
        return asdict(row)
    row.note = "; ".join(notes)
    return asdict(row)


def self_check(device: str) -> dict[str, float]:
    """The one-hot reference against ``F.unfold`` in 2-d (it is the reference in 1-d and 3-d)."""
    out = {}
    for case in (CASES[1], CASES[2], CASES[3]):
        x = case.input(device)[:4]
        hyper = (case.kernel, case.dilation, case.padding, case.stride)
        out[case.name] = h.rel_error(onehot_unfold(x, *hyper), F.unfold(x, *hyper))
    return out


def run_cell(op: str, case: Case, method: Method, cfg: Config, memory: h.CpuMemory | None) -> dict:
    """One cell in its own child (on CPU); a failed child becomes an error row."""
    tc = time.perf_counter()
    try:
        job = partial(measure, op, case, method, cfg, memory)
        row = h.run_isolated(job, cfg.cell_timeout_s, cfg.isolate)
    except Exception as exc:
        ref_label = reference(op, case, torch.empty(0))[0]
        row = asdict(
            ConvRow(op, case.name, case.layer, method.key, method.label, ref_label, "error")
        )
        row["note"] = f"error: {h.first_line(exc)}"
    row["wall_s"] = time.perf_counter() - tc
    label = f"[{op}] {case.name} / {method.label}"
    if row["status"] == "ok":
        h.log(
            f"{label}: {row['time_ms']:.3g} ms, x{row['ratio']:.3g} (ref {row['ref_ms']:.3g} ms), "
            f"mem {row['mem_mib']:.3g} MiB (ref {row['ref_mem_mib']:.3g}), rel err "
            f"{row['rel_err']:.1g}  [{row['wall_s']:.0f} s]"
        )
    else:
        h.log(f"{label}: {row['note']}")
    return row


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


def _cell(x: float | None, bold: bool = False) -> str:
    s = h.fmt(x)
    return f"**{s}**" if bold and s else s


def render(meta: dict[str, Any], rows: list[dict[str, Any]], cases: list[Case]) -> str:
    """The markdown report."""
    torch_extra = f"; beyondgrad {meta['beyondgrad']}" if "beyondgrad" in meta else ""
    torch_extra += f"; float32. `torch.einsum` order: {meta['einsum']}"
    lines = [
        *h.header_lines(meta, "Convolution toolkit: unfold and KFAC-reduce", torch_extra),
        *h.protocol_lines(meta, "reference", "x ref", "the layer's input once, for both calls"),
        "* **References**: 2-d `F.unfold`; 1-d and 3-d the one-hot convolution (grouped "
        "`F.conv1d`/`F.conv3d` with the kernel `eye(prod(K)).reshape(prod(K), 1, *K)` repeated "
        "C times, `groups=C`, built inside the timed call; checked against `F.unfold` in 2-d: "
        "max rel error "
        + ", ".join(f"{v:.2g}" for v in meta["self_check"].values())
        + "). KFAC-reduce reference: that unfold, `u = U.mean(-1)`, then `u_g^T u_g` per group "
        "(batched matmul). The memory of an unfold is at least the size of `U` (its output).",
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
        head = f"| {case.name} | {case.layer} | {h.fmt(case.unfolded_mib())} | {ref} | "
        lines.append(head + " | ".join(cols) + " |")
    return [*lines, ""]


def _reference_row(head: str, ok: list[dict[str, Any]]) -> str:
    ref_ms = [r["ref_ms"] for r in ok]
    ref_mem = [r["ref_mem_mib"] for r in ok]
    return (
        f"| {head} | {ok[0]['reference']} (reference) | {h.fmt(statistics.median(ref_ms))} "
        f"| 1 | | {h.fmt(statistics.median(ref_mem))} | 1 | | range "
        f"{h.fmt(min(ref_ms))}-{h.fmt(max(ref_ms))} ms |"
    )


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
        size = f"`U` {h.fmt(case.unfolded_mib())} MiB"
        if op != "unfold":
            size = f"factor {h.fmt(case.factor_mib())} MiB, " + size
        head = f"{case.name} ({case.layer}; {size})"
        if ok:
            lines.append(_reference_row(head, ok))
            head = ""
        for r in mine:
            cols = [r["status"], "", "", "", "", ""]
            if r["status"] == "ok":
                cols = [h.fmt(r[k]) for k in ("time_ms", "ratio", "paired", "mem_mib", "mem_ratio")]
                cols[1] = _cell(r["ratio"], bold=True)
                cols.append(f"{r['rel_err']:.1g}")
            note = h.escape(r["note"])
            lines.append(f"| {head} | {r['label']} | " + " | ".join(cols) + f" | {note} |")
            head = ""
    return [*lines, ""]


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> Any:
    """The shared options plus ``--ops`` and ``--cases``."""
    ap = SCRIPT.parser()
    ap.add_argument("--ops", nargs="+", default=list(OPS), choices=list(OPS))
    ap.add_argument(
        "--cases",
        nargs="+",
        default=None,
        metavar="TEXT",
        help="only the cases whose name or layer contains one of these (e.g. 1d 3C3D g4)",
    )
    return ap.parse_args(argv)


def selected(cases: list[Case], filters: list[str] | None, smoke: bool) -> list[Case]:
    """The cases matching the ``--cases`` filters (``--smoke``: a few small ones)."""
    if smoke:
        cases = smoke_cases(cases)
    if not filters:
        return cases
    return [c for c in cases if any(f in c.name or f in c.layer for f in filters)]


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write its tables."""
    args = parse_args(argv)
    cfg, memory, meta = SCRIPT.start(args, argv)
    out = SCRIPT.output(args)
    meta["einsum"] = opt_einsum_state()
    if cfg.isolate:
        meta["isolation"] = (
            "each cell (one case, one candidate, with its reference) in its own forked child "
            "process"
        )
    meta["self_check"] = h.run_isolated(partial(self_check, args.device), 120.0, cfg.isolate)
    if any(v > cfg.tol for v in meta["self_check"].values()):
        h.log(f"one-hot unfold disagrees with F.unfold: {meta['self_check']}")
    jobs, all_cases = [], []
    for op in args.ops:
        cases = selected(
            CASES + (GROUPED_CASES if op == "kfac_reduce" else []), args.cases, cfg.smoke
        )
        all_cases += [c for c in cases if c not in all_cases]
        jobs += [
            partial(run_cell, op, case, method, cfg, memory)
            for case in cases
            for method in METHODS[op]
            if method.only_if()
        ]
    rows = h.timed_runs(meta, jobs)
    payload = {"meta": meta, "cases": [asdict(c) | {"name": c.name} for c in all_cases]}
    payload["rows"] = rows
    h.write_results(out, payload, lambda: render(meta, rows, all_cases))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
