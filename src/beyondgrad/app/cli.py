"""The ``beyondgrad`` console command (``pip install "beyondgrad[app]"``).

``beyondgrad demo``      every quantity on a built-in problem, with its cost relative to one
                         plain forward+backward, checked against torch.func.
``beyondgrad coverage``  which rule serves each parameter of a built-in problem.
``beyondgrad train``     the main job: a built-in task trained with the Cockpit attached
                         (checkpoints; ``--resume RUN_DIR`` continues a run).
``beyondgrad plot``      redraw a run's Cockpit dashboard from its log.
``beyondgrad bench``     regenerate a benchmark table (``bench optim``).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..allocator import retain_freed_memory
from ..engine import compute, coverage
from ..quantities import (
    KFAC,
    BatchDiagGGN,
    BatchDot,
    BatchGrad,
    BatchL2,
    DiagGGN,
    DiagHessian,
    GGNEigen,
    Grad,
    Quantity,
    SumGradSquared,
    Variance,
)
from .bench import OPTIMIZERS as BENCH_OPTIMIZERS
from .rundir import RunDirError, draw_dashboard, log_path, read_log
from .tasks import PROBLEMS, SMALL_TASKS, TASKS, Problem, make_problem
from .train import OPTIMIZERS, SCHEDULES, TrainConfig, resume, train

FIRST_ORDER_DEMO: tuple[Quantity, ...] = (
    Grad(),
    BatchGrad(),
    BatchL2(),
    BatchDot(),
    SumGradSquared(),
    Variance(),
)
SECOND_ORDER_DEMO: tuple[Quantity, ...] = (
    DiagGGN(mc_samples=1),
    BatchDiagGGN(mc_samples=1),
    KFAC(fisher_type="mc"),
    KFAC(fisher_type="empirical"),
    GGNEigen(mc_samples=1, top_k=8),
    DiagGGN(),
    KFAC(fisher_type="type-2"),
    DiagHessian(),
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _paired_times(
    candidate: Callable[[], object], baseline: Callable[[], object], reps: int, device: torch.device
) -> tuple[float, float]:
    """Median times of ``candidate`` and ``baseline``, measured alternately rep by rep."""

    def once(fn: Callable[[], object]) -> float:
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        return time.perf_counter() - start

    candidate(), baseline()
    pairs = [(once(candidate), once(baseline)) for _ in range(reps)]
    return statistics.median(c for c, _ in pairs), statistics.median(b for _, b in pairs)


def _label(q: Quantity) -> str:
    fields = {k: v for k, v in vars(q).items() if v is not None and k != "max_vectors"}
    defaults = {"kfac_approx": "expand", "bias": "joint", "mc_samples": 1}
    shown = [
        f"{k}={v!r}"
        for k, v in fields.items()
        if not (
            k in defaults
            and v == defaults[k]
            and not (k == "mc_samples" and not isinstance(q, KFAC))
        )
    ]
    return f"{q.key}({', '.join(shown)})"


def _first_sentence(err: BaseException) -> str:
    text = str(err).split(". ")[0]
    return text if len(text) < 90 else text[:87] + "..."


def _describe(value: object) -> str:
    if isinstance(value, dict) and value:
        first = next(iter(value.values()))
        if isinstance(first, torch.Tensor):
            return f"{len(value)} tensors"
        kinds = sorted({type(v).__name__ for v in value.values()})
        return f"{len(value)} blocks: " + ", ".join(kinds)
    return type(value).__name__


def _reference_per_sample(p: Problem, count: int) -> dict[str, torch.Tensor]:
    """torch.func per-sample gradients of the first ``count`` samples, with the batch's loss
    normalization (mean over N samples: the per-sample loss is divided by N)."""
    from torch.func import functional_call, grad, vmap

    params = {n: t.detach() for n, t in p.model.named_parameters()}
    N = p.X.shape[0]

    def loss_one(prm: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = functional_call(p.model, prm, (x.unsqueeze(0),))
        return p.loss_fn(out, y.unsqueeze(0)) / N

    return vmap(grad(loss_one), in_dims=(None, 0, 0))(params, p.X[:count], p.y[:count])


Row = tuple[str, float, float, str, str]  # name, seconds, baseline seconds, shape, note


def demo(problem: str, device: str, reps: int, threads: int | None) -> int:
    """``beyondgrad demo``: every quantity on a built-in problem, timed against one plain
    forward+backward, per-sample gradients checked against torch.func.

    Args:
        problem: one of :data:`~beyondgrad.app.tasks.PROBLEMS`.
        device: torch device.
        reps: timing repetitions per row (medians reported).
        threads: torch CPU threads (None: torch's choice).

    Returns:
        The exit status: 0 if the per-sample gradients match torch.func, else 1.
    """
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    p = make_problem(problem).to(dev)
    print(
        f"beyondgrad {__version__} demo: problem '{problem}' ({p.num_params:,} parameters, "
        f"batch {p.X.shape[0]}), torch {torch.__version__}, {dev}, {torch.get_num_threads()} "
        "threads"
    )
    res = compute(p.model, p.loss_fn, p.X, p.y, *FIRST_ORDER_DEMO)
    check = min(4, p.X.shape[0])
    ref = _reference_per_sample(p, check)
    err = max(
        float((res[BatchGrad][n][:check] - r).norm() / r.norm().clamp_min(1e-30))
        for n, r in ref.items()
    )
    rows = _demo_rows(p, res, reps, dev)
    print(f"\n{'quantity':<40} {'time [ms]':>10} {'x fwd+bwd':>10}  {'first tensor':<16} notes")
    for name, t, b, shape, note in rows:
        if t != t:  # refused
            print(f"{name:<40} {'-':>10} {'-':>10}  {shape:<16} {note}")
            continue
        print(f"{name:<40} {t * 1e3:>10.1f} {t / b:>10.2f}  {shape:<16} {note}")
    cov = coverage(p.model, p.loss_fn, p.X, p.y).by_rule()
    print(
        "\nrules serving the parameters: " + ", ".join(f"{k}: {v}" for k, v in sorted(cov.items()))
    )
    print(
        f"per-sample gradients of {check} samples vs torch.func (vmap(grad)): "
        f"max relative error {err:.2e}"
    )
    return 0 if err < 1e-3 else 1


def _demo_rows(p: Problem, res: Any, reps: int, dev: torch.device) -> list[Row]:
    """The demo's table: one row per quantity (refusals with NaN time), the baseline first."""
    model, loss_fn, X, y = p.model, p.loss_fn, p.X, p.y

    def plain() -> None:
        model.zero_grad(set_to_none=True)
        loss_fn(model(X), y).backward()

    rows: list[Row] = []
    for q in FIRST_ORDER_DEMO:
        t, b = _paired_times(lambda q=q: compute(model, loss_fn, X, y, q), plain, reps, dev)
        first = next(iter(res[q].values()))
        rows.append((q.key, t, b, "x".join(map(str, first.shape)), f"{len(res[q])} tensors"))
    t, b = _paired_times(lambda: compute(model, loss_fn, X, y, *FIRST_ORDER_DEMO), plain, reps, dev)
    rows.append(("first-order, all in one call", t, b, "-", "one forward, one backward"))
    gen = torch.Generator(device=dev).manual_seed(0)
    for q in SECOND_ORDER_DEMO:
        label = _label(q)
        try:
            value = compute(model, loss_fn, X, y, q, generator=gen)[q]
        except (RuntimeError, NotImplementedError) as refusal:
            rows.append((label, float("nan"), 1.0, "-", "refused: " + _first_sentence(refusal)))
            continue
        t, b = _paired_times(
            lambda q=q: compute(model, loss_fn, X, y, q, generator=gen), plain, reps, dev
        )
        rows.append((label, t, b, "-", _describe(value)))
    model.zero_grad(set_to_none=True)
    base = statistics.median(b for _, t, b, _, _ in rows if t == t)
    return [("plain forward+backward", base, base, "-", "the reference"), *rows]


def _coverage(problem: str) -> int:
    p = make_problem(problem)
    print(coverage(p.model, p.loss_fn, p.X, p.y))
    return 0


# -- argument types -----------------------------------------------------------------------------
def _number(kind: type, accept: Callable[[float], bool], what: str) -> Callable[[str], Any]:
    """An argparse type: ``kind(text)`` that ``accept`` admits, else a one-line error."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return parse


_positive_int = _number(int, lambda v: v >= 1, "a positive integer")
_nonnegative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
_positive_float = _number(float, lambda v: math.isfinite(v) and v > 0, "a positive finite number")
_nonnegative_float = _number(float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")


def _device(text: str) -> str:
    """An argparse type: a torch device that exists on this machine."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a torch device (e.g. cpu, cuda, cuda:1)"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: CUDA is not available on this machine")
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise argparse.ArgumentTypeError(f"{text}: not usable here ({reason})") from None
    return text


# -- the parser ---------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The ``beyondgrad`` argument parser (sub-commands demo, coverage, train, plot, bench)."""
    parser = argparse.ArgumentParser(
        prog="beyondgrad",
        description="More than the gradient for any PyTorch model: per-sample gradients, their "
        "statistics and curvature, in about one backward pass.",
    )
    parser.add_argument("--version", action="version", version=f"beyondgrad {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_demo(sub)
    p_cov = sub.add_parser("coverage", help="which rule serves each parameter of a problem")
    p_cov.add_argument("--problem", choices=PROBLEMS, default="transformer")
    _add_train(sub)
    p_plot = sub.add_parser(
        "plot",
        help="redraw a run's dashboard from its log",
        description="Redraw the Cockpit dashboard (PNG and SVG) from RUN_DIR/cockpit.jsonl "
        "(a truncated last line is skipped).",
    )
    p_plot.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (or a cockpit.jsonl)")
    p_plot.add_argument("--out", default=None, help="image path (default: RUN_DIR/dashboard.png)")
    _add_bench(sub)
    return parser


def _add_demo(sub: Any) -> None:
    p_demo = sub.add_parser(
        "demo",
        help="compute every quantity on a built-in problem and print costs",
        description="Compute every available quantity for a built-in model on generated data "
        "(nothing is downloaded) and print each one's cost relative to one plain "
        "forward+backward, with a check of the per-sample gradients against torch.func.",
    )
    p_demo.add_argument(
        "--problem", choices=PROBLEMS, default="transformer",
        help="built-in problem (default: transformer)",
    )  # fmt: skip
    p_demo.add_argument("--device", type=_device, default="cpu", help="torch device (default: cpu)")
    p_demo.add_argument(
        "--reps", type=_positive_int, default=5,
        help="timing repetitions per row, median reported (default: 5)",
    )  # fmt: skip
    p_demo.add_argument(
        "--threads", type=_positive_int, default=None,
        help="torch CPU threads (default: torch's choice)",
    )  # fmt: skip


def _add_train(sub: Any) -> None:
    p = sub.add_parser(
        "train",
        help="train a built-in task with the Cockpit attached (the main job)",
        description="Train a built-in task on built-in data (nothing is downloaded) with a "
        "chosen optimizer and the Cockpit attached; writes a run directory with config.json, "
        "cockpit.jsonl, checkpoint.pt, dashboard.png/.svg and summary.json (atomically). "
        "Ctrl-C stops after the current step and checkpoints; --resume RUN_DIR continues.",
    )
    p.add_argument("--task", choices=TASKS, default="digits-mlp", help="(default: digits-mlp)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="kfac", help="(default: kfac)")
    p.add_argument(
        "--cockpit", choices=("economy", "business", "full", "none"), default="economy",
        help="instrument preset (default: economy)",
    )  # fmt: skip
    p.add_argument("--steps", type=_positive_int, default=None, help="(default: 300)")
    p.add_argument(
        "--lr", type=_positive_float, default=None, help="learning rate (default: per optimizer)"
    )
    p.add_argument(
        "--lr-schedule", choices=SCHEDULES, default="constant", help="(default: constant)"
    )
    p.add_argument("--warmup", type=_nonnegative_int, default=0, help="linear warm-up steps")
    p.add_argument("--weight-decay", type=_nonnegative_float, default=0.0)
    p.add_argument(
        "--track-every", type=_positive_int, default=1, help="cockpit schedule (default: 1)"
    )
    p.add_argument("--eval-every", type=_positive_int, default=25)
    p.add_argument(
        "--plot-every", type=_positive_int, default=100, help="redraw the dashboard every k steps"
    )
    p.add_argument(
        "--checkpoint-every", type=_positive_int, default=100,
        help="write checkpoint.pt every k steps (and at the end, on Ctrl-C, on divergence)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", type=_device, default="cpu", help="torch device (default: cpu)")
    p.add_argument("--out", default=None, help="run directory (default: runs/TASK-OPT-TIME)")
    p.add_argument(
        "--overwrite", action="store_true", help="replace the run files of a non-empty --out"
    )
    p.add_argument(
        "--resume", metavar="RUN_DIR", default=None,
        help="continue the run in RUN_DIR from its checkpoint, with its own settings (only "
        "--steps and --quiet may be given too)",
    )  # fmt: skip
    p.add_argument("--tensorboard", action="store_true", help="also write TensorBoard scalars")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_bench(sub: Any) -> None:
    p_bench = sub.add_parser("bench", help="regenerate a benchmark table")
    bench_sub = p_bench.add_subparsers(dest="bench", metavar="BENCHMARK", required=True)
    p = bench_sub.add_parser(
        "optim",
        help="optimizers' time to target (AlgoPerf-style) vs AdamW, Muon, SOAP",
        description="Random search with the same budget for every optimizer, then several "
        "seeds of the best configuration; median wall-clock time to each task's target, "
        "ms/step, state memory, divergences and the geometric mean of time ratios to AdamW "
        "(see beyondgrad.app.bench).",
    )
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=list(SMALL_TASKS))
    p.add_argument(
        "--optimizers", nargs="+", choices=BENCH_OPTIMIZERS, default=list(BENCH_OPTIMIZERS)
    )
    p.add_argument("--trials", type=_positive_int, default=4, help="random-search trials")
    p.add_argument("--seeds", type=_positive_int, default=2, help="seeds of the best")
    p.add_argument(
        "--max-seconds", type=_positive_float, default=20.0, help="training-time budget per run"
    )
    p.add_argument("--device", type=_device, default="cpu", help="torch device (default: cpu)")
    p.add_argument("--threads", type=_positive_int, default=None)
    p.add_argument(
        "--out", default=None,
        help="markdown file (default: benchmarks/results/optim_<device type>.md; a .json with "
        "the raw numbers is written beside it)",
    )  # fmt: skip


# -- the commands -------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``beyondgrad`` command with ``argv`` (default: ``sys.argv[1:]``); returns the
    exit status (bad arguments exit with status 2 and a one-line message)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "demo":
        return demo(args.problem, args.device, args.reps, args.threads)
    if args.command == "train":
        return _train(parser, args)
    if args.command == "plot":
        return _plot(parser, args)
    if args.command == "bench":
        return _bench_optim(args)
    return _coverage(args.problem)


_RESUME_KEEPS = {"steps", "quiet", "resume", "command"}


def _train(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    # a training loop repeats the same CPU allocations: keep freed blocks for the next step
    # instead of faulting fresh pages in every step (process-wide; see bg.retain_freed_memory)
    retain_freed_memory()
    try:
        if args.resume is not None:
            defaults = vars(parser.parse_args(["train"]))
            given = [
                k for k, v in vars(args).items() if k not in _RESUME_KEEPS and v != defaults[k]
            ]
            if given:
                parser.error(
                    "--resume continues a run with the settings in its config.json; only "
                    f"--steps and --quiet may be given with it, not --{given[0].replace('_', '-')}"
                )
            summary = resume(args.resume, steps=args.steps, progress=not args.quiet)
        else:
            # the options carry the config's field names (``--quiet`` negates progress)
            names = {f.name for f in fields(TrainConfig)} - {"progress", "steps"}
            given = {k: v for k, v in vars(args).items() if k in names}
            config = TrainConfig(**given, steps=args.steps or 300, progress=not args.quiet)
            summary = train(config)
    except (RunDirError, ImportError) as err:
        parser.error(str(err))
    _report(summary)
    return {"finished": 0, "diverged": 1}.get(summary["status"], 130)


def _report(summary: dict[str, Any]) -> None:
    metric = next(k for k in summary if k.startswith("val"))
    reached = summary["target_reached"]
    status = summary["status"]
    if status != "finished":
        why = (
            f"diverged at {summary['divergence']} (lower --lr)" if status == "diverged" else status
        )
        print(f"stopped at step {summary['steps']} of {summary['planned_steps']}: {why}")
    print(
        f"{summary['task']} with {summary['optimizer']}: {metric} {summary[metric]:.4f} "
        f"(target {summary['target']}"
        + (
            f", reached at step {reached['step']} after {reached['seconds']:.1f} s"
            if reached
            else ", not reached"
        )
        + f"), final loss {summary['final_loss']:.4g}, {summary['ms_per_step']:.1f} ms/step"
    )
    print(
        f"run directory: {summary['out']} (config.json, cockpit.jsonl, checkpoint.pt, "
        "dashboard.png, summary.json)"
    )
    if status == "interrupted" and summary["checkpoint_step"] is not None:
        print(
            f"checkpoint at step {summary['checkpoint_step']}; continue with: "
            f"beyondgrad train --resume {summary['out']}"
        )


def _plot(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    try:
        records = read_log(args.run_dir)
    except RunDirError as err:
        parser.error(str(err))
    log = log_path(args.run_dir)
    out = Path(args.out) if args.out else log.parent / "dashboard.png"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        written = draw_dashboard(records, out, title=f"Cockpit: {args.run_dir}")
    except OSError as err:
        parser.error(f"cannot write {out}: {err.strerror or err}")
    for path in written:
        print(f"wrote {path}")
    return 0


def _bench_optim(args: argparse.Namespace) -> int:
    import json

    from .bench import benchmark, render

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out or f"benchmarks/results/optim_{torch.device(args.device).type}.md")
    results = benchmark(
        tuple(args.tasks),
        tuple(args.optimizers),
        args.trials,
        args.seeds,
        args.max_seconds,
        args.device,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(results))
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    print(render(results))
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
