"""Benchmark beyondgrad's second-order quantities against one forward+backward and against peers.

One command regenerates ``benchmarks/results/second_order_{device}.md`` and a JSON file with the
raw numbers next to it::

    python benchmarks/second_order.py                 # CPU, all problems, all peers
    python benchmarks/second_order.py --device cuda   # GPU
    python benchmarks/second_order.py --quick --problems mlp --only-beyondgrad   # smoke test

Rows (one quantity, one library, one problem each):

* beyondgrad: ``bg.compute(model, loss_fn, X, y, q, generator=<seeded generator>)`` with ``q`` in
  ``DiagGGN()``, ``DiagGGN(mc_samples=1)``, ``BatchDiagGGN(mc_samples=1)``, ``SqrtGGN()``,
  ``SqrtGGN(mc_samples=1)``, ``KFAC(fisher_type=...)`` for "type-2", "mc", "empirical", and
  ``KFAC(fisher_type="mc", kfac_approx="reduce")``. Exact quantities refuse (a ``RuntimeError``
  suggesting Monte Carlo) where a sample has too many outputs (the transformer: 64 positions x
  256 classes); such rows read "refused (by design)".
* BackPACK: ``DiagGGNExact``, ``DiagGGNMC``, ``BatchDiagGGNMC``, ``SqrtGGNExact``,
  ``SqrtGGNMC``, ``KFLR``, ``KFAC`` (one MC sample each); ``extend()`` once in set-up (not
  timed), ``with backpack(ext): loss.backward()`` timed.
* curvlinops: ``KFACLinearOperator`` (type-2, mc, empirical; mc with ``kfac_approx="reduce"``),
  timed from construction through ``compute_kronecker_factors()``. It supports only
  ``Linear``/``Conv2d``: only their parameters are passed (PARTIAL where others exist).
* torch.func: the exact diagonal GGN by brute force (per-sample Jacobians ``vmap(jacrev)``, then
  ``diag(J^T H J)``), on the mlp only.

The measurement protocol (forked child per cell on CPU, interleaved baseline/candidate reps,
medians, VmHWM peak memory, re-timing on a disturbed machine) is the one of ``first_order.py``:
its helpers are imported. Agreement checks (float32) compare beyondgrad with torch.func,
BackPACK and curvlinops; Kronecker blocks are compared as the products ``B kron A`` through
their Frobenius inner products (never formed). See ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import beyondgrad as bg
from beyondgrad.problems import PROBLEMS, Problem
from first_order import (
    Candidate,
    CellSpec,
    Check,
    Config,
    CpuMemory,
    Row,
    Setup,
    _has_module,
    _short,
    configure,
    fill_check,
    flags_for,
    fmt,
    fresh_problem,
    measure_cell,
    owner_types,
    run_isolated,
    run_meta,
)
from first_order import baseline_setup as _baseline_setup

RESULTS_DIR = Path(__file__).resolve().parent / "results"

GROUPS: dict[str, str] = {
    "baseline": "fwd+bwd (baseline re-measured)",
    "diag_ggn_exact": "exact diagonal GGN",
    "diag_ggn_mc": "MC diagonal GGN (1 sample)",
    "batch_diag_ggn_mc": "per-sample MC diagonal GGN (1 sample)",
    "sqrt_ggn_exact": "exact GGN square root",
    "sqrt_ggn_mc": "MC GGN square root (1 sample)",
    "kfac_type2": "KFAC type-2 (KFLR)",
    "kfac_mc": "KFAC MC (1 sample)",
    "kfac_empirical": "KFAC empirical Fisher",
    "kfac_mc_reduce": "KFAC-reduce MC (1 sample)",
}

REFUSED = "refused (by design)"

# --------------------------------------------------------------------------------------------
# beyondgrad
# --------------------------------------------------------------------------------------------


class Refused(RuntimeError):
    """beyondgrad's documented refusal of an exact quantity (too many outputs per sample)."""


def _is_refusal(exc: RuntimeError) -> bool:
    msg = str(exc)
    return "Monte-Carlo" in msg or "mc_samples" in msg


def make_generator(device: str) -> torch.Generator:
    """The seeded generator for Monte-Carlo draws (on the data's device: CUDA draws need one)."""
    return torch.Generator(device=device).manual_seed(0)


def beyondgrad_setup(make_q: Callable[[], bg.Quantity]) -> Setup:
    """``bg.compute`` for one quantity; everything, the generator included, is timed."""

    def setup(p: Problem) -> Candidate:
        q = make_q()
        device = str(p.X.device)
        names = dict(p.model.named_parameters())

        def call() -> bg.Result:
            try:
                return bg.compute(p.model, p.loss_fn, p.X, p.y, q, generator=make_generator(device))
            except RuntimeError as exc:
                if _is_refusal(exc):
                    raise Refused(str(exc)) from exc
                raise

        def inspect(res: object) -> list[str]:
            assert isinstance(res, bg.Result)
            out = res[q]
            if not isinstance(q, bg.KFAC):
                return [] if len(out) >= len(names) else [f"PARTIAL: {len(out)}/{len(names)}"]
            return kfac_coverage(p.model, out, len(names))

        return Candidate(call, inspect=inspect)

    return setup


