"""Benchmark beyondgrad's second-order quantities against one forward+backward and against peers.

One command regenerates ``benchmarks/results/second_order_{device}.md`` and a JSON file with the
raw numbers next to it::

    python benchmarks/second_order.py                 # CPU, all problems, all peers
    python benchmarks/second_order.py --device cuda   # GPU
    python benchmarks/second_order.py --quick --problems mlp --only-beyondgrad   # short run
    python benchmarks/second_order.py --smoke        # does it run (tiny, to a temp dir)

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
medians, VmHWM peak memory, re-timing on a disturbed machine) is the one of ``harness.py``.
Agreement checks (float32) compare beyondgrad with torch.func,
BackPACK and curvlinops; Kronecker blocks are compared as the products ``B kron A`` through
their Frobenius inner products (never formed). See ``benchmarks/README.md``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

import beyondgrad as bg
import harness as h
from harness import REFUSED, Candidate, CellSpec, Check, Checks, Config, Problem, Setup

SCRIPT = h.Script(
    name="second_order",
    doc=__doc__,
    packages=("beyondgrad", "backpack-for-pytorch", "curvlinops-for-pytorch", "numpy"),
    peers="skip the peers (BackPACK, curvlinops, torch.func)",
    cell_timeout_s=900.0,
)

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

# --------------------------------------------------------------------------------------------
# Candidates
# --------------------------------------------------------------------------------------------


def is_refusal(exc: RuntimeError) -> bool:
    """beyondgrad's refusal of an exact quantity (too many outputs per sample)."""
    msg = str(exc)
    return "Monte-Carlo" in msg or "mc_samples" in msg


def compute(p: Problem, q: bg.Quantity) -> Any:
    """``bg.compute`` of one quantity with a seeded generator (created here); a refusal
    raises :class:`harness.Refused`."""
    try:
        return bg.compute(p.model, p.loss_fn, p.X, p.y, q, generator=h.generator(p.X.device))
    except RuntimeError as exc:
        if is_refusal(exc):
            raise h.Refused(str(exc)) from exc
        raise


def value(p: Problem, q: bg.Quantity) -> Any:
    """The value of one quantity (:func:`compute`)."""
    return compute(p, q)[q]


def beyondgrad_setup(make_q: Callable[[], bg.Quantity]) -> Setup:
    """``bg.compute`` for one quantity; everything, the generator included, is timed."""

    def setup(p: Problem) -> Candidate:
        q = make_q()
        n = len(dict(p.model.named_parameters()))

        def inspect(res: object) -> list[str]:
            assert isinstance(res, bg.Result)
            out = res[q]
            if not isinstance(q, bg.KFAC):
                return [] if len(out) >= n else [f"PARTIAL: {len(out)}/{n}"]
            return kfac_coverage(p.model, out, n)

        return Candidate(partial(compute, p, q), inspect=inspect)

    return setup


def kfac_coverage(model: nn.Module, blocks: dict[str, Any], n_params: int) -> list[str]:
    """Which modules got Kronecker blocks and which the diagonal fallback."""
    kron: list[str] = []
    diag: list[str] = []
    covered: set[str] = set()
    for name, block in blocks.items():
        kind = type(model.get_submodule(name)).__name__
        (kron if isinstance(block, bg.KroneckerFactors) else diag).append(kind)
        covered.update(block.params)
    notes = ["Kronecker: " + h.count_kinds(kron, "{v} {k}")]
    if diag:
        notes.append("diagonal fallback: " + h.count_kinds(diag, "{v} {k}"))
    if len(covered) < n_params:
        notes.append(f"PARTIAL: {len(covered)}/{n_params} parameter tensors")
    return ["; ".join(notes)]


def backpack_setup(extension: str) -> Setup:
    """A BackPACK second-order extension (``extend`` once in set-up, not timed)."""
    savefield, kwargs = BACKPACK_EXT[extension]
    notes = ("extend() once in set-up (not timed); also fills .grad",)
    inner = h.backpack_setup(extension, savefield, kwargs, notes)

    def setup(p: Problem) -> Candidate:
        cand = inner(p)
        if extension in ("KFLR", "KFAC") and any(
            isinstance(m, nn.Conv2d) for m in p.model.modules()
        ):
            cand.notes.append("Conv2d factors in BackPACK's own convention (see agreement)")
        return cand

    return setup


