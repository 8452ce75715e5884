"""PINN optimizers side by side at the same CPU-time budget (float64, CPU, one thread).

Problems (manufactured solutions, :mod:`beyondgrad.pinn`): Poisson 2d with the paper's
networks of 257 (2-64-1) and 9,873 (2-64-64-48-48-1) parameters, heat (1+1)d (2-64-1) and heat
(4+1)d (5-64-1, 449 parameters), tanh activations, fixed interior and boundary points.
Methods: Adam (the best learning rate of a small grid; every grid point gets the full budget),
torch.optim.LBFGS (strong Wolfe line search), ENGD (exact Gramian; up to 3,000 parameters),
KFAC (line search on a log grid, momentum), KFAC-auto (Martens' automatic learning rate and
momentum, Levenberg-Marquardt damping) and KFAC-CG (KFAC-auto with a few KFAC-preconditioned
conjugate-gradient iterations on the exact Gauss-Newton system per step). Reported: the final
relative L2 error on test points, the final loss and the steps done in the budget.

    python benchmarks/pinn.py --budget 60      # the table in benchmarks/results/pinn_cpu.md
    python benchmarks/pinn.py --quick          # a smoke run (1 s per method, temporary output)
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import beyondgrad as bg

pinn = bg.pinn
RESULTS = Path(__file__).resolve().parent / "results"
ADAM_LRS = (1e-4, 1e-3, 1e-2)
ENGD_MAX_PARAMS = 3000
CG_STEPS = 6
#: KFAC-CG-layer's fixed Kronecker-factor damping (the other auto rows damp the factors by the
#: adapted damping, KFACPINN's default). Seed 0 at 25 s, errors with the adapted damping over
#: this one: per-layer coefficients 19x (Poisson 2d, D=257), 5.6x (D=9873), 1.6x (heat 1+1d),
#: 0.9x (heat 4+1d); one global coefficient on Poisson D=9873 0.07x with CG (0.03x seed 1),
#: 0.26x without
LAYER_FACTOR_DAMPING = 1e-5


@dataclass(frozen=True)
class Case:
    """One problem: its PDE, network widths and point counts."""

    name: str
    pde: Callable[[], pinn.PDE]
    widths: tuple[int, ...]
    n: int
    n_b: int


CASES = (
    Case("poisson 2d, D=257", lambda: pinn.poisson(2), (64,), 900, 120),
    Case("poisson 2d, D=9873", lambda: pinn.poisson(2), (64, 64, 48, 48), 900, 120),
    Case("heat 1+1d, D=257", lambda: pinn.heat(1), (64,), 900, 120),
    Case("heat 4+1d, D=449", lambda: pinn.heat(4), (64,), 3000, 500),
)


def make_model(d: int, widths: tuple[int, ...], seed: int = 0) -> nn.Sequential:
    """A tanh MLP ``d -> widths -> 1`` (float64), initialized from ``seed``."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in zip((d, *widths), widths):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(widths[-1], 1)).double()