def kfac_coverage(model: nn.Module, blocks: dict[str, Any], n_params: int) -> list[str]:
    """Which modules got Kronecker blocks and which the diagonal fallback."""
    kron: dict[str, int] = {}
    diag: dict[str, int] = {}
    covered: set[str] = set()
    for name, block in blocks.items():
        kind = type(model.get_submodule(name)).__name__
        target = kron if isinstance(block, bg.KroneckerFactors) else diag
        target[kind] = target.get(kind, 0) + 1
        covered.update(block.params)
    notes = ["Kronecker: " + ", ".join(f"{v} {k}" for k, v in sorted(kron.items()))]
    if diag:
        notes.append("diagonal fallback: " + ", ".join(f"{v} {k}" for k, v in sorted(diag.items())))
    if len(covered) < n_params:
        notes.append(f"PARTIAL: {len(covered)}/{n_params} parameter tensors")
    return ["; ".join(notes)]


# --------------------------------------------------------------------------------------------
# BackPACK
# --------------------------------------------------------------------------------------------

BACKPACK_EXT: dict[str, tuple[str, dict[str, int]]] = {
    # extension class -> (savefield, constructor arguments)
    "DiagGGNExact": ("diag_ggn_exact", {}),
    "DiagGGNMC": ("diag_ggn_mc", {"mc_samples": 1}),
    "BatchDiagGGNMC": ("diag_ggn_mc_batch", {"mc_samples": 1}),
    "SqrtGGNExact": ("sqrt_ggn_exact", {}),
    "SqrtGGNMC": ("sqrt_ggn_mc", {"mc_samples": 1}),
    "KFLR": ("kflr", {}),
    "KFAC": ("kfac", {"mc_samples": 1}),
}


def backpack_setup(extension: str) -> Setup:
    """A BackPACK second-order extension (``extend`` once in set-up, not timed). Adapter of
    ``first_order.backpack_setup`` for extensions that take arguments."""

    def setup(p: Problem) -> Candidate:
        import backpack
        import backpack.extensions as ext

        savefield, kwargs = BACKPACK_EXT[extension]
        model = backpack.extend(p.model)
        loss_fn = backpack.extend(p.loss_fn)
        X, y = p.X, p.y
        make_ext = getattr(ext, extension)
        params = list(model.parameters())
        owners = owner_types(model)

        def call() -> None:
            model.zero_grad(set_to_none=True)
            with backpack.backpack(make_ext(**kwargs)):
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
            kinds: dict[str, int] = {}
            for q in missing:
                kinds[owners.get(id(q), "?")] = kinds.get(owners.get(id(q), "?"), 0) + 1
            detail = ", ".join(f"{k}: {v}" for k, v in sorted(kinds.items()))
            return [
                f"PARTIAL: {len(missing)}/{len(params)} tensors got no '{savefield}' ({detail})"
            ]

        notes = ["extend() once in set-up (not timed); also fills .grad"]
        if extension in ("KFLR", "KFAC") and any(isinstance(m, nn.Conv2d) for m in model.modules()):
            notes.append("Conv2d factors in BackPACK's own convention (see agreement)")
        return Candidate(call, reset=reset, inspect=inspect, notes=notes)

    return setup


# --------------------------------------------------------------------------------------------
# curvlinops
# --------------------------------------------------------------------------------------------

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


def curvlinops_operator(p: Problem, fisher_type: str, kfac_approx: str = "expand") -> Any:
    """Build ``KFACLinearOperator`` and compute its factors (weight and bias jointly, like
    beyondgrad's ``bias="joint"``; no determinism check: it would compute the factors twice)."""
    from curvlinops import KFACLinearOperator

    params, _ = curvlinops_params(p.model)
    op = KFACLinearOperator(
        p.model,
        p.loss_fn,
        params,
        [(p.X, p.y)],
        check_deterministic=False,
        fisher_type=fisher_type,
        mc_samples=1,
        kfac_approx=kfac_approx,
        separate_weight_and_bias=False,
    )
    op.compute_kronecker_factors()
    return op


def curvlinops_setup(fisher_type: str, kfac_approx: str = "expand") -> Setup:
    def setup(p: Problem) -> Candidate:
        params, n_total = curvlinops_params(p.model)
        notes = [
            f"KFACLinearOperator(fisher_type={fisher_type!r}, kfac_approx={kfac_approx!r}, "
            "separate_weight_and_bias=False, check_deterministic=False) + "
            "compute_kronecker_factors(), all timed"
        ]
        if len(params) < n_total:
            notes.append(f"PARTIAL: {len(params)}/{n_total} parameter tensors (Linear/Conv2d only)")
        passed = {id(q) for q in params}
        shared = sorted(
            f"{n} (also used by {type(m).__name__} '{mn}')"
            for mn, m in p.model.named_modules()
            if not isinstance(m, CURVLINOPS_MODULES)
            for n, q in p.model.named_parameters()
            if id(q) in passed and any(q is r for r in m.parameters(recurse=False))
        )
        if shared:
            notes.append("tied: " + ", ".join(shared) + ": only its Linear use is modelled")
        return Candidate(lambda: curvlinops_operator(p, fisher_type, kfac_approx), notes=notes)

    return setup


