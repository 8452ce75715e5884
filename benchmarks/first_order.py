"""Benchmark beyondgrad's first-order quantities against one forward+backward and against peers.

One command regenerates ``benchmarks/results/first_order_{device}.md`` and a JSON file with the
raw numbers next to it::

    python benchmarks/first_order.py                 # CPU, all problems, all peers
    python benchmarks/first_order.py --device cuda   # GPU
    python benchmarks/first_order.py --quick --problems mlp --only-beyondgrad   # short run
    python benchmarks/first_order.py --smoke         # does it run (tiny, to a temp dir)

Rows: ``bg.compute`` of ``BatchGrad``, ``BatchL2``, ``Grad`` + ``BatchL2``, ``SumGradSquared``,
``Variance``, ``BatchDot``, ``Grad``, next to BackPACK, Opacus (``GradSampleModule``, ghost
clipping) and torch.func (``vmap(grad)``). Peers are optional imports: where one is missing,
its rows read "n/a". Set-up a user pays once per model (BackPACK ``extend``, Opacus wrapping)
is not timed; everything per step is (``with backpack(...)``, the parameter dict of
``torch.func``, all of ``bg.compute``). The protocol is that of ``harness.py``; agreement
checks compare beyondgrad with autograd, torch.func, BackPACK and Opacus (float32).
See ``benchmarks/README.md``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import Tensor

import beyondgrad as bg
import harness as h
from harness import Candidate, CellSpec, Check, Checks, Config, Problem, Setup

SCRIPT = h.Script(
    name="first_order",
    doc=__doc__,
    packages=("beyondgrad", "backpack-for-pytorch", "opacus", "numpy"),
    peers="skip the peers (BackPACK, Opacus, torch.func rows)",
)

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

BACKPACK_SAVEFIELDS = {
    "BatchGrad": "grad_batch",
    "BatchL2Grad": "batch_l2",
    "SumGradSquared": "sum_grad_squared",
    "Variance": "variance",
}

# --------------------------------------------------------------------------------------------
# Candidates
# --------------------------------------------------------------------------------------------


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
            return [f"PARTIAL: {got}/{n_params} parameter tensors"] if got < n_params else []

        return Candidate(call, inspect=inspect)

    return setup


def opacus_setup(norms: bool) -> Setup:
    """Opacus ``GradSampleModule`` (hooks); with ``norms`` also the per-sample L2 norms."""

    def setup(p: Problem) -> Candidate:
        from opacus import GradSampleModule

        gsm = GradSampleModule(p.model, batch_first=True, loss_reduction="mean")
        loss_fn, X, y = p.loss_fn, p.X, p.y
        params = h.trainable(p.model)

        def call() -> Tensor | None:
            gsm.zero_grad(set_to_none=True)
            loss_fn(gsm(X), y).backward()
            if not norms:
                return None
            sq = [q.grad_sample.flatten(1).pow(2).sum(1) for q in params]  # type: ignore[union-attr]
            return torch.stack(sq).sum(0).sqrt()

        notes = ["GradSampleModule wrapping once in set-up (not timed)"]
        if norms:
            notes.append("per-sample grads materialized, then norms")
        return Candidate(call, reset=lambda: gsm.zero_grad(set_to_none=True), notes=notes)

    return setup


def opacus_ghost_setup(p: Problem) -> Candidate:
    """Opacus ghost clipping: per-sample gradient norms without materializing the gradients."""
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    gsm = GradSampleModuleFastGradientClipping(
        p.model, batch_first=True, loss_reduction="mean", max_grad_norm=1.0, use_ghost_clipping=True
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


def func_setup(norms: bool) -> Setup:
    """torch.func per-sample gradients, optionally reduced to per-sample L2 norms."""

    def setup(p: Problem) -> Candidate:
        run = h.func_per_sample_fn(p)

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

NO_FUNC_API = "no API (reduce the per-sample gradients: at least its BatchGrad cost)"


def bp(extension: str, group: str) -> CellSpec:
    """A BackPACK first-order extension's cell."""
    notes = ("extend() once in set-up (not timed)",)
    setup = h.backpack_setup(extension, BACKPACK_SAVEFIELDS[extension], notes=notes)
    return h.peer_spec(group, "backpack", "backpack", setup, f"extensions.{extension}")


