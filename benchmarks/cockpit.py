"""Cockpit overhead: a training step with the Cockpit attached, as a ratio to the same plain
training step (SGD, same model and batch) measured in the same process.

Rows: presets ``economy``, ``business``, ``full`` tracked every step, and ``full`` every 16
steps. Each sample times a block of 16 consecutive steps (so schedules average correctly),
plain and tracked blocks alternated rep by rep (the protocol of ``harness.py``, one block per
call); the median of the per-rep ratios is reported. On CPU, glibc's malloc thresholds are
settled first (``harness.settle_malloc``), as in the other scripts' cells. Problems: ``mlp``,
``cnn`` and ``transformer`` (the built-in sorting task's pre-norm encoder). The original
Cockpit, 3C3D on CPU: economy 5.7x, business 12.4x, full 100x every step; 1.34x / 1.76x / 7.2x
every 16 steps.

    python benchmarks/cockpit.py [--problems mlp cnn transformer] [--reps 5] [--threads 2]
                                 [--device cpu] [--rows economy:1 business:1 full:1 full:16]
    python benchmarks/cockpit.py --smoke       # does it run (tiny, to a temp dir)

Writes ``benchmarks/results/cockpit_<device>.md`` and ``.json``.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from typing import Any

import torch

import beyondgrad as bg
import harness as h
from harness import Config

SCRIPT = h.Script(
    name="cockpit",
    doc=__doc__,
    problems=("mlp", "cnn", "transformer"),
    reps=5,
    max_cell_s=(1e6, 1e6),  # every rep is kept
)
BLOCK = 16
ROWS = (("economy", 1), ("business", 1), ("full", 1), ("full", 16))


def training_block(p: h.Problem, opt: torch.optim.Optimizer, steps: int) -> Callable[..., None]:
    """``block(cockpit, start)``: ``steps`` SGD steps from step ``start`` (plain where
    ``cockpit`` is None)."""

    def block(cockpit: Any, start: int) -> None:
        for step in range(start, start + steps):
            opt.zero_grad()
            if cockpit is None:
                p.loss_fn(p.model(p.X), p.y).backward()
            else:
                with cockpit(step, optimizer=opt):
                    loss = p.loss_fn(p.model(p.X), p.y)
                    loss.backward()
            opt.step()

    return block


def measure(problem: str, config: str, every: int, cfg: Config) -> dict[str, Any]:
    """Plain and tracked blocks of steps on one model, alternated rep by rep after warm-up."""
    steps = 1 if cfg.smoke else BLOCK
    p = h.fresh_problem(problem, cfg)
    opt = torch.optim.SGD(p.model.parameters(), lr=1e-3)
    cockpit = bg.cockpit.Cockpit(
        p.model, p.loss_fn, config=config, schedule=bg.cockpit.every(every)
    )
    block = training_block(p, opt, steps)
    step = [0]

    def tracked() -> None:
        block(cockpit, step[0])
        step[0] += steps

    for _ in range(1 if cfg.smoke else 2):  # warm-up both paths
        block(None, 0)
        tracked()
    t = h.timed_reps(partial(block, None, 0), tracked, replace(cfg, target_s=0.0))
    ratios = [c / b for c, b in zip(t.cand, t.base)]
    return {
        "problem": problem,
        "config": config,
        "every": every,
        "ratio": statistics.median(ratios),
        "plain_ms": statistics.median(t.base) / steps * 1e3,
        "tracked_ms": statistics.median(t.cand) / steps * 1e3,
        "ratios": ratios,
    }


def render(rows: list[dict[str, Any]], cfg: Config) -> str:
    """The markdown table."""
    if cfg.device == "cuda":
        device = torch.cuda.get_device_name()
    else:
        device = f"CPU, {torch.get_num_threads()} threads"
    lines = [
        f"# Cockpit overhead ({device}, torch {torch.__version__})",
        "",
        "Training step with the Cockpit attached / plain SGD training step, same process, "
        f"median over {cfg.reps} interleaved blocks of {BLOCK} steps. Goals (CPU, every step): "
        "economy <= 1.5x, business <= 2x; full every 16 steps <= 1.5x. Original Cockpit on "
        "CPU (3C3D): 5.7x / 12.4x / 100x every step, full every 16: 7.2x. Regenerate: "
        "`python benchmarks/cockpit.py`.",
        "",
        "| problem | preset | tracked every | ratio | ms/step tracked | ms/step plain |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['problem']} | {r['config']} | {r['every']} | {r['ratio']:.2f} | "
            f"{r['tracked_ms']:.1f} | {r['plain_ms']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def run_row(problem: str, config: str, every: int, cfg: Config) -> dict[str, Any]:
    """One row, with its progress line."""
    row = measure(problem, config, every, cfg)
    h.log(
        f"{problem:4s} {config:9s} every {every:2d}: {row['ratio']:.2f}x "
        f"({row['tracked_ms']:.1f} ms vs {row['plain_ms']:.1f} ms per step)"
    )
    return row


def parse_row(text: str) -> tuple[str, int]:
    """``"preset:every"`` -> ``(preset, every)``."""
    config, _, every = text.partition(":")
    if config not in bg.cockpit.PRESETS or not every.isdigit() or int(every) < 1:
        raise ValueError(f"a row is preset:every (e.g. economy:1, full:16), got {text!r}")
    return config, int(every)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write its table."""
    ap = SCRIPT.parser()
    ap.add_argument(
        "--rows",
        nargs="+",
        type=parse_row,
        default=list(ROWS),
        help="preset:every rows (default economy:1 business:1 full:1 full:16)",
    )
    args = ap.parse_args(argv)
    cfg, _, meta = SCRIPT.start(args, argv)
    if cfg.device == "cpu":  # one process for every row: settled as the other scripts' cells
        h.settle_malloc()
    jobs = [partial(run_row, p, c, e, cfg) for p in args.problems for c, e in args.rows]
    rows = h.timed_runs(meta, jobs)
    h.write_results(SCRIPT.output(args), rows, lambda: render(rows, cfg))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