# --------------------------------------------------------------------------------------------
# torch.func brute force
# --------------------------------------------------------------------------------------------


def brute_force_diag_ggn_fn(p: Problem) -> Callable[[], dict[str, Tensor]]:
    """Exact diagonal GGN from per-sample Jacobians: ``sum_n diag(J_n^T H_n J_n)`` with
    ``H_n`` the Hessian of the (mean) cross-entropy w.r.t. sample n's logits. Needs 2-d logits
    ``[N, C]``; materializes the Jacobians (N x C x P floats)."""
    from torch.func import functional_call, jacrev, vmap

    if not isinstance(p.loss_fn, nn.CrossEntropyLoss) or p.loss_fn.reduction != "mean":
        raise NotImplementedError("brute force written for CrossEntropyLoss(reduction='mean')")
    model, X = p.model, p.X
    N = X.shape[0]

    def logits_one(params: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(model, params, (x.unsqueeze(0),)).squeeze(0)

    jac = vmap(jacrev(logits_one), in_dims=(None, 0))

    def run() -> dict[str, Tensor]:
        params = {n: q.detach() for n, q in model.named_parameters()}
        with torch.no_grad():
            prob = model(X).softmax(-1)
        if prob.ndim != 2:
            raise NotImplementedError("brute force needs logits [N, C]")
        H = (torch.diag_embed(prob) - prob.unsqueeze(2) * prob.unsqueeze(1)) / N
        J = jac(params, X)
        out = {}
        for n, Jn in J.items():
            Jf = Jn.flatten(2)  # [N, C, P]
            out[n] = (Jf * torch.bmm(H, Jf)).sum((0, 1)).view(params[n].shape)
        return out

    return run


def brute_force_setup(p: Problem) -> Candidate:
    run = brute_force_diag_ggn_fn(p)
    C = p.model(p.X[:1]).shape[-1]
    P = p.num_params
    n = p.X.shape[0]
    return Candidate(
        run,
        notes=[
            "vmap(jacrev) per-sample Jacobians J, then sum of J ⊙ (H J) (H: CE Hessian); "
            f"materializes N·C·P = {n}·{C}·{P:,} floats ({n * C * P * 4 / 2**20:,.0f} MiB)"
        ],
    )


# --------------------------------------------------------------------------------------------
# The cells
# --------------------------------------------------------------------------------------------


def cell_specs(problem: str, cfg: Config) -> list[CellSpec]:
    """Every row, in table order. Peers that are missing or do not apply get a reason."""
    no_bp = _has_module("backpack")
    no_cl = _has_module("curvlinops")

    def ours(group: str, make_q: Callable[[], bg.Quantity], label: str) -> CellSpec:
        return CellSpec(group, "beyondgrad", beyondgrad_setup(make_q), label, False)

    def bp(group: str, extension: str) -> CellSpec:
        kwargs = BACKPACK_EXT[extension][1]
        label = f"extensions.{extension}(" + ", ".join(f"{k}={v}" for k, v in kwargs.items()) + ")"
        return CellSpec(
            group, "backpack", None if no_bp else backpack_setup(extension), no_bp or label
        )

    def cl(group: str, fisher_type: str, kfac_approx: str = "expand") -> CellSpec:
        setup = None if no_cl else curvlinops_setup(fisher_type, kfac_approx)
        return CellSpec(group, "curvlinops", setup, no_cl or "")

    def na(group: str, library: str, reason: str) -> CellSpec:
        return CellSpec(group, library, None, reason)

    if problem == "mlp":
        func = CellSpec("diag_ggn_exact", "torch.func", brute_force_setup, "brute force")
    elif problem == "transformer":
        func = na(
            "diag_ggn_exact",
            "torch.func",
            "brute force needs T·V = 16,384 Jacobian rows per sample (about 8 GB of Jacobians "
            "per sample)",
        )
    else:
        func = na(
            "diag_ggn_exact",
            "torch.func",
            "brute force run on the mlp only (CPU budget; the anchors measured 48x on this cnn)",
        )

    specs = [
        CellSpec("baseline", "torch", _baseline_setup, "loss.backward(); noise level", False),
        ours("diag_ggn_exact", bg.DiagGGN, "DiagGGN()"),
        bp("diag_ggn_exact", "DiagGGNExact"),
        func,
        ours("diag_ggn_mc", lambda: bg.DiagGGN(mc_samples=1), "DiagGGN(mc_samples=1)"),
        bp("diag_ggn_mc", "DiagGGNMC"),
        ours(
            "batch_diag_ggn_mc", lambda: bg.BatchDiagGGN(mc_samples=1), "BatchDiagGGN(mc_samples=1)"
        ),
        bp("batch_diag_ggn_mc", "BatchDiagGGNMC"),
        ours("sqrt_ggn_exact", bg.SqrtGGN, "SqrtGGN()"),
        bp("sqrt_ggn_exact", "SqrtGGNExact"),
        ours("sqrt_ggn_mc", lambda: bg.SqrtGGN(mc_samples=1), "SqrtGGN(mc_samples=1)"),
        bp("sqrt_ggn_mc", "SqrtGGNMC"),
        ours("kfac_type2", lambda: bg.KFAC(fisher_type="type-2"), 'KFAC(fisher_type="type-2")'),
        bp("kfac_type2", "KFLR"),
        cl("kfac_type2", "type-2"),
        ours("kfac_mc", lambda: bg.KFAC(fisher_type="mc"), 'KFAC(fisher_type="mc")'),
        bp("kfac_mc", "KFAC"),
        cl("kfac_mc", "mc"),
        ours(
            "kfac_empirical",
            lambda: bg.KFAC(fisher_type="empirical"),
            'KFAC(fisher_type="empirical")',
        ),
        na("kfac_empirical", "backpack", "no empirical-Fisher KFAC extension"),
        cl("kfac_empirical", "empirical"),
        ours(
            "kfac_mc_reduce",
            lambda: bg.KFAC(fisher_type="mc", kfac_approx="reduce"),
            'KFAC(fisher_type="mc", kfac_approx="reduce")',
        ),
        na("kfac_mc_reduce", "backpack", "no KFAC-reduce option"),
        cl("kfac_mc_reduce", "mc", "reduce"),
    ]
    if cfg.only_beyondgrad:
        specs = [s for s in specs if not s.peer]
    return specs


# --------------------------------------------------------------------------------------------
# Agreement checks
# --------------------------------------------------------------------------------------------


def kron_rel(B1: Tensor, A1: Tensor, B2: Tensor, A2: Tensor) -> tuple[float, float, float]:
    """``rel = ‖B1⊗A1 − B2⊗A2‖_F / ‖B2⊗A2‖_F``, the best scalar ``α`` (minimizing
    ``‖α B1⊗A1 − B2⊗A2‖_F``) and the relative error after it, from the identities
    ``<B1⊗A1, B2⊗A2> = <B1, B2><A1, A2>`` (float64; the products are never formed)."""
    B1, A1, B2, A2 = (t.detach().double() for t in (B1, A1, B2, A2))
    n11 = float((B1 * B1).sum() * (A1 * A1).sum())
    n22 = float((B2 * B2).sum() * (A2 * A2).sum())
    n12 = float((B1 * B2).sum() * (A1 * A2).sum())
    rel = math.sqrt(max(n11 + n22 - 2 * n12, 0.0) / n22)
    alpha = n12 / n11 if n11 > 0 else math.nan
    after = math.sqrt(max(1.0 - n12 * n12 / (n11 * n22), 0.0)) if n11 > 0 else math.nan
    return rel, alpha, after


def rel_err(a: Tensor, b: Tensor) -> float:
    """max |a − b| / max |b| (float64)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max())


def kron_check(
    check: Check, pairs: dict[str, tuple[Tensor, Tensor, Tensor, Tensor]], tol: float, flag: bool
) -> Check:
    """Record a per-layer comparison of Kronecker products ``(B1, A1, B2, A2)``."""
    if not pairs:
        raise ValueError("no layer to compare")
    per = {name: kron_rel(*t) for name, t in pairs.items()}
    check.rel = max(r for r, _, _ in per.values())
    bad = sorted(n for n, (r, _, _) in per.items() if r > tol)
    check.mismatch = bad if flag else []
    parts = []
    for name, (r, a, after) in per.items():
        s = f"{name}: {r:.2g}"
        if r > tol:
            s += f" (best α={a:.4g}, then {after:.2g})"
        parts.append(s)
    check.detail = "per layer ‖K1−K2‖_F/‖K2‖_F: " + ", ".join(parts)
    return check


def _weight_factors(kf: bg.KroneckerFactors) -> tuple[Tensor, Tensor]:
    """(B, A of the weight alone): drop the bias row/column of a joint ``A``."""
    A = kf.A[:-1, :-1] if kf.bias == "joint" else kf.A
    return kf.B, A


def agreement(problem: str, cfg: Config) -> dict[str, Any]:
    """Problem facts and the agreement checks (float32)."""
    p = fresh_problem(problem, cfg.device)
    names = [n for n, _ in p.model.named_parameters()]
    modules = dict(p.model.named_modules())
    N = p.X.shape[0]
    info = {"batch": N, "num_params": p.num_params, "param_tensors": len(names)}
    tol = cfg.tol
    checks: list[Check] = []

    def attempt(check: Check, body: Callable[[Check], Check]) -> None:
        try:
            checks.append(body(check))
        except Exception as exc:
            check.status = "error"
            check.detail = f"error: {type(exc).__name__}: {_short(str(exc))}"
            checks.append(check)

    def ours(q: bg.Quantity) -> Any:
        return bg.compute(p.model, p.loss_fn, p.X, p.y, q, generator=make_generator(cfg.device))[q]

    # beyondgrad's exact quantities (refused on the transformer)
    exact: dict[str, Any] = {}
    try:
        exact["diag"] = ours(bg.DiagGGN())
        sq = ours(bg.SqrtGGN())
        exact["sqrt_diag"] = {n: s.pow(2).sum((0, 1)) for n, s in sq.items()}
        del sq
        exact["kfac"] = ours(bg.KFAC(fisher_type="type-2"))
        exact["kfac_reduce"] = ours(bg.KFAC(fisher_type="type-2", kfac_approx="reduce"))
    except RuntimeError as exc:
        if not _is_refusal(exc):
            raise
        info["refused"] = _short(str(exc), 160)

    def linear_names(blocks: dict[str, Any], types: tuple[type[nn.Module], ...]) -> list[str]:
        return [
            n
            for n, b in blocks.items()
            if isinstance(b, bg.KroneckerFactors) and isinstance(modules[n], types)
        ]

    # torch.func brute force (mlp only)
    if problem == "mlp" and "diag" in exact:
        attempt(
            Check(
                "DiagGGN exact: beyondgrad vs torch.func brute force",
                "beyondgrad",
                ["diag_ggn_exact"],
            ),
            lambda c: fill_check(c, exact["diag"], brute_force_diag_ggn_fn(p)(), tol, len(names)),
        )

    if not cfg.only_beyondgrad and _has_module("backpack") is None:
        backpack_checks(problem, cfg, exact, names, tol, attempt, linear_names)
    if not cfg.only_beyondgrad and _has_module("curvlinops") is None:
        curvlinops_checks(p, exact, ours, tol, attempt, linear_names)
    return {"info": info, "checks": [asdict(c) for c in checks]}


AttemptFn = Callable[[Check, Callable[[Check], Check]], None]


def backpack_checks(
    problem: str,
    cfg: Config,
    exact: dict[str, Any],
    names: list[str],
    tol: float,
    attempt: AttemptFn,
    linear_names: Callable[..., list[str]],
) -> None:
    """beyondgrad vs BackPACK: the exact diagonal GGN; KFAC type-2 vs KFLR (Linear layers);
    BackPACK's Conv2d KFLR convention."""
    import backpack
    import backpack.extensions as ext

    q = fresh_problem(problem, cfg.device)
    model, loss_fn = backpack.extend(q.model), backpack.extend(q.loss_fn)

    def run(extension: str) -> dict[str, Any]:
        savefield = BACKPACK_EXT[extension][0]
        model.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with backpack.backpack(getattr(ext, extension)(**BACKPACK_EXT[extension][1])):
                loss_fn(model(q.X), q.y).backward()
        out = {}
        for n, t in model.named_parameters():
            if hasattr(t, savefield):
                out[n] = getattr(t, savefield)
                delattr(t, savefield)
        return out

    diag: dict[str, Tensor] = {}

    def diag_check(c: Check) -> Check:
        diag.update(run("DiagGGNExact"))
        if "diag" not in exact:
            raise RuntimeError("beyondgrad refused (too many outputs), BackPACK: see rows")
        return fill_check(c, exact["diag"], diag, tol, len(names))

    attempt(
        Check("DiagGGN exact: beyondgrad vs BackPACK DiagGGNExact", "backpack", ["diag_ggn_exact"]),
        diag_check,
    )
    if diag and "sqrt_diag" in exact:
        attempt(
            Check(
                "SqrtGGN exact: beyondgrad sum over (k, n) of S² vs BackPACK DiagGGNExact",
                "beyondgrad",
                ["sqrt_ggn_exact"],
            ),
            lambda c: fill_check(c, exact["sqrt_diag"], diag, tol, len(names)),
        )

    kflr: dict[str, Any] = {}

    def kflr_linear(c: Check) -> Check:
        kflr.update(run("KFLR"))
        if "kfac" not in exact:
            raise RuntimeError("beyondgrad refused (too many outputs), BackPACK: see rows")
        pairs = {}
        bias_rel, direct = [], []
        for layer in linear_names(exact["kfac"], (nn.Linear,)):
            kf = exact["kfac"][layer]
            B, A = _weight_factors(kf)
            G_bp, A_bp = kflr[f"{layer}.weight"]
            pairs[layer] = (B, A, G_bp, A_bp)
            direct.append(f"{layer}: A {rel_err(A, A_bp):.2g}, B {rel_err(B, G_bp):.2g}")
            if kf.bias == "joint":
                (Gb,) = kflr[f"{layer}.bias"]
                bias_rel.append(f"{layer}: {rel_err(kf.B * kf.A[-1, -1], Gb):.2g}")
        c = kron_check(c, pairs, tol, flag=True)
        c.detail += "; factors directly: " + ", ".join(direct)
        c.detail += "; bias blocks (B·A[-1,-1] vs BackPACK [G]): " + ", ".join(bias_rel)
        return c

    attempt(
        Check(
            "KFAC type-2 Linear weights: beyondgrad B⊗A vs BackPACK KFLR [G, A] (as is)",
            "backpack",
            ["kfac_type2"],
        ),
        kflr_linear,
    )

    if kflr and "kfac" in exact and linear_names(exact["kfac"], (nn.Conv2d,)):

        def kflr_conv(c: Check) -> Check:
            # BackPACK: A_bp = (1/N) sum_n sum_t a a^T = T · A_expand (not averaged over the
            # T output positions); G_bp = sum_n (sum_t g)(sum_t g)^T = beyondgrad's reduce B.
            pairs, a_rel = {}, []
            for layer in linear_names(exact["kfac"], (nn.Conv2d,)):
                A_e = _weight_factors(exact["kfac"][layer])[1]
                B_r, _ = _weight_factors(exact["kfac_reduce"][layer])
                G_bp, A_bp = kflr[f"{layer}.weight"]
                T = float(A_bp.trace() / A_e.trace())
                a_rel.append(f"{layer}: T={T:.0f}, A {rel_err(T * A_e, A_bp):.2g}")
                pairs[layer] = (B_r, T * A_e, G_bp, A_bp)
            c = kron_check(c, pairs, tol, flag=False)
            c.detail += "; A_bp vs T·A_expand: " + ", ".join(a_rel)
            return c

        attempt(
            Check(
                "Conv2d convention: BackPACK KFLR = beyondgrad B(reduce) ⊗ T·A(expand), "
                "T = output positions",
                "backpack",
                [],
            ),
            kflr_conv,
        )
        attempt(
            Check(
                "Conv2d: beyondgrad KFAC type-2 expand vs BackPACK KFLR (as is)",
                "backpack",
                [],
            ),
            lambda c: kron_check(
                c,
                {
                    layer: (*_weight_factors(exact["kfac"][layer]), *kflr[f"{layer}.weight"])
                    for layer in linear_names(exact["kfac"], (nn.Conv2d,))
                },
                tol,
                flag=False,
            ),
        )


def curvlinops_checks(
    p: Problem,
    exact: dict[str, Any],
    ours: Callable[[bg.Quantity], Any],
    tol: float,
    attempt: AttemptFn,
    linear_names: Callable[..., list[str]],
) -> None:
    """beyondgrad vs curvlinops ``KFACLinearOperator`` (joint bias), on Linear and Conv2d
    layers: type-2 (where beyondgrad computes it), empirical (expand and reduce)."""

    def versus(
        blocks: dict[str, Any], fisher_type: str, kfac_approx: str
    ) -> Callable[[Check], Check]:
        def body(c: Check) -> Check:
            state = curvlinops_operator(p, fisher_type, kfac_approx).state_dict()
            A_cl, G_cl = state["input_covariances"], state["gradient_covariances"]
            layers = linear_names(blocks, CURVLINOPS_MODULES)
            pairs = {n: (blocks[n].B, blocks[n].A, G_cl[n], A_cl[n]) for n in layers}
            c = kron_check(c, pairs, tol, flag=True)
            a_rel = max(rel_err(blocks[n].A, A_cl[n]) for n in layers)
            b_rel = max(rel_err(blocks[n].B, G_cl[n]) for n in layers)
            c.detail += f"; factors directly: A {a_rel:.2g}, B {b_rel:.2g} (max over layers)"
            return c

        return body

    if "kfac" in exact:
        attempt(
            Check(
                "KFAC type-2: beyondgrad vs curvlinops (Linear/Conv2d)",
                "curvlinops",
                ["kfac_type2"],
            ),
            versus(exact["kfac"], "type-2", "expand"),
        )
    attempt(
        Check(
            "KFAC empirical: beyondgrad vs curvlinops (Linear/Conv2d)",
            "curvlinops",
            ["kfac_empirical"],
        ),
        versus(ours(bg.KFAC(fisher_type="empirical")), "empirical", "expand"),
    )
    attempt(
        Check(
            "KFAC-reduce empirical: beyondgrad vs curvlinops (Linear/Conv2d)",
            "curvlinops",
            ["kfac_mc_reduce"],
        ),
        versus(ours(bg.KFAC(fisher_type="empirical", kfac_approx="reduce")), "empirical", "reduce"),
    )


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def run_problem(problem: str, cfg: Config, memory: CpuMemory | None) -> dict[str, Any]:
    """Every cell of one problem (``first_order.measure_cell`` in a forked child), then the
    agreement checks. beyondgrad's refusals become "refused (by design)" rows."""
    t0 = time.perf_counter()
    rows: list[Row] = []
    for spec in cell_specs(problem, cfg):
        label = f"[{problem}] {GROUPS[spec.group]} / {spec.library}"
        if spec.setup is None:
            rows.append(Row(spec.group, spec.library, "n/a", spec.note))
            continue
        tc = time.perf_counter()
        try:
            ref = min((r.base_ms for r in rows if r.base_ms is not None), default=None)
            row = run_isolated(
                partial(measure_cell, problem, spec, cfg, memory, ref / 1e3 if ref else None),
                cfg.cell_timeout_s,
                cfg.isolate,
            )
        except Exception as exc:
            row = Row(
                spec.group, spec.library, "error", f"error: {_short(str(exc).splitlines()[0])}"
            )
        if row.status == "error" and f"error: {Refused.__name__}: " in row.note:
            msg = row.note.split(f"error: {Refused.__name__}: ", 1)[1]
            row.status = "refused"
            row.note = f"{spec.note}; {REFUSED}: {msg[:110]}..."
        row.wall_s = time.perf_counter() - tc
        rows.append(row)
        if row.status == "ok":
            print(
                f"{label}: {row.time_ms:.3g} ms, x{row.ratio:.3g} (paired x{row.paired:.3g}), "
                f"mem {row.mem_mib:.3g} MiB  [{row.wall_s:.0f} s]",
                file=sys.stderr,
            )
        else:
            print(f"{label}: {row.note}", file=sys.stderr)
    try:
        agree = run_isolated(lambda: agreement(problem, cfg), cfg.cell_timeout_s, cfg.isolate)
    except Exception as exc:
        agree = {"info": {}, "checks": [], "error": _short(str(exc).splitlines()[0])}
    for c in agree.get("checks", []):
        print(f"[{problem}] check {c['name']}: rel {c['rel']} {c['detail'][:200]}", file=sys.stderr)
    return {
        "problem": problem,
        "rows": [asdict(r) for r in rows],
        "agreement": agree,
        "wall_s": time.perf_counter() - t0,
    }


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def _cell(row: dict[str, Any]) -> str:
    """``time x (mem x)`` of an ok row, else its status."""
    if row["status"] != "ok":
        return row["status"]
    noisy = " NOISY" if "NOISY" in row["note"] else ""
    return f"{fmt(row['ratio'])} ({fmt(row['mem_ratio'])}){noisy}"


def render(meta: dict[str, Any], results: list[dict[str, Any]]) -> str:
    lines = [
        "# Second-order quantities: beyondgrad vs one forward+backward and peers "
        f"({meta['device']})",
        "",
        f"*Generated {meta['date']} by `{meta['command']}`.*",
        "",
        f"* **Machine**: {meta['machine']}; Python {meta['python']}.",
        f"* **torch {meta['torch']}**, device `{meta['device']}`, torch threads "
        f"{meta['threads']} (interop {meta['interop_threads']}).",
        "* **Libraries**: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ".",
        f"* **Protocol**: that of `first_order.py` (its functions are imported): "
        f"{meta['warmup']} warm-up call(s); samples of >= {meta['target_ms']:g} ms (k calls "
        f"averaged); {meta['reps']} samples of the baseline and of the candidate (at least "
        f"{min(3, meta['reps'])} where a cell's timing would exceed {meta['max_cell_s']:g} s), "
        "alternated rep by rep; medians. *x fwd+bwd*: median candidate / median baseline, the "
        "baseline re-measured in the same process; *paired x*: median of per-rep ratios. "
        f"Re-timed up to {meta['noise_retries']} times while the machine looks disturbed; "
        "NOISY says it still was.",
        f"* **Memory**: {meta['memory_method']}; the call's outputs are alive when the peak "
        "is read. *mem x*: over the baseline's peak in the same process.",
        f"* **Isolation**: {meta['isolation']}; each cell builds its own copies of the problem.",
        "* **Set-up**: `bg.compute()` is timed whole (the seeded generator included). BackPACK "
        "`extend()` runs once in set-up (not timed); `with backpack(...)` + backward is timed. "
        "curvlinops: the operator's construction and `compute_kronecker_factors()` are timed "
        "(`check_deterministic=False`, which would compute the factors twice).",
        f"* *{REFUSED}*: beyondgrad's exact quantities raise a `RuntimeError` suggesting "
        "`mc_samples` when a sample has more outputs than `max_vectors` (256); the transformer "
        "has 64 positions x 256 classes. PARTIAL: parameters the library skipped (or cannot "
        "handle). DISAGREES: values differ from beyondgrad's (see the agreement tables).",
        "",
    ]
    lines += render_summary(results)
    for res in results:
        lines += render_problem(res, meta)
    return "\n".join(lines) + "\n"


def render_summary(results: list[dict[str, Any]]) -> list[str]:
    """beyondgrad's ratios per quantity and problem next to the fastest peer that ran."""
    if not results:
        return []
    head = " | ".join(f"{r['problem']}: beyondgrad | {r['problem']}: best peer" for r in results)
    lines = [
        "## Summary: time x fwd+bwd (peak memory x fwd+bwd)",
        "",
        "Best peer: the fastest peer row that ran, marked where it skipped parameters "
        "(partial) or failed an agreement check (disagrees). NOISY: the machine was still "
        "disturbed on the last re-timing (see the row's note); read that ratio with care.",
        "",
        f"| quantity | {head} |",
        "|---|" + "---:|---|" * len(results),
    ]
    for group, label in GROUPS.items():
        if group == "baseline":
            continue
        cells = []
        for r in results:
            mine = [x for x in r["rows"] if x["group"] == group and x["library"] == "beyondgrad"]
            peers = [
                x
                for x in r["rows"]
                if x["group"] == group and x["status"] == "ok" and x["library"] != "beyondgrad"
            ]
            cells.append(_cell(mine[0]) if mine else "")
            if peers:
                best = min(peers, key=lambda x: x["ratio"])
                marks = [
                    m
                    for m, bad in (
                        ("partial", "PARTIAL" in best["note"]),
                        ("disagrees", bool(flags_for(best, r["agreement"].get("checks", [])))),
                    )
                    if bad
                ]
                mark = f", {', '.join(marks)}" if marks else ""
                cells.append(f"{_cell(best)} {best['library']}{mark}")
            else:
                failed = sorted(
                    {
                        x["library"]
                        for x in r["rows"]
                        if x["group"] == group and x["status"] == "error"
                    }
                )
                cells.append("- (" + ", ".join(failed) + " failed)" if failed else "-")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def render_problem(res: dict[str, Any], meta: dict[str, Any]) -> list[str]:
    info = res["agreement"].get("info", {})
    checks = res["agreement"].get("checks", [])
    base = [r for r in res["rows"] if r["status"] == "ok" and r["base_ms"] is not None]
    lines = [f"## {res['problem']} ({meta['device']})", ""]
    if info:
        lines.append(
            f"Batch {info['batch']}, {info['num_params']:,} parameters in "
            f"{info['param_tensors']} tensors."
        )
    if base:
        b_mem = [r["base_mem_mib"] for r in base if r["base_mem_mib"] is not None]
        lines.append(
            f"Baseline fwd+bwd: **{fmt(statistics.median(r['base_ms'] for r in base))} ms** "
            f"(median over the cells' processes, range {fmt(min(r['base_ms'] for r in base))}-"
            f"{fmt(max(r['base_ms'] for r in base))} ms), peak memory "
            f"{fmt(statistics.median(b_mem)) if b_mem else '?'} MiB. "
            f"Wall time {res['wall_s']:.0f} s."
        )
    lines += [
        "",
        "| quantity | library | time [ms] | x fwd+bwd | paired x | peak mem [MiB] | "
        "mem x fwd+bwd | notes |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in res["rows"]:
        note = "; ".join([r["note"], *flags_for(r, checks)] if r["note"] else flags_for(r, checks))
        note = note.replace("|", "\\|")
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
            f"| {GROUPS[r['group']]} | {r['library']} | " + " | ".join(cols) + f" | {note} |"
        )
    lines += [
        "",
        f"### Agreement ({res['problem']}, float32, flagged above rel {meta['tol']:g})",
        "",
        "Tensors (diagonals): relative = max abs difference / max abs reference value, all "
        "compared tensors together. Kronecker blocks: relative = ‖K1−K2‖_F / ‖K2‖_F per layer "
        "with K = B⊗A (K1 beyondgrad, K2 the peer), the worst layer in the column; where it is "
        "above the tolerance the best scalar α (α·K1 ≈ K2) and the error after it are given.",
        "",
        "| check | max abs diff | relative | detail |",
        "|---|---:|---:|---|",
    ]
    if "refused" in info:
        lines.append(f"| beyondgrad exact quantities | {REFUSED} | | {info['refused']} |")
    if "error" in res["agreement"]:
        lines.append(f"| agreement run | error | | {res['agreement']['error']} |")
    for c in checks:
        detail = c["detail"].replace("|", "\\|")
        if c["status"] != "ok":
            lines.append(f"| {c['name']} | error | | {detail} |")
        else:
            mx = f"{c['max_abs']:.3g}" if c["max_abs"] is not None else ""
            lines.append(f"| {c['name']} | {mx} | {c['rel']:.3g} | {detail} |")
    return [*lines, ""]


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=PROBLEMS)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--reps", type=int, default=7, help="timed samples per cell (default 7)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="markdown output (default benchmarks/results/second_order_{device}.md); "
        "the JSON goes next to it",
    )
    ap.add_argument(
        "--quick", action="store_true", help="smoke test: 2 reps, 1 warm-up, short samples"
    )
    ap.add_argument(
        "--only-beyondgrad",
        action="store_true",
        help="skip the peers (BackPACK, curvlinops, torch.func)",
    )
    ap.add_argument(
        "--target-ms", type=float, default=None, help="minimum sample length (50 CPU / 20 CUDA)"
    )
    ap.add_argument(
        "--max-cell-s", type=float, default=None, help="per-cell timing budget (25 CPU / 10 CUDA)"
    )
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: CUDA is not available", file=sys.stderr)
        return 2
    cfg, memory = configure(args, cell_timeout_s=900.0)
    out = args.out or RESULTS_DIR / f"second_order_{args.device}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    packages = ("beyondgrad", "backpack-for-pytorch", "curvlinops-for-pytorch", "numpy")
    meta = run_meta(args, argv, cfg, memory, packages)
    results = []
    t0 = time.perf_counter()
    for problem in args.problems:
        results.append(run_problem(problem, cfg, memory))
    meta["wall_s"] = time.perf_counter() - t0
    out.write_text(render(meta, results))
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(
        f"wrote {out} and {out.with_suffix('.json').name} ({meta['wall_s']:.0f} s)", file=sys.stderr
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