def ours(group: str, *quantities: type[bg.Quantity]) -> CellSpec:
    """beyondgrad's cell (``bg.compute`` of the quantities)."""
    return CellSpec(group, "beyondgrad", beyondgrad_setup(*quantities), "", False)


def cell_specs(cfg: Config) -> list[CellSpec]:
    """Every row, in table order. Peers without an implementation get a reason instead."""
    op = partial(h.peer_spec, module="opacus")
    specs = [
        h.BASELINE,
        ours("batch_grad", bg.BatchGrad),
        bp("BatchGrad", "batch_grad"),
        op("batch_grad", "opacus", setup=opacus_setup(norms=False), note="GradSampleModule"),
        CellSpec("batch_grad", "torch.func", func_setup(False), "vmap(grad) + functional_call"),
        ours("batch_l2", bg.BatchL2),
        bp("BatchL2Grad", "batch_l2"),
        op("batch_l2", "opacus ghost", setup=opacus_ghost_setup, note="ghost clipping norms"),
        op("batch_l2", "opacus", setup=opacus_setup(True), note="GradSampleModule, then norms"),
        CellSpec("batch_l2", "torch.func", func_setup(True), "vmap(grad), then norms"),
        ours("grad_batch_l2", bg.Grad, bg.BatchL2),
        h.na("grad_batch_l2", "backpack", "same call as its BatchL2 row (fills .grad too)"),
        h.na("grad_batch_l2", "opacus", "same call as its BatchL2 rows (fills .grad too)"),
        h.na(
            "grad_batch_l2",
            "torch.func",
            "no separate API (the gradient is the sum of its per-sample gradients)",
        ),
        ours("sgs", bg.SumGradSquared),
        bp("SumGradSquared", "sgs"),
        h.na("sgs", "opacus", "no API"),
        h.na("sgs", "torch.func", NO_FUNC_API),
        ours("variance", bg.Variance),
        bp("Variance", "variance"),
        h.na("variance", "opacus", "no API"),
        h.na("variance", "torch.func", NO_FUNC_API),
        ours("batch_dot", bg.BatchDot),
        h.na("batch_dot", "backpack", "no extension for per-sample gradient inner products"),
        h.na("batch_dot", "opacus", "no API"),
        h.na(
            "batch_dot",
            "torch.func",
            "no API (Gram of the per-sample gradients: at least its BatchGrad cost)",
        ),
        ours("grad", bg.Grad),
        h.na("grad", "peers", "plain autograd is the baseline row"),
    ]
    if cfg.only_beyondgrad:
        specs = [s for s in specs if not s.peer and s.library != "peers"]
    return specs


# --------------------------------------------------------------------------------------------
# Agreement checks
# --------------------------------------------------------------------------------------------


def agreement(problem: str, cfg: Config) -> dict[str, Any]:
    """Problem facts and the agreement checks (beyondgrad vs autograd, torch.func and peers)."""
    p = h.fresh_problem(problem, cfg)
    names = [n for n, _ in p.model.named_parameters()]
    info = {
        "batch": p.X.shape[0],
        "num_params": p.num_params,
        "param_tensors": len(names),
        "tied": h.tied_parameters(p.model),
    }
    qs = (bg.Grad(), bg.BatchGrad(), bg.BatchL2(), bg.SumGradSquared(), bg.Variance())
    res = bg.compute(p.model, p.loss_fn, p.X, p.y, *qs)
    ours_ = {type(q).__name__: res[q] for q in qs}
    checks = Checks()

    def autograd_check(c: Check) -> Check:
        p.model.zero_grad(set_to_none=True)
        p.loss_fn(p.model(p.X), p.y).backward()
        ref = {n: q.grad for n, q in p.model.named_parameters() if q.grad is not None}
        p.model.zero_grad(set_to_none=True)
        return h.fill_check(c, ours_["Grad"], ref, cfg.tol, len(names))

    checks.attempt(
        Check("Grad: beyondgrad vs loss.backward()", "beyondgrad", ["grad"]), autograd_check
    )
    func_checks(p, ours_, cfg.tol, checks)
    if not cfg.only_beyondgrad:
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        if h.peer_missing("backpack") is None:
            backpack_checks(p, ours_, cfg.tol, checks)
        if h.peer_missing("opacus") is None:
            opacus_checks(p, ours_, cfg.tol, checks)
    return checks.result(info)