def curvlinops_operator(p: Problem, fisher_type: str, kfac_approx: str = "expand") -> Any:
    """Build ``KFACLinearOperator`` and compute its factors (weight and bias jointly, like
    beyondgrad's ``bias="joint"``; no determinism check: it would compute the factors twice)."""
    from curvlinops import KFACLinearOperator

    params, _ = h.curvlinops_params(p.model)
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
    """curvlinops ``KFACLinearOperator``: construction and factors, all timed."""

    def setup(p: Problem) -> Candidate:
        params, n_total = h.curvlinops_params(p.model)
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
            if not isinstance(m, h.CURVLINOPS_MODULES)
            for n, q in p.model.named_parameters()
            if id(q) in passed and any(q is r for r in m.parameters(recurse=False))
        )
        if shared:
            notes.append("tied: " + ", ".join(shared) + ": only its Linear use is modelled")
        return Candidate(partial(curvlinops_operator, p, fisher_type, kfac_approx), notes=notes)

    return setup


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
        out = {}
        for n, Jn in jac(params, X).items():
            Jf = Jn.flatten(2)  # [N, C, P]
            out[n] = (Jf * torch.bmm(H, Jf)).sum((0, 1)).view(params[n].shape)
        return out

    return run


def brute_force_setup(p: Problem) -> Candidate:
    """torch.func brute force of the exact diagonal GGN (materializes the Jacobians)."""
    run = brute_force_diag_ggn_fn(p)
    C, P, n = p.model(p.X[:1]).shape[-1], p.num_params, p.X.shape[0]
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


def ours(group: str, make_q: Callable[[], bg.Quantity], label: str) -> CellSpec:
    """beyondgrad's cell."""
    return CellSpec(group, "beyondgrad", beyondgrad_setup(make_q), label, False)


def bp(group: str, extension: str) -> CellSpec:
    """A BackPACK extension's cell (n/a without BackPACK)."""
    kwargs = BACKPACK_EXT[extension][1]
    label = f"extensions.{extension}(" + ", ".join(f"{k}={v}" for k, v in kwargs.items()) + ")"
    return h.peer_spec(group, "backpack", "backpack", backpack_setup(extension), label)


def cl(group: str, fisher_type: str, kfac_approx: str = "expand") -> CellSpec:
    """A curvlinops KFAC cell (n/a without curvlinops)."""
    return h.peer_spec(
        group, "curvlinops", "curvlinops", curvlinops_setup(fisher_type, kfac_approx)
    )


def brute_force_spec(problem: str) -> CellSpec:
    """torch.func's exact diagonal GGN: run on the mlp only."""
    if problem == "mlp":
        return CellSpec("diag_ggn_exact", "torch.func", brute_force_setup, "brute force")
    if problem == "transformer":
        reason = (
            "brute force needs T·V = 16,384 Jacobian rows per sample (about 8 GB of Jacobians "
            "per sample)"
        )
    else:
        reason = (
            "brute force run on the mlp only (CPU budget; the anchors measured 48x on this cnn)"
        )
    return h.na("diag_ggn_exact", "torch.func", reason)


def cell_specs(problem: str, cfg: Config) -> list[CellSpec]:
    """Every row, in table order. Peers that are missing or do not apply get a reason."""
    specs = [
        h.BASELINE,
        ours("diag_ggn_exact", bg.DiagGGN, "DiagGGN()"),
        bp("diag_ggn_exact", "DiagGGNExact"),
        brute_force_spec(problem),
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
    ]
    for group, fisher, approx, ext in (
        ("kfac_type2", "type-2", "expand", "KFLR"),
        ("kfac_mc", "mc", "expand", "KFAC"),
        ("kfac_empirical", "empirical", "expand", None),
        ("kfac_mc_reduce", "mc", "reduce", None),
    ):
        label = f'KFAC(fisher_type="{fisher}"' + (
            ', kfac_approx="reduce")' if approx == "reduce" else ")"
        )
        specs.append(ours(group, partial(bg.KFAC, fisher_type=fisher, kfac_approx=approx), label))
        if ext is not None:
            specs.append(bp(group, ext))
        elif approx == "reduce":
            specs.append(h.na(group, "backpack", "no KFAC-reduce option"))
        else:
            specs.append(h.na(group, "backpack", "no empirical-Fisher KFAC extension"))
        specs.append(cl(group, fisher, approx))
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


def weight_factors(kf: bg.KroneckerFactors) -> tuple[Tensor, Tensor]:
    """(B, A of the weight alone): drop the bias row/column of a joint ``A``."""
    A = kf.A[:-1, :-1] if kf.bias == "joint" else kf.A
    return kf.B, A


