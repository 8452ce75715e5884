"""CPU time and page faults per call: beyondgrad's large results from ``torch.empty``
(``bg.configure_result_pool(None)``), from its pool of recycled mappings (the default), the
pool's mappings advised for transparent huge pages, and the pool with
``bg.retain_freed_memory`` (glibc keeps PyTorch's freed blocks for the next call).

Each setting runs in a fresh interpreter (the thresholds are process-wide and cannot be
undone), the settings one after the other, ``--rounds`` times; reported are the medians
over the rounds of each process's median call time, and the page faults per call. Rows: a plain
forward+backward, per-sample gradients, per-sample MC ``DiagGGN``, exact ``DiagGGN`` and
``SqrtGGN``, KFAC type-2 / MC (``bg.compute``), on the built-in problems; the Cockpit's economy
preset (a tracked SGD step).

    python benchmarks/allocator.py [--problems mlp cnn transformer] [--rounds 3] [--threads 2]

Writes ``benchmarks/results/allocator_cpu.md`` (and ``.json``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import beyondgrad as bg
from beyondgrad.app.tasks import make_problem

MODES = {
    "no-pool": "`bg.configure_result_pool(None)`",
    "default": "result pool (beyondgrad's default)",
    "huge-pages": "result pool, `huge_pages=True`",
    "retain": "result pool + `bg.retain_freed_memory()`",
    "retain-large": "result pool + `bg.retain_freed_memory(large_blocks=False)`",
}
RESULTS = Path(__file__).resolve().parent / "results"


def thp_setting() -> str:
    """The kernel's transparent-huge-page modes (``enabled``; ``defrag``)."""
    base = Path("/sys/kernel/mm/transparent_hugepage")
    try:
        return "; ".join(f"{f}: " + (base / f).read_text().strip() for f in ("enabled", "defrag"))
    except OSError:
        return "unavailable"


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _cells(problem: str) -> dict[str, tuple[Callable[[], Any], int]]:
    """``name -> (call, calls per sample)`` on a fresh instance of ``problem``."""
    p = make_problem(problem)
    gen = torch.Generator().manual_seed(0)

    def compute(q: Any) -> Callable[[], Any]:
        return lambda: bg.compute(p.model, p.loss_fn, p.X, p.y, q, generator=gen)

    opt = torch.optim.SGD(p.model.parameters(), lr=1e-3)
    cockpit = bg.cockpit.Cockpit(p.model, p.loss_fn, config="economy")
    step = [0]

    def plain() -> None:
        opt.zero_grad()
        p.loss_fn(p.model(p.X), p.y).backward()

    def tracked() -> None:
        opt.zero_grad()
        with cockpit(step[0], optimizer=opt):
            p.loss_fn(p.model(p.X), p.y).backward()
        opt.step()
        step[0] += 1

    cells: dict[str, tuple[Callable[[], Any], int]] = {
        "forward+backward": (plain, 10),
        "per-sample gradients": (compute(bg.BatchGrad()), 2),
        "per-sample MC DiagGGN": (compute(bg.BatchDiagGGN(mc_samples=1)), 2),
        "KFAC (MC)": (compute(bg.KFAC(fisher_type="mc")), 5),
        "Cockpit economy step (SGD)": (tracked, 5),
    }
    if problem != "transformer":  # the exact rows refuse its per-position outputs
        cells["exact DiagGGN"] = (compute(bg.DiagGGN()), 2)
        cells["KFAC type-2 (KFLR)"] = (compute(bg.KFAC(fisher_type="type-2")), 2)
        cells["exact SqrtGGN"] = (compute(bg.SqrtGGN()), 1)
    return cells


def child(mode: str, problems: list[str], threads: int) -> dict[str, Any]:
    """One process: the setting, then every cell (3 warm-up calls, 5 timed samples)."""
    torch.set_num_threads(threads)
    if mode == "no-pool":
        bg.configure_result_pool(None)
    elif mode == "huge-pages":
        bg.configure_result_pool(huge_pages=True)
    elif mode.startswith("retain"):
        if not bg.retain_freed_memory(large_blocks=mode != "retain-large"):
            raise SystemExit("not glibc: retain_freed_memory has nothing to set")
    out: dict[str, Any] = {}
    for problem in problems:
        for name, (call, n) in _cells(problem).items():
            for _ in range(3):
                call()
            samples = []
            for _ in range(5):
                f0, t0 = _faults(), time.perf_counter()
                for _ in range(n):
                    call()
                samples.append(((time.perf_counter() - t0) / n * 1e3, (_faults() - f0) / n))
            samples.sort()
            ms, faults = samples[len(samples) // 2]
            out[f"{problem}|{name}"] = (ms, faults, samples[-1][0])
    return out


Runs = dict[str, dict[str, list[tuple[float, ...]]]]


def run(args: argparse.Namespace) -> Runs:
    """``{cell: {mode: [(ms, faults, worst ms) per round]}}``, the modes alternating round by
    round."""
    found: Runs = {}
    for r in range(args.rounds):
        for mode in MODES:
            cmd = [sys.executable, __file__, "--child", mode, "--threads", str(args.threads)]
            cmd += ["--problems", *args.problems]
            text = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            for cell, value in json.loads(text.strip().splitlines()[-1]).items():
                found.setdefault(cell, {}).setdefault(mode, []).append(tuple(value))
            print(f"round {r + 1}/{args.rounds}: {mode} done", file=sys.stderr, flush=True)
    return found


def render(found: Runs, args: argparse.Namespace) -> str:
    """The markdown table."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    head = " | ".join(f"{MODES[m]}: ms (faults/call; worst)" for m in MODES)
    lines = [
        "# CPU memory: the result pool, huge pages and glibc's thresholds (CPU)",
        "",
        f"Command: `python benchmarks/allocator.py --problems {' '.join(args.problems)} "
        f"--rounds {args.rounds} --threads {args.threads}`; {stamp}; torch {torch.__version__}, "
        f"{args.threads} threads, {platform.processor() or platform.machine()}.",
        "",
        "Each setting in its own fresh process, the settings alternating round by round; per "
        "cell the median over the rounds of each process's median call (3 warm-up calls, 5 "
        "samples), the minor page faults per call, and the slowest sample over all rounds "
        "(where the kernel compacts memory for huge pages, a call can stall). KFAC/DiagGGN: "
        "`bg.compute` of the whole quantity; the Cockpit row: one tracked SGD step with the "
        f"economy preset. Huge pages: the kernel's THP setting here is `{thp_setting()}`.",
        "",
        f"| problem | call | {head} |",
        "|---|---|" + "---:|" * len(MODES),
    ]
    for cell, modes in found.items():
        problem, name = cell.split("|")
        parts = []
        for m in MODES:
            ms = statistics.median(v[0] for v in modes[m])
            faults = statistics.median(v[1] for v in modes[m])
            worst = max(v[-1] for v in modes[m])
            parts.append(f"{ms:.2f} ({faults:,.0f}; {worst:,.1f})")
        lines.append(f"| {problem} | {name} | " + " | ".join(parts) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the rounds (or, with ``--child``, one process's cells) and write the table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--problems", nargs="+", default=["mlp", "cnn", "transformer"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", choices=list(MODES), default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(RESULTS / "allocator_cpu.md"))
    args = ap.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args.child, args.problems, args.threads)))
        return 0
    found = run(args)
    out = Path(args.out)
    out.write_text(render(found, args))
    out.with_suffix(".json").write_text(json.dumps(found, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