def func_checks(p: Problem, ours: dict[str, dict[str, Tensor]], tol: float, checks: Checks) -> None:
    """torch.func gives the gradients of each sample's own loss, i.e. N x ours (reduction
    mean); the norms, SumGradSquared, Variance and BatchDot follow from them."""
    N, n = p.X.shape[0], len(ours["Grad"])
    func: dict[str, Tensor] = {}

    def per_sample() -> dict[str, Tensor]:
        func.update({k: g / N for k, g in h.func_per_sample_fn(p)().items()})
        return func

    checks.compare(
        Check("BatchGrad: beyondgrad vs torch.func vmap(grad) / N", "beyondgrad", ["batch_grad"]),
        ours["BatchGrad"],
        per_sample,
        tol,
        n,
    )
    if not func:
        return
    sq = {k: g.flatten(1).pow(2).sum(1) for k, g in func.items()}
    l2 = ["batch_l2", "grad_batch_l2"]
    name = "BatchL2 summed over params: beyondgrad vs torch.func"
    checks.compare(
        Check(name, "beyondgrad", l2), total(ours["BatchL2"]), total(sq), tol, 1, flag=False
    )
    name = "BatchL2 per param: beyondgrad vs torch.func"
    checks.compare(Check(name, "beyondgrad", l2), ours["BatchL2"], sq, tol, n)
    sgs = {k: g.pow(2).sum(0) for k, g in func.items()}
    name = "SumGradSquared: beyondgrad vs torch.func"
    checks.compare(Check(name, "beyondgrad", ["sgs"]), ours["SumGradSquared"], sgs, tol, n)
    var = {k: (N * g).pow(2).mean(0) - (N * g).mean(0).pow(2) for k, g in func.items()}
    name = "Variance: beyondgrad vs torch.func (of the N-scaled per-sample grads)"
    checks.compare(Check(name, "beyondgrad", ["variance"]), ours["Variance"], var, tol, n)
    gram = {k: g.flatten(1) @ g.flatten(1).T for k, g in func.items()}
    name = "BatchDot: beyondgrad vs torch.func (Gram of per-sample grads)"

    def batch_dot() -> dict[str, Tensor]:
        return bg.compute(p.model, p.loss_fn, p.X, p.y, bg.BatchDot())[bg.BatchDot]

    checks.compare(Check(name, "beyondgrad", ["batch_dot"]), batch_dot, gram, tol, n)


total = h.total