def kron_layers(
    p: Problem, blocks: dict[str, Any], types: tuple[type[nn.Module], ...]
) -> list[str]:
    """The layers of the given module types that got Kronecker blocks."""
    modules = dict(p.model.named_modules())
    return [
        n
        for n, b in blocks.items()
        if isinstance(b, bg.KroneckerFactors) and isinstance(modules[n], types)
    ]


def exact_quantities(p: Problem, info: dict[str, Any]) -> dict[str, Any]:
    """beyondgrad's exact quantities, or as many as it computes before its refusal (noted in
    ``info``)."""
    exact: dict[str, Any] = {}
    try:
        exact["diag"] = value(p, bg.DiagGGN())
        sq = value(p, bg.SqrtGGN())
        exact["sqrt_diag"] = {n: s.pow(2).sum((0, 1)) for n, s in sq.items()}
        del sq
        exact["kfac"] = value(p, bg.KFAC(fisher_type="type-2"))
        exact["kfac_reduce"] = value(p, bg.KFAC(fisher_type="type-2", kfac_approx="reduce"))
    except h.Refused as exc:
        info["refused"] = h.short(str(exc), 160)
    return exact


def agreement(problem: str, cfg: Config) -> dict[str, Any]:
    """Problem facts and the agreement checks (float32)."""
    p = h.fresh_problem(problem, cfg)
    n = len(dict(p.model.named_parameters()))
    info: dict[str, Any] = {"batch": p.X.shape[0], "num_params": p.num_params, "param_tensors": n}
    exact = exact_quantities(p, info)
    checks = Checks()
    if problem == "mlp" and "diag" in exact:
        checks.compare(
            Check(
                "DiagGGN exact: beyondgrad vs torch.func brute force",
                "beyondgrad",
                ["diag_ggn_exact"],
            ),
            exact["diag"],
            brute_force_diag_ggn_fn(p),
            cfg.tol,
            n,
        )
    if not cfg.only_beyondgrad and h.peer_missing("backpack") is None:
        backpack_checks(p, exact, cfg.tol, checks)
    if not cfg.only_beyondgrad and h.peer_missing("curvlinops") is None:
        curvlinops_checks(p, exact, cfg.tol, checks)
    return checks.result(info)


def backpack_run(p: Problem) -> Callable[[str], dict[str, Any]]:
    """``run(extension)``: one backward pass of a BackPACK-extended copy of ``p`` with that
    extension; its savefields by parameter name (removed from the parameters)."""
    import backpack
    import backpack.extensions as ext

    q = h.copy_problem(p)
    model, loss_fn = backpack.extend(q.model), backpack.extend(q.loss_fn)

    def run(extension: str) -> dict[str, Any]:
        savefield, kwargs = BACKPACK_EXT[extension]
        model.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with backpack.backpack(getattr(ext, extension)(**kwargs)):
                loss_fn(model(q.X), q.y).backward()
        out = {}
        for n, t in model.named_parameters():
            if hasattr(t, savefield):
                out[n] = getattr(t, savefield)
                delattr(t, savefield)
        return out

    return run


REFUSED_EXACT = "beyondgrad refused (too many outputs), BackPACK: see rows"


def backpack_checks(p: Problem, exact: dict[str, Any], tol: float, checks: Checks) -> None:
    """beyondgrad vs BackPACK: the exact diagonal GGN; KFAC type-2 vs KFLR (Linear layers);
    BackPACK's Conv2d KFLR convention."""
    run = backpack_run(p)
    n = len(dict(p.model.named_parameters()))
    diag: dict[str, Tensor] = {}

    def diag_check(c: Check) -> Check:
        diag.update(run("DiagGGNExact"))
        if "diag" not in exact:
            raise RuntimeError(REFUSED_EXACT)
        return h.fill_check(c, exact["diag"], diag, tol, n)

    checks.attempt(
        Check("DiagGGN exact: beyondgrad vs BackPACK DiagGGNExact", "backpack", ["diag_ggn_exact"]),
        diag_check,
    )
    if diag and "sqrt_diag" in exact:
        checks.compare(
            Check(
                "SqrtGGN exact: beyondgrad sum over (k, n) of S² vs BackPACK DiagGGNExact",
                "beyondgrad",
                ["sqrt_ggn_exact"],
            ),
            exact["sqrt_diag"],
            diag,
            tol,
            n,
        )
    kflr: dict[str, Any] = {}
    checks.attempt(
        Check(
            "KFAC type-2 Linear weights: beyondgrad B⊗A vs BackPACK KFLR [G, A] (as is)",
            "backpack",
            ["kfac_type2"],
        ),
        partial(kflr_linear_check, p, exact, kflr, run, tol),
    )
    if kflr and "kfac" in exact and kron_layers(p, exact["kfac"], (nn.Conv2d,)):
        kflr_conv_checks(p, exact, kflr, tol, checks)


