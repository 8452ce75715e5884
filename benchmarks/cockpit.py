"""Cockpit overhead: a training step with the Cockpit attached, as a ratio to the same plain
training step (SGD, same model and batch) measured in the same process.

Rows: presets ``economy``, ``business``, ``full`` tracked every step, and ``full`` every 16
steps; on models whose parameters all belong to ``nn.Linear`` layers (the mlp) also ``floor``:
the plain step plus only the products that economy's per-sample instruments cannot avoid (per
layer the cheaper of the Gram matrices ``X X^T``, ``G G^T`` (bias column included) with their
cross-Gram matrices with the previous step's, for the dots with ``g`` and Alpha's slopes along
an SGD step, and one product of the rows with ``g`` and the last step stacked; norms from the
rank-1 rows), in bare torch with no
bookkeeping: a lower bound on economy's ratio there. Each sample times a block of 16
consecutive steps (so schedules average correctly), plain and tracked blocks alternated rep by
rep (the protocol of ``harness.py``, one block per call); the median of the per-rep ratios is
reported. On CPU, glibc's malloc thresholds are settled first (``harness.settle_malloc``), as
in the other scripts' cells. Problems: ``mlp``, ``cnn`` and ``transformer`` (the built-in
sorting task's pre-norm encoder). The original Cockpit, 3C3D on CPU: economy 5.7x, business
12.4x, full 100x every step; 1.34x / 1.76x / 7.2x every 16 steps.

    python benchmarks/cockpit.py [--problems mlp cnn transformer] [--reps 5] [--threads 2]
                                 [--device cpu]
                                 [--rows economy:1 business:1 full:1 full:16 floor:1]
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
from torch import Tensor, nn

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
ROWS = (("economy", 1), ("business", 1), ("full", 1), ("full", 16), ("floor", 1))
FLOOR = "floor"


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


def floor_block(p: h.Problem, opt: torch.optim.Optimizer, steps: int) -> Callable[..., None]:
    """``block(_, start)``: ``steps`` SGD steps that also form economy's unavoidable products
    (see the module docstring), each ``nn.Linear``'s input and output gradient kept by a
    forward hook and a tensor hook; the hooks are removed after the block."""
    layers = [m for m in p.model.modules() if isinstance(m, nn.Linear)]
    kept: dict[nn.Module, list[Tensor]] = {}
    previous: dict[nn.Module, tuple[Tensor, ...]] = {}  # (X, G), or the gradient (W,)

    def keep(module: nn.Module, args: tuple, out: Tensor) -> None:
        kept[module] = [args[0]]
        out.register_hook(lambda g: kept[module].append(g) and None)

    def products() -> Tensor:
        """Per layer the cheaper of the two ways to its norms, dots with ``g`` and slopes
        along the last SGD step (``-lr`` times the last gradient), summed into a scalar."""
        parts = []
        for m in layers:
            X, G = kept[m]
            X = torch.cat([X, X.new_ones(X.shape[0], 1)], 1) if m.bias is not None else X
            N, I, O = X.shape[0], X.shape[1], G.shape[1]
            parts.append(X.square().sum(1) * G.square().sum(1))  # norms: rows are rank-1
            last = previous.get(m)
            if N * (I + O) < I * O:  # Gram and cross-Gram matrices
                parts.append(((X @ X.T) * (G @ G.T)).sum(1))
                if last is not None:
                    parts.append(((X @ last[0].T) * (G @ last[1].T)).sum(1))
                previous[m] = (X, G)
            else:  # projections of the rows on g and the last step, in one product
                W = (
                    m.weight.grad
                    if m.bias is None
                    else torch.cat([m.weight.grad, m.bias.grad[:, None]], 1)
                )
                V = torch.stack([W, W if last is None else last[0]], 1).reshape(O, 2 * I)
                parts.append(((G @ V).view(N, 2, I) * X[:, None]).sum(2).sum(1))
                previous[m] = (W,)
        return torch.stack(parts).sum()

    def block(_: Any, start: int) -> None:
        handles = [m.register_forward_hook(keep) for m in layers]
        try:
            for _step in range(steps):
                opt.zero_grad()
                p.loss_fn(p.model(p.X), p.y).backward()
                products()
                opt.step()
        finally:
            for handle in handles:
                handle.remove()

    return block


def dense_only(model: nn.Module) -> bool:
    """Whether every parameter of ``model`` belongs to an ``nn.Linear``."""
    owned = {id(q) for m in model.modules() if isinstance(m, nn.Linear) for q in m.parameters()}
    return all(id(q) in owned for q in model.parameters())


def measure(problem: str, config: str, every: int, cfg: Config) -> dict[str, Any] | None:
    """Plain and tracked blocks of steps on one model, alternated rep by rep after warm-up
    (None for the floor row on a model that is not made of ``nn.Linear`` layers)."""
    steps = 1 if cfg.smoke else BLOCK
    p = h.fresh_problem(problem, cfg)
    opt = torch.optim.SGD(p.model.parameters(), lr=1e-3)
    if config == FLOOR:
        if not dense_only(p.model):
            return None
        cockpit, block = None, training_block(p, opt, steps)
        tracked_block = floor_block(p, opt, steps)
    else:
        cockpit = bg.cockpit.Cockpit(
            p.model, p.loss_fn, config=config, schedule=bg.cockpit.every(every)
        )
        block = tracked_block = training_block(p, opt, steps)
    step = [0]

    def tracked() -> None:
        tracked_block(cockpit, step[0])
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
        "CPU (3C3D): 5.7x / 12.4x / 100x every step, full every 16: 7.2x. Row *floor* (models "
        "of nn.Linear layers only): the plain step plus only the products economy cannot avoid "
        "(per layer the cheaper of the Gram matrices of inputs and output gradients with their "
        "cross-Gram matrices with the previous step's, and one stacked projection on g and the "
        "last step), in bare torch: a lower bound on economy's ratio. Regenerate: "
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


def run_row(problem: str, config: str, every: int, cfg: Config) -> dict[str, Any] | None:
    """One row, with its progress line (None: the row does not apply to the problem)."""
    row = measure(problem, config, every, cfg)
    if row is None:
        h.log(f"{problem:4s} {config:9s}: not an nn.Linear-only model, no floor row")
        return None
    h.log(
        f"{problem:4s} {config:9s} every {every:2d}: {row['ratio']:.2f}x "
        f"({row['tracked_ms']:.1f} ms vs {row['plain_ms']:.1f} ms per step)"
    )
    return row


def parse_row(text: str) -> tuple[str, int]:
    """``"preset:every"`` -> ``(preset, every)``."""
    config, _, every = text.partition(":")
    if config not in (*bg.cockpit.PRESETS, FLOOR) or not every.isdigit() or int(every) < 1:
        raise ValueError(
            f"a row is preset:every (e.g. economy:1, full:16) or floor:1, got {text!r}"
        )
    return config, int(every)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write its table."""
    ap = SCRIPT.parser()
    ap.add_argument(
        "--rows",
        nargs="+",
        type=parse_row,
        default=list(ROWS),
        help="preset:every rows (default economy:1 business:1 full:1 full:16 floor:1)",
    )
    args = ap.parse_args(argv)
    cfg, _, meta = SCRIPT.start(args, argv)
    if cfg.device == "cpu":  # one process for every row: settled as the other scripts' cells
        h.settle_malloc()
    jobs = [partial(run_row, p, c, e, cfg) for p in args.problems for c, e in args.rows]
    rows = [row for row in h.timed_runs(meta, jobs) if row is not None]
    h.write_results(SCRIPT.output(args), rows, lambda: render(rows, cfg))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