def backpack_checks(
    p: Problem, ours: dict[str, dict[str, Tensor]], tol: float, checks: Checks
) -> None:
    """BackPACK with reduction mean uses the 1/N-scaled per-sample gradients, like ours."""
    import backpack
    import backpack.extensions as ext

    q = h.copy_problem(p)
    model, loss_fn = backpack.extend(q.model), backpack.extend(q.loss_fn)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with backpack.backpack(*(getattr(ext, e)() for e in BACKPACK_SAVEFIELDS)):
            loss_fn(model(q.X), q.y).backward()

    def got(f: str) -> dict[str, Tensor]:
        return {n: getattr(t, f) for n, t in model.named_parameters() if hasattr(t, f)}

    N, n, l2 = p.X.shape[0], len(ours["Grad"]), got("batch_l2")

    def add(name: str, group: str, a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
        checks.compare(Check(name, "backpack", [group]), a, b, tol, n)

    name = "BatchGrad: beyondgrad vs BackPACK grad_batch (directly)"
    add(name, "batch_grad", ours["BatchGrad"], got("grad_batch"))
    checks.compare(
        Check(
            "BatchL2 summed over the params BackPACK covers: vs BackPACK batch_l2",
            "backpack",
            ["batch_l2"],
        ),
        total(ours["BatchL2"], list(l2)),
        total(l2),
        tol,
        1,
        f"{len(l2)}/{n} tensors covered",
        flag=False,
    )
    add("BatchL2 per param: beyondgrad vs BackPACK batch_l2", "batch_l2", ours["BatchL2"], l2)
    name = "SumGradSquared: beyondgrad vs BackPACK"
    add(name, "sgs", ours["SumGradSquared"], got("sum_grad_squared"))
    add(
        "Variance: beyondgrad / N^2 vs BackPACK (BackPACK: variance of the 1/N-scaled "
        "per-sample grads)",
        "variance",
        {k: v / N**2 for k, v in ours["Variance"].items()},
        got("variance"),
    )


def opacus_checks(
    p: Problem, ours: dict[str, dict[str, Tensor]], tol: float, checks: Checks
) -> None:
    """Opacus (reduction mean) scales per-sample gradients by N: compare grad_sample / N."""
    N, n = p.X.shape[0], len(ours["Grad"])

    def per_sample(c: Check) -> Check:
        q = h.copy_problem(p)
        opacus_setup(norms=False)(q).call()
        gs = {
            k: t.grad_sample / N
            for k, t in q.model.named_parameters()
            if getattr(t, "grad_sample", None) is not None
        }
        return h.fill_check(c, ours["BatchGrad"], gs, tol, n)

    def ghost(c: Check) -> Check:
        q = h.copy_problem(p)
        norms = opacus_ghost_setup(q).call()
        assert isinstance(norms, Tensor)
        ref = total({"x": (norms / N).pow(2)})
        c = h.fill_check(c, total(ours["BatchL2"]), ref, tol, 1, flag=False)
        per = {
            k: (t._norm_sample / N).pow(2)
            for k, t in q.model.named_parameters()
            if getattr(t, "_norm_sample", None) is not None
        }
        _, _, rels = h.compare(ours["BatchL2"], per)
        bad = sorted(k for k, r in rels.items() if r > tol)
        if bad:
            c.mismatch = bad
            worst = "per-param MISMATCH " + ", ".join(f"{k}: {rels[k]:.2g}" for k in bad[:4])
            c.detail = "; ".join(filter(None, [c.detail, worst]))
        return c

    checks.attempt(
        Check("BatchGrad: beyondgrad vs Opacus grad_sample / N", "opacus", ["batch_grad"]),
        per_sample,
    )
    checks.attempt(
        Check(
            "BatchL2 summed over params: beyondgrad vs (Opacus ghost norm / N)^2",
            "opacus ghost",
            ["batch_l2"],
        ),
        ghost,
    )


# --------------------------------------------------------------------------------------------
# Tables and driver
# --------------------------------------------------------------------------------------------


def render(meta: dict[str, Any], results: list[dict[str, Any]]) -> str:
    """The markdown report."""
    lines = [
        *h.header_lines(
            meta, "First-order quantities: beyondgrad vs one forward+backward and peers"
        ),
        *h.protocol_lines(meta),
        "* **Set-up**: beyondgrad does everything inside `bg.compute()` (timed). BackPACK "
        "`extend()` and Opacus wrapping run once per model in set-up and are *not* timed; "
        "`with backpack(...)`, the parameter dict for torch.func and everything per step are.",
        "* Ratios in the `fwd+bwd` row show the noise level. PARTIAL: the library silently "
        "skipped some parameters. DISAGREES: its values differ from beyondgrad's on some "
        "parameters (see the agreement table below the problem).",
        "",
        *h.summary_table(
            results,
            GROUPS,
            "Summary (time x fwd+bwd)",
            "Best peer: the fastest peer row that ran, marked where it skipped parameters "
            "(partial) or failed the agreement check (disagrees).",
            with_mem=False,
        ),
    ]
    for res in results:
        agree = res["agreement"]
        lines += [f"## {res['problem']} ({meta['device']})", ""]
        lines += h.problem_intro(res, agree.get("info", {}))
        checks = agree.get("checks", [])
        lines += ["", *h.rows_table(res["rows"], checks, GROUPS, "x fwd+bwd (median ratio)")]
        lines += h.agreement_table(
            res["problem"],
            agree,
            meta["tol"],
            "relative = max abs difference / max abs reference value, over all compared "
            "tensors together; per-tensor mismatches are listed in *detail*.",
        )
    return "\n".join(lines) + "\n"


def run_problem(problem: str, cfg: Config, memory: h.CpuMemory | None) -> dict[str, Any]:
    """Every cell of one problem, then its agreement checks."""
    agree: Callable[[], dict[str, Any]] = partial(agreement, problem, cfg)
    return h.run_problem(problem, cell_specs(cfg), agree, cfg, memory, GROUPS)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write its tables."""
    return h.problems_main(SCRIPT, argv, run_problem, render)


if __name__ == "__main__":
    raise SystemExit(main())