def kflr_linear_check(
    p: Problem,
    exact: dict[str, Any],
    kflr: dict[str, Any],
    run: Callable[[str], dict[str, Any]],
    tol: float,
    c: Check,
) -> Check:
    """KFAC type-2 on Linear layers against BackPACK's ``KFLR`` ``[G, A]`` (weights) and ``[G]``
    (biases); ``kflr`` receives BackPACK's factors."""
    kflr.update(run("KFLR"))
    if "kfac" not in exact:
        raise RuntimeError(REFUSED_EXACT)
    pairs, bias_rel, direct = {}, [], []
    for layer in kron_layers(p, exact["kfac"], (nn.Linear,)):
        kf = exact["kfac"][layer]
        B, A = weight_factors(kf)
        G_bp, A_bp = kflr[f"{layer}.weight"]
        pairs[layer] = (B, A, G_bp, A_bp)
        direct.append(f"{layer}: A {h.rel_error(A, A_bp):.2g}, B {h.rel_error(B, G_bp):.2g}")
        if kf.bias == "joint":
            (Gb,) = kflr[f"{layer}.bias"]
            bias_rel.append(f"{layer}: {h.rel_error(kf.B * kf.A[-1, -1], Gb):.2g}")
    c = kron_check(c, pairs, tol, flag=True)
    c.detail += "; factors directly: " + ", ".join(direct)
    c.detail += "; bias blocks (B·A[-1,-1] vs BackPACK [G]): " + ", ".join(bias_rel)
    return c


def kflr_conv_checks(
    p: Problem, exact: dict[str, Any], kflr: dict[str, Any], tol: float, checks: Checks
) -> None:
    """BackPACK's Conv2d KFLR: ``A_bp = (1/N) sum_n sum_t a a^T = T · A_expand`` (not averaged
    over the T output positions) and ``G_bp = sum_n (sum_t g)(sum_t g)^T`` = beyondgrad's
    reduce ``B``; and the comparison as is."""
    layers = kron_layers(p, exact["kfac"], (nn.Conv2d,))

    def convention(c: Check) -> Check:
        pairs, a_rel = {}, []
        for layer in layers:
            A_e = weight_factors(exact["kfac"][layer])[1]
            B_r, _ = weight_factors(exact["kfac_reduce"][layer])
            G_bp, A_bp = kflr[f"{layer}.weight"]
            T = float(A_bp.trace() / A_e.trace())
            a_rel.append(f"{layer}: T={T:.0f}, A {h.rel_error(T * A_e, A_bp):.2g}")
            pairs[layer] = (B_r, T * A_e, G_bp, A_bp)
        c = kron_check(c, pairs, tol, flag=False)
        c.detail += "; A_bp vs T·A_expand: " + ", ".join(a_rel)
        return c

    checks.attempt(
        Check(
            "Conv2d convention: BackPACK KFLR = beyondgrad B(reduce) ⊗ T·A(expand), "
            "T = output positions",
            "backpack",
            [],
        ),
        convention,
    )
    as_is = {
        layer: (*weight_factors(exact["kfac"][layer]), *kflr[f"{layer}.weight"]) for layer in layers
    }
    checks.attempt(
        Check("Conv2d: beyondgrad KFAC type-2 expand vs BackPACK KFLR (as is)", "backpack", []),
        lambda c: kron_check(c, as_is, tol, flag=False),
    )


