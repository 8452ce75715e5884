"""The ``beyondgrad`` console command.

``beyondgrad demo``      every quantity on a built-in problem, with its cost relative to one
                         plain forward+backward, checked against torch.func.
``beyondgrad coverage``  which rule serves each parameter of a built-in problem.
``beyondgrad train``     the main job: a built-in task trained with the Cockpit attached.
``beyondgrad plot``      redraw a run's Cockpit dashboard from its log.
``beyondgrad bench``     regenerate a benchmark table (``bench optim``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from . import __version__
from .engine import compute, coverage
from .optim_bench import OPTIMIZERS
from .problems import PROBLEMS, Problem, make_problem
from .quantities import (
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
from .tasks import TASKS
from .train import OPTIMIZERS as TRAIN_OPTIMIZERS

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


def demo(problem: str, device: str, reps: int, threads: int | None) -> int:
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    p = make_problem(problem).to(dev)
    model, loss_fn, X, y = p.model, p.loss_fn, p.X, p.y
    print(
        f"beyondgrad {__version__} demo: problem '{problem}' ({p.num_params:,} parameters, "
        f"batch {X.shape[0]}), torch {torch.__version__}, {dev}, {torch.get_num_threads()} threads"
    )

    def plain() -> None:
        model.zero_grad(set_to_none=True)
        loss_fn(model(X), y).backward()

    res = compute(model, loss_fn, X, y, *FIRST_ORDER_DEMO)
    check = min(4, X.shape[0])
    ref = _reference_per_sample(p, check)
    err = max(
        float((res[BatchGrad][n][:check] - r).norm() / r.norm().clamp_min(1e-30))
        for n, r in ref.items()
    )

    rows = []
    bases = []
    for q in FIRST_ORDER_DEMO:
        t, b = _paired_times(lambda q=q: compute(model, loss_fn, X, y, q), plain, reps, dev)
        first = next(iter(res[q].values()))
        rows.append((q.key, t, b, "x".join(map(str, first.shape)), f"{len(res[q])} tensors"))
        bases.append(b)
    t, b = _paired_times(lambda: compute(model, loss_fn, X, y, *FIRST_ORDER_DEMO), plain, reps, dev)
    rows.append(("first-order, all in one call", t, b, "-", "one forward, one backward"))
    bases.append(b)
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
        bases.append(b)
    model.zero_grad(set_to_none=True)
    base = statistics.median(bases)
    rows.insert(0, ("plain forward+backward", base, base, "-", "the reference"))

    print(f"\n{'quantity':<40} {'time [ms]':>10} {'x fwd+bwd':>10}  {'first tensor':<16} notes")
    for name, t, b, shape, note in rows:
        if t != t:  # refused
            print(f"{name:<40} {'-':>10} {'-':>10}  {shape:<16} {note}")
            continue
        print(f"{name:<40} {t * 1e3:>10.1f} {t / b:>10.2f}  {shape:<16} {note}")
    cov = coverage(model, loss_fn, X, y).by_rule()
    print(
        "\nrules serving the parameters: " + ", ".join(f"{k}: {v}" for k, v in sorted(cov.items()))
    )
    print(
        f"per-sample gradients of {check} samples vs torch.func (vmap(grad)): "
        f"max relative error {err:.2e}"
    )
    return 0 if err < 1e-3 else 1


def _coverage(problem: str) -> int:
    p = make_problem(problem)
    print(coverage(p.model, p.loss_fn, p.X, p.y))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="beyondgrad",
        description="More than the gradient for any PyTorch model: per-sample gradients, their "
        "statistics and curvature, in about one backward pass.",
    )
    parser.add_argument("--version", action="version", version=f"beyondgrad {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p_demo = sub.add_parser(
        "demo",
        help="compute every quantity on a built-in problem and print costs",
        description="Compute every available quantity for a built-in model on generated data "
        "(nothing is downloaded) and print each one's cost relative to one plain "
        "forward+backward, with a check of the per-sample gradients against torch.func.",
    )
    p_demo.add_argument(
        "--problem",
        choices=PROBLEMS,
        default="transformer",
        help="built-in problem (default: transformer)",
    )
    p_demo.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p_demo.add_argument(
        "--reps",
        type=_positive_int,
        default=5,
        help="timing repetitions per row, median reported (default: 5)",
    )
    p_demo.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help="torch CPU threads (default: torch's choice)",
    )
    p_cov = sub.add_parser("coverage", help="which rule serves each parameter of a problem")
    p_cov.add_argument("--problem", choices=PROBLEMS, default="transformer")
    p_train = sub.add_parser(
        "train",
        help="train a built-in task with the Cockpit attached (the main job)",
        description="Train a built-in task on built-in data (nothing is downloaded) with a "
        "chosen optimizer and the Cockpit attached; writes a run directory with config.json, "
        "cockpit.jsonl, dashboard.png/.svg and summary.json.",
    )
    p_train.add_argument(
        "--task", choices=TASKS, default="digits-mlp", help="(default: digits-mlp)"
    )
    p_train.add_argument(
        "--optimizer", choices=TRAIN_OPTIMIZERS, default="kfac", help="(default: kfac)"
    )
    p_train.add_argument(
        "--cockpit",
        choices=("economy", "business", "full", "none"),
        default="economy",
        help="instrument preset (default: economy)",
    )
    p_train.add_argument("--steps", type=_positive_int, default=300, help="(default: 300)")
    p_train.add_argument(
        "--lr", type=_positive_float, default=None, help="learning rate (default: per optimizer)"
    )
    p_train.add_argument("--weight-decay", type=_nonnegative_float, default=0.0)
    p_train.add_argument(
        "--track-every", type=_positive_int, default=1, help="cockpit schedule (default: 1)"
    )
    p_train.add_argument("--eval-every", type=_positive_int, default=25)
    p_train.add_argument(
        "--plot-every",
        type=_positive_int,
        default=100,
        help="redraw the dashboard every k tracked steps",
    )
    p_train.add_argument("--seed", type=int, default=0)
    p_train.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p_train.add_argument("--out", default=None, help="run directory (default: runs/TASK-OPT-TIME)")
    p_train.add_argument(
        "--tensorboard", action="store_true", help="also write TensorBoard scalars"
    )
    p_train.add_argument("--quiet", action="store_true", help="no progress bar")
    p_plot = sub.add_parser(
        "plot",
        help="redraw a run's dashboard from its log",
        description="Redraw the Cockpit dashboard (PNG and SVG) from RUN_DIR/cockpit.jsonl.",
    )
    p_plot.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (or a cockpit.jsonl)")
    p_plot.add_argument("--out", default=None, help="image path (default: RUN_DIR/dashboard.png)")
    p_bench = sub.add_parser("bench", help="regenerate a benchmark table")
    bench_sub = p_bench.add_subparsers(dest="bench", metavar="BENCHMARK", required=True)
    p_optim = bench_sub.add_parser(
        "optim",
        help="optimizers' time to target (AlgoPerf-style) vs AdamW, Muon, SOAP",
        description="Random search with the same budget for every optimizer, then several "
        "seeds of the best configuration; median wall-clock time to each task's target, "
        "ms/step, state memory, divergences and the geometric mean of time ratios to AdamW "
        "(see beyondgrad.optim_bench).",
    )
    p_optim.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    p_optim.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS, default=list(OPTIMIZERS))
    p_optim.add_argument("--trials", type=_positive_int, default=4, help="random-search trials")
    p_optim.add_argument("--seeds", type=_positive_int, default=2, help="seeds of the best")
    p_optim.add_argument(
        "--max-seconds", type=float, default=20.0, help="training-time budget per run"
    )
    p_optim.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p_optim.add_argument("--threads", type=_positive_int, default=None)
    p_optim.add_argument(
        "--out",
        default=None,
        help="markdown file (default: benchmarks/results/optim_<device type>.md; a .json with "
        "the raw numbers is written beside it)",
    )
    return parser


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
_positive_float = _number(float, lambda v: v > 0, "a positive number")
_nonnegative_float = _number(float, lambda v: v >= 0, "a number >= 0")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "demo":
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            parser.error(f"--device {args.device}: CUDA is not available on this machine")
        return demo(args.problem, args.device, args.reps, args.threads)
    if args.command == "train":
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            parser.error(f"--device {args.device}: CUDA is not available on this machine")
        return _train(args)
    if args.command == "plot":
        return _plot(parser, args)
    if args.command == "bench":
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            parser.error(f"--device {args.device}: CUDA is not available on this machine")
        return _bench_optim(args)
    return _coverage(args.problem)


def _train(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from .train import TrainConfig, train

    # the subcommand's options carry the config's field names (``--quiet`` negates progress)
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    config = TrainConfig(**given, progress=not args.quiet)
    summary = train(config)
    metric = next(k for k in summary if k.startswith("val"))
    reached = summary["target_reached"]
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
        f"run directory: {summary['out']} (config.json, cockpit.jsonl, dashboard.png, summary.json)"
    )
    return 0


def _plot(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from pathlib import Path

    from .cockpit import draw, load

    try:
        records = load(args.run_dir)
    except FileNotFoundError as err:
        parser.error(str(err))
    run = Path(args.run_dir)
    out = Path(args.out) if args.out else (run if run.is_dir() else run.parent) / "dashboard.png"
    for path in draw(records, out, title=f"Cockpit: {run}"):
        print(f"wrote {path}")
    return 0


def _bench_optim(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from .optim_bench import benchmark, render

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