def make_loss(case: Case, quick: bool, seed: int = 0) -> tuple[pinn.PINNLoss, torch.Tensor]:
    """The loss on fixed points and the test points (points and initialization from ``seed``)."""
    pde, gen = case.pde(), torch.Generator().manual_seed(seed)
    scale = 4 if quick else 1
    X, X_b = pde.sample_interior(case.n // scale, gen), pde.sample_boundary(case.n_b // scale, gen)
    X_test = pde.sample_interior(2000 if quick else 20000, gen)
    return pinn.PINNLoss(make_model(pde.dim, case.widths, seed), pde, X, X_b), X_test


def stepper(method: str, loss: pinn.PINNLoss, lr: float | None) -> Callable[[], int]:
    """A function doing one step of ``method`` and returning the iterations it made."""
    params = list(loss.model.parameters())
    if method in ("adam", "lbfgs"):
        opt: Any = (
            torch.optim.Adam(params, lr=lr)
            if method == "adam"
            else torch.optim.LBFGS(params, lr=1.0, line_search_fn="strong_wolfe")
        )

        def closure() -> torch.Tensor:  # the closed-form gradient (as fast as KFAC's pass)
            opt.zero_grad()
            return loss.backward()

        def torch_step() -> int:
            before = opt.state[params[0]].get("n_iter", 0) if method == "lbfgs" else 0
            opt.step(closure)
            return opt.state[params[0]]["n_iter"] - before if method == "lbfgs" else 1

        return torch_step
    ours: Any = {
        "engd": lambda: pinn.ENGD(loss),
        "kfac": lambda: pinn.KFACPINN(loss, damping=1e-6),
        "kfac-auto": lambda: pinn.KFACPINN(
            loss, damping=1e-3, step_rule="auto", lazy=True, update_every=2
        ),
        "kfac-cg": lambda: pinn.KFACPINN(
            loss, damping=1e-3, step_rule="auto", lazy=True, update_every=2, cg_steps=CG_STEPS
        ),
        "kfac-cg-layer": lambda: pinn.KFACPINN(
            loss,
            damping=1e-3,
            step_rule="auto",
            lazy=True,
            update_every=2,
            cg_steps=CG_STEPS,
            per_layer=True,
            factor_damping=LAYER_FACTOR_DAMPING,
        ),
    }[method]()

    def our_step() -> int:
        ours.step()
        return 1

    our_step.finish = getattr(ours, "finish", lambda: None)  # type: ignore[attr-defined]
    return our_step


def run(
    case: Case, method: str, lr: float | None, budget: float, quick: bool, seed: int = 0
) -> dict[str, Any]:
    """Train from the seeded points and initialization for ``budget`` seconds."""
    loss, X_test = make_loss(case, quick, seed)
    step, steps, status = stepper(method, loss, lr), 0, "ok"
    start, cpu = time.perf_counter(), time.process_time()
    try:  # the budget is process CPU time (one torch thread): other load barely shifts it
        while time.process_time() - cpu < budget:
            steps += step()
        getattr(step, "finish", lambda: None)()  # judge a pending lazy step (KFAC-auto)
    except Exception as exc:  # a diverged or failed run is a row, not a crash
        status = f"error: {type(exc).__name__}: {exc}"[:200]
    with torch.no_grad():
        final = float(loss.value())
    return {
        "problem": case.name,
        "method": method if lr is None else f"{method} (lr={lr:g})",
        "params": sum(p.numel() for p in loss.model.parameters()),
        "steps": steps,
        "seconds": round(time.perf_counter() - start, 2),
        "cpu_seconds": round(time.process_time() - cpu, 2),
        "loss": final,
        "rel_l2": pinn.relative_l2_error(loss.model, loss.pde, X_test),
        "status": status,
        "seed": seed,
    }


def _key(r: dict[str, Any]) -> float:
    return r["rel_l2"] if r["rel_l2"] == r["rel_l2"] else float("inf")  # NaN: last


def median_row(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row for a method's runs over the seeds: the run with the median relative error
    (the upper median for an even count), every seed's error and steps kept."""
    ranked = sorted(runs, key=_key)
    mid = ranked[len(ranked) // 2]
    failed = [r["status"] for r in runs if r["status"] != "ok"]
    return mid | {
        "rel_l2_seeds": [r["rel_l2"] for r in runs],
        "steps_seeds": [r["steps"] for r in runs],
        "status": "ok" if not failed else f"{len(failed)} of {len(runs)} failed: {failed[0]}",
    }


METHODS = ("adam", "lbfgs", "engd", "kfac", "kfac-auto", "kfac-cg", "kfac-cg-layer")


def run_case(
    case: Case, budget: float, quick: bool, seeds: int = 1, methods: tuple[str, ...] = METHODS
) -> list[dict[str, Any]]:
    """``methods`` on one problem, ``seeds`` runs each (points and initialization from seeds
    ``0..seeds-1``), one row per method: the median run (Adam: the learning rate of its grid
    with the best median)."""
    rows = []

    def median(method: str, lr: float | None) -> dict[str, Any]:
        row = median_row([run(case, method, lr, budget, quick, s) for s in range(seeds)])
        print(f"  {case.name} {row['method']}: {row['rel_l2']:.3g} {row['rel_l2_seeds']}")
        return row

    if "adam" in methods:
        adam = [median("adam", lr) for lr in ADAM_LRS]
        rows.append(min(adam, key=_key) | {"tried": [(r["method"], r["rel_l2"]) for r in adam]})
    params = sum(p.numel() for p in make_model(case.pde().dim, case.widths).parameters())
    for method in (m for m in methods if m != "adam"):
        if method == "engd" and params > ENGD_MAX_PARAMS:
            rows.append({"problem": case.name, "method": "engd", "status": "skipped (P > 3000)"})
            continue
        rows.append(median(method, None))
    return rows


def render(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """The markdown table."""
    lines = [
        "# PINN optimizers at the same CPU-time budget (CPU, float64)",
        "",
        f"Budget {meta['budget']} s of process CPU time (`time.process_time()`, one torch "
        f"thread) per method and problem, torch {meta['torch']}, {meta['threads']} thread, "
        f"{meta['machine']}. Command: `{meta['command']}`.",
        "Adam: best learning rate of " + ", ".join(f"{lr:g}" for lr in ADAM_LRS) + " (each run "
        "gets the full budget). LBFGS: lr 1, strong Wolfe, history 100. ENGD: damping 1e-10, "
        "line search on 2^0..2^-30. KFAC: damping 1e-6, EMA 0.95, momentum 0.3, same line "
        "search. KFAC-auto: initial damping 1e-3 (Levenberg-Marquardt adapted), EMA 0.95, factors "
        "and their Kronecker-sum inverse refreshed every 2 steps, the "
        "loss change judged at the next step's evaluation (`lazy=True`: the same steps as the "
        "default eager check, one forward pass fewer per step). "
        f"KFAC-CG: KFAC-auto whose direction is {CG_STEPS} conjugate-gradient iterations on the "
        "damped Gauss-Newton system with the exact Gramian (Jacobian-vector products), "
        "preconditioned by the KFAC inverse (`cg_steps`; one iteration is KFAC-auto's). "
        "KFAC-CG-layer: the same with the automatic learning rate and momentum per layer "
        f"(`per_layer=True`) and the Kronecker factors damped by a fixed {LAYER_FACTOR_DAMPING:g} "
        "(`factor_damping`) instead of the adapted damping. "
        "Every method gets residuals, layer inputs and output gradients from the closed-form "
        "forward Laplacian and backward (`bg.pinn.fused`): Adam and LBFGS through "
        "`PINNLoss.backward()` (the same gradient as autograd through `taylor_forward`, "
        "faster). "
        "Untuned defaults except Adam's learning rate. Interior and boundary points are drawn "
        "once and kept (in an exploratory 25 s run, fresh points every step gave KFAC-auto a "
        "relative error of 7.1e-2 instead of 1.5e-2 on heat (4+1)d).",
        "",
        f"Seeds: {meta.get('seeds', 1)} (interior/boundary points and initialization); each row "
        "is the run with the median relative L2 error, its steps and final loss; the last "
        "column lists every seed's error.",
        "",
        "| problem | method | params | steps | final loss | rel. L2 error | every seed | status |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "rel_l2" not in r:
            lines.append(f"| {r['problem']} | {r['method']} | | | | | | {r['status']} |")
            continue
        seeds = ", ".join(f"{e:.2g}" for e in r.get("rel_l2_seeds", [r["rel_l2"]]))
        lines.append(
            f"| {r['problem']} | {r['method']} | {r['params']} | {r['steps']} | "
            f"{r['loss']:.3g} | {r['rel_l2']:.3g} | {seeds} | {r['status']} |"
        )
    lines += ["", *ratio_lines(rows)]
    return "\n".join(lines) + "\n"


def ratio_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Per problem: the median error of Adam and LBFGS over KFAC-CG's and KFAC-auto's (how many
    times lower the KFAC error is), and KFAC-CG's over ENGD's where ENGD ran."""
    out = [
        "| problem | Adam / KFAC-CG | LBFGS / KFAC-CG | Adam / KFAC-auto | LBFGS / KFAC-auto | "
        "KFAC-CG / ENGD | LBFGS / KFAC-CG-layer | KFAC-CG-layer / ENGD |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for problem in dict.fromkeys(r["problem"] for r in rows):
        err = {
            r["method"].split(" ")[0]: r["rel_l2"]
            for r in rows
            if r["problem"] == problem and "rel_l2" in r
        }

        def ratio(a: str, b: str, err: dict[str, float] = err) -> str:
            return f"{err[a] / err[b]:.3g}" if a in err and b in err and err[b] > 0 else "n/a"

        out.append(
            f"| {problem} | {ratio('adam', 'kfac-cg')} | {ratio('lbfgs', 'kfac-cg')} | "
            f"{ratio('adam', 'kfac-auto')} | {ratio('lbfgs', 'kfac-auto')} | "
            f"{ratio('kfac-cg', 'engd')} | {ratio('lbfgs', 'kfac-cg-layer')} | "
            f"{ratio('kfac-cg-layer', 'engd')} |"
        )
    return out


def merge_rows(
    path: Path, rows: list[dict[str, Any]], methods: tuple[str, ...], meta: dict[str, Any]
) -> list[dict[str, Any]]:
    """With a subset of the methods: the new rows in place of (or after) the same problem's
    and method's rows of the results at ``path``, the others kept (same budget and seeds only;
    a mismatch raises). All methods or no file: ``rows``."""
    if set(methods) == set(METHODS) or not path.exists():
        return rows
    old = json.loads(path.read_text())
    for key in ("budget", "seeds"):
        if old["meta"].get(key, 1) != meta[key]:
            raise SystemExit(f"{path}: {key} {old['meta'].get(key, 1)} != {meta[key]}; rerun all")
    meta["command"] = f"{old['meta']['command']}`, then `{meta['command']}"
    new = {(r["problem"], r["method"].split(" ")[0]): r for r in rows}
    merged = [new.pop((r["problem"], r["method"].split(" ")[0]), r) for r in old["rows"]]
    for r in new.values():  # rows the old file did not have: after their problem's rows
        last = max((i for i, m in enumerate(merged) if m["problem"] == r["problem"]), default=-1)
        if last >= 0:
            merged.insert(last + 1, r)
        else:
            merged.append(r)
    return merged


def main(argv: list[str] | None = None) -> Path:
    """Parse the flags, run every problem, write the markdown and JSON results."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budget", type=float, default=None, help="CPU seconds per method (default 60)")
    p.add_argument("--quick", "--smoke", action="store_true", help="1 s budget, fewer points")
    p.add_argument("--out", type=Path, default=None, help="markdown output (JSON next to it)")
    p.add_argument("--problems", nargs="*", default=None, help="substrings of problem names")
    p.add_argument("--seeds", type=int, default=1, help="runs per method (median reported)")
    p.add_argument(
        "--methods", nargs="*", default=list(METHODS), choices=METHODS,
        help="methods to run; the rows of the others are kept from an existing JSON at --out",
    )  # fmt: skip
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    budget = args.budget or (1.0 if args.quick else 60.0)
    out = args.out or (
        Path(tempfile.mkdtemp()) / "pinn_cpu.md" if args.quick else RESULTS / "pinn_cpu.md"
    )
    cases = [c for c in CASES if not args.problems or any(s in c.name for s in args.problems)]
    meta = {
        "budget": budget,
        "quick": args.quick,
        "seeds": args.seeds,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "command": "python benchmarks/pinn.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    methods = tuple(args.methods)
    rows = [r for case in cases for r in run_case(case, budget, args.quick, args.seeds, methods)]
    rows = merge_rows(out.with_suffix(".json"), rows, methods, meta)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    out.write_text(render(meta, rows))
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