def curvlinops_checks(p: Problem, exact: dict[str, Any], tol: float, checks: Checks) -> None:
    """beyondgrad vs curvlinops ``KFACLinearOperator`` (joint bias), on Linear and Conv2d
    layers: type-2 (where beyondgrad computes it), empirical (expand and reduce)."""

    def versus(
        blocks: Callable[[], dict[str, Any]], fisher_type: str, kfac_approx: str
    ) -> Callable[[Check], Check]:
        def body(c: Check) -> Check:
            ours_ = blocks()
            state = curvlinops_operator(p, fisher_type, kfac_approx).state_dict()
            A_cl, G_cl = state["input_covariances"], state["gradient_covariances"]
            layers = kron_layers(p, ours_, h.CURVLINOPS_MODULES)
            pairs = {n: (ours_[n].B, ours_[n].A, G_cl[n], A_cl[n]) for n in layers}
            c = kron_check(c, pairs, tol, flag=True)
            a_rel = max(h.rel_error(ours_[n].A, A_cl[n]) for n in layers)
            b_rel = max(h.rel_error(ours_[n].B, G_cl[n]) for n in layers)
            c.detail += f"; factors directly: A {a_rel:.2g}, B {b_rel:.2g} (max over layers)"
            return c

        return body

    def kfac(fisher_type: str, kfac_approx: str) -> Callable[[], dict[str, Any]]:
        return lambda: value(p, bg.KFAC(fisher_type=fisher_type, kfac_approx=kfac_approx))

    what = "(Linear/Conv2d)"
    if "kfac" in exact:
        checks.attempt(
            Check(f"KFAC type-2: beyondgrad vs curvlinops {what}", "curvlinops", ["kfac_type2"]),
            versus(lambda: exact["kfac"], "type-2", "expand"),
        )
    checks.attempt(
        Check(f"KFAC empirical: beyondgrad vs curvlinops {what}", "curvlinops", ["kfac_empirical"]),
        versus(kfac("empirical", "expand"), "empirical", "expand"),
    )
    checks.attempt(
        Check(
            f"KFAC-reduce empirical: beyondgrad vs curvlinops {what}",
            "curvlinops",
            ["kfac_mc_reduce"],
        ),
        versus(kfac("empirical", "reduce"), "empirical", "reduce"),
    )


# --------------------------------------------------------------------------------------------
# Tables and driver
# --------------------------------------------------------------------------------------------


def render(meta: dict[str, Any], results: list[dict[str, Any]]) -> str:
    """The markdown report."""
    title = "Second-order quantities: beyondgrad vs one forward+backward and peers"
    lines = [
        *h.header_lines(meta, title),
        *h.protocol_lines(meta),
        "* **Set-up**: `bg.compute()` is timed whole (the seeded generator included). BackPACK "
        "`extend()` runs once in set-up (not timed); `with backpack(...)` + backward is timed. "
        "curvlinops: the operator's construction and `compute_kronecker_factors()` are timed "
        "(`check_deterministic=False`, which would compute the factors twice).",
        f"* *{REFUSED}*: beyondgrad's exact quantities raise a `RuntimeError` suggesting "
        "`mc_samples` when a sample has more outputs than `max_vectors` (256); the transformer "
        "has 64 positions x 256 classes. PARTIAL: parameters the library skipped (or cannot "
        "handle). DISAGREES: values differ from beyondgrad's (see the agreement tables).",
        "",
        *h.summary_table(
            results,
            GROUPS,
            "Summary: time x fwd+bwd (peak memory x fwd+bwd)",
            "Best peer: the fastest peer row that ran, marked where it skipped parameters "
            "(partial) or failed an agreement check (disagrees). NOISY: the machine was still "
            "disturbed on the last re-timing (see the row's note); read that ratio with care.",
        ),
    ]
    for res in results:
        agree = res["agreement"]
        info = agree.get("info", {})
        lines += [f"## {res['problem']} ({meta['device']})", "", *h.problem_intro(res, info), ""]
        lines += h.rows_table(res["rows"], agree.get("checks", []), GROUPS)
        refused = f"| beyondgrad exact quantities | {REFUSED} | | {info.get('refused')} |"
        lines += h.agreement_table(
            res["problem"],
            agree,
            meta["tol"],
            "Tensors (diagonals): relative = max abs difference / max abs reference value, all "
            "compared tensors together. Kronecker blocks: relative = ‖K1−K2‖_F / ‖K2‖_F per "
            "layer with K = B⊗A (K1 beyondgrad, K2 the peer), the worst layer in the column; "
            "where it is above the tolerance the best scalar α (α·K1 ≈ K2) and the error after "
            "it are given.",
            [refused] if "refused" in info else [],
        )
    return "\n".join(lines) + "\n"


def run_problem(problem: str, cfg: Config, memory: h.CpuMemory | None) -> dict[str, Any]:
    """Every cell of one problem, then its agreement checks."""
    agree: Callable[[], dict[str, Any]] = partial(agreement, problem, cfg)
    return h.run_problem(problem, cell_specs(problem, cfg), agree, cfg, memory, GROUPS)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write its tables."""
    return h.problems_main(SCRIPT, argv, run_problem, render)


if __name__ == "__main__":
    raise SystemExit(main())
