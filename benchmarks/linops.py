"""Benchmark beyondgrad's curvature operators and their linear algebra against peers.

One command regenerates ``benchmarks/results/linops_{device}.md`` and a JSON file with the raw
numbers next to it::

    python benchmarks/linops.py                      # CPU, all problems, all sections
    python benchmarks/linops.py --device cuda        # GPU
    python benchmarks/linops.py --quick --problems mlp --out /tmp/linops.md   # short run
    python benchmarks/linops.py --smoke              # does it run (tiny, to a temp dir)

Sections (per problem: ``mlp``, ``cnn``, ``transformer``; data ``[(X, y)]``, one batch):

* **products**: one matvec ``A @ v`` and one 16-column block ``A @ V`` of ``bg.linops``
  ``Hessian``, ``GGN``, ``EmpiricalFisher``, ``KFAC`` and ``EKFAC`` (MC, one sample; the product
  only, construction time in the notes), as ratios to one plain forward+backward; the Hessian,
  GGN and empirical Fisher products also with the vectors in the parameters' layout (``A @
  [t_1, ..., t_p]``, each ``[*shape]`` or ``[16, *shape]``, as torch.func and double backward
  take them). Peers:
  curvlinops (``HessianLinearOperator``, ``GGNLinearOperator``, ``EFLinearOperator``,
  ``KFACLinearOperator``, ``EKFACLinearOperator``), torch.func (HVP as ``jvp(grad)``; GGN as
  ``jvp`` -> loss Hessian -> ``vjp``), plain double backward, PyHessian. The protocol is that of
  ``harness.py``: forked child per cell, interleaved baseline and candidate reps, medians,
  VmHWM peak memory, re-timing on a disturbed machine.
* **eigen**: the top Hessian eigenvalue to 1e-3 relative accuracy, against a tight reference
  (``bg.linalg.eigsh(tol=1e-10)``, its residual reported): ``bg.linalg.eigsh`` (Lanczos) vs
  PyHessian's power iteration. Per seed: products and time until the estimate is within 1e-3,
  and where each method's own stopping rule ends.
* **trace**: the Hessian trace to 5 %: ``bg.linalg.trace(method="hutch++")`` vs PyHessian's
  Hutchinson, against the exact trace (sum of ``bg.DiagHessian``) or, where that raises (the
  transformer), a 600-product Hutch++ estimate.

Agreement checks (float32) compare every product with a reference (double backward for the
Hessian, torch.func for the GGN and the empirical Fisher, curvlinops for KFAC/EKFAC).
See ``benchmarks/README.md``.
"""

from __future__ import annotations

import contextlib
import json
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

import beyondgrad as bg
import harness as h
from harness import REFUSED, Candidate, CellSpec, Check, Checks, Config, Problem, Refused, Setup

SCRIPT = h.Script(
    name="linops",
    doc=__doc__,
    packages=("beyondgrad", "curvlinops-for-pytorch", "pyhessian", "numpy"),
    max_cell_s=(8.0, 5.0),
    cell_timeout_s=900.0,
)
K = 16  # columns of the block products

GROUPS: dict[str, str] = {
    "baseline": "fwd+bwd (baseline re-measured)",
    "hvp": "Hessian @ v",
    "hmp": f"Hessian @ V ({K} columns)",
    "ggnvp": "GGN @ v",
    "ggnmp": f"GGN @ V ({K} columns)",
    "efvp": "empirical Fisher @ v",
    "efmp": f"empirical Fisher @ V ({K} columns)",
    "kfacvp": "KFAC (MC) @ v, product only",
    "kfacmp": f"KFAC (MC) @ V ({K} columns), product only",
    "ekfacvp": "EKFAC (MC) @ v, product only",
    "ekfacmp": f"EKFAC (MC) @ V ({K} columns), product only",
}

EIG_TARGET = 1e-3  # relative accuracy of the top eigenvalue
TRACE_TARGET = 0.05  # relative accuracy of the trace
PYHESSIAN_TOL = 1e-3  # PyHessian's default stopping tolerance (eigenvalues() and trace())
PYHESSIAN_MAX_ITER = 100  # and its default maxIter
EIGSH_OWN_TOL = 1e-3  # the tolerance our eigsh's own stopping rule runs with
REF_SEED = 10_000
EF_NOTE = "DIFFERENT MATRIX: {ours} empirical Fisher ({other}; see agreement)"
# largest trace budget per problem (CPU time): the mlp's products are cheap; a 5 % trace of the
# cnn needs thousands of products (its trace is small next to its Frobenius norm), so its runs
# stop early and the table projects the budget from the observed variance
TRACE_CAPS = {"mlp": 768, "cnn": 24, "transformer": 96}

# --------------------------------------------------------------------------------------------
# Vectors and small helpers
# --------------------------------------------------------------------------------------------


def probe(n: int, k: int, device: str | torch.device, seed: int = 0) -> Tensor:
    """A seeded Gaussian vector ``[n]`` (k == 1) or block ``[n, k]``."""
    g = torch.Generator(device=device).manual_seed(seed)
    shape = (n,) if k == 1 else (n, k)
    return torch.randn(shape, generator=g, device=device)


def split_flat(v: Tensor, params: list[nn.Parameter]) -> list[Tensor]:
    """A flat ``[P]`` vector as parameter-shaped tensors, or a ``[P, k]`` block as
    ``[k, *shape]`` tensors (the leading batch axis of ``is_grads_batched`` and ``vmap``)."""
    parts = torch.split(v, [q.numel() for q in params], 0)
    if v.ndim == 1:
        return [t.view(q.shape) for t, q in zip(parts, params)]
    return [t.T.reshape(v.shape[1], *q.shape).contiguous() for t, q in zip(parts, params)]


def named(parts: list[Tensor] | tuple[Tensor, ...], model: nn.Module) -> dict[str, Tensor]:
    """Per-parameter tensors keyed by name (``named_parameters`` order)."""
    names = [n for n, q in model.named_parameters() if q.requires_grad]
    return dict(zip(names, parts))


def is_tying_refusal(exc: Exception) -> bool:
    """beyondgrad's KFAC/EKFAC refusal of a parameter shared by two modules."""
    return "weight tying" in str(exc) or "cover every parameter" in str(exc)


def baseline_ms(p: Problem, n: int = 3) -> float:
    """Median of a few plain forward+backward calls on ``p`` (for set-up notes only)."""
    base = h.baseline_setup(p)
    base.call()
    ms = statistics.median(h.time_sample(base.call, 1, str(p.X.device)) for _ in range(n)) * 1e3
    base.reset()
    return ms


# --------------------------------------------------------------------------------------------
# Product cells: beyondgrad
# --------------------------------------------------------------------------------------------

OURS = {
    "H": ("Hessian", "bg.linops.Hessian"),
    "GGN": ("GGN", "bg.linops.GGN"),
    "EF": ("EmpiricalFisher", "bg.linops.EmpiricalFisher"),
    "KFAC": ("KFAC", 'bg.linops.KFAC(fisher_type="mc")'),
    "EKFAC": ("EKFAC", 'bg.linops.EKFAC(fisher_type="mc")'),
}


def build_ours(p: Problem, kind: str) -> Any:
    """One beyondgrad operator over ``[(X, y)]`` (KFAC/EKFAC: MC, seeded generator)."""
    cls = getattr(bg.linops, OURS[kind][0])
    data = [(p.X, p.y)]
    if kind in ("KFAC", "EKFAC"):
        try:
            return cls(
                p.model, p.loss_fn, data, fisher_type="mc", generator=h.generator(p.X.device, 0)
            )
        except RuntimeError as exc:
            if is_tying_refusal(exc):
                raise Refused(str(exc)) from exc
            raise
    return cls(p.model, p.loss_fn, data)


def ours_setup(kind: str, k: int, layout: str = "flat") -> Setup:
    """``A @ v`` / ``A @ V`` of a beyondgrad operator built in set-up (not timed), on a flat
    ``[P, k]`` block or (``layout="params"``) on per-parameter ``[k, *shape]`` tensors."""

    def setup(p: Problem) -> Candidate:
        notes = []
        if kind in ("KFAC", "EKFAC"):
            build_ours(p, kind)  # warm-up build
            t0 = time.perf_counter()
            op = build_ours(p, kind)
            build = (time.perf_counter() - t0) * 1e3
            base = baseline_ms(h.copy_problem(p))
            notes.append(
                f"construction (one pass, in set-up): {h.fmt(build)} ms = "
                f"{h.fmt(build / base)}x fwd+bwd"
            )
        else:
            op = build_ours(p, kind)
            notes.append("operator built in set-up (no pass over the data)")
        if kind == "EF" and p.y[0].numel() > 1:
            notes.append(EF_NOTE.format(ours="per-sequence", other="curvlinops: per-token"))
        v = probe(op.shape[1], k, p.X.device)
        if layout == "params":
            parts = split_flat(v, op.params)  # the layout torch.func and double backward take
            notes.append("vectors and result as per-parameter [k, *shape] tensors (a list)")
            return Candidate(lambda: op @ parts, notes=notes)
        return Candidate(lambda: op @ v, notes=notes)

    return setup


# --------------------------------------------------------------------------------------------
# Product cells: peers
# --------------------------------------------------------------------------------------------

#: rows that are not candidates for the best peer: PyHessian's cached graph leaves out the
#: forward+backward every other row pays
EXCLUDED_PEERS = ("pyhessian (cached graph)",)

CURVLINOPS = {
    "H": "HessianLinearOperator",
    "GGN": "GGNLinearOperator",
    "EF": "EFLinearOperator",
    "KFAC": "KFACLinearOperator",
    "EKFAC": "EKFACLinearOperator",
}


def build_curvlinops(p: Problem, kind: str, fisher_type: str = "mc") -> tuple[Any, list[str]]:
    """A curvlinops operator (``check_deterministic=False``; KFAC/EKFAC: Linear/Conv2d
    parameters only, joint weight and bias, factors computed) and notes on its coverage."""
    import curvlinops

    cls = getattr(curvlinops, CURVLINOPS[kind])
    data = [(p.X, p.y)]
    if kind not in ("KFAC", "EKFAC"):
        return cls(p.model, p.loss_fn, h.trainable(p.model), data, check_deterministic=False), []
    params, n_total = h.curvlinops_params(p.model)
    op = cls(
        p.model,
        p.loss_fn,
        params,
        data,
        check_deterministic=False,
        fisher_type=fisher_type,
        mc_samples=1,
        separate_weight_and_bias=False,
    )
    op.compute_kronecker_factors()
    if kind == "EKFAC":
        op.compute_eigenvalue_correction()
    notes = []
    if len(params) < n_total:
        notes.append(f"PARTIAL: {len(params)}/{n_total} parameter tensors (Linear/Conv2d only)")
    return op, notes


def curvlinops_setup(kind: str, k: int) -> Setup:
    """``A @ v`` / ``A @ V`` of a curvlinops operator built in set-up (not timed; KFAC/EKFAC:
    its construction, timed once, in the notes)."""

    def setup(p: Problem) -> Candidate:
        notes = [f"{CURVLINOPS[kind]}(check_deterministic=False)"]
        if kind in ("KFAC", "EKFAC"):
            build_curvlinops(p, kind)  # warm-up build
            t0 = time.perf_counter()
            op, extra = build_curvlinops(p, kind)
            build = (time.perf_counter() - t0) * 1e3
            base = baseline_ms(h.copy_problem(p))
            notes = [
                f"{CURVLINOPS[kind]}(fisher_type='mc', separate_weight_and_bias=False)",
                *extra,
                f"construction + factors (in set-up): {h.fmt(build)} ms = "
                f"{h.fmt(build / base)}x fwd+bwd",
            ]
        else:
            op, _ = build_curvlinops(p, kind)
        if kind == "EF" and p.y[0].numel() > 1:
            notes.append(EF_NOTE.format(ours="per-token", other="beyondgrad: per-sequence"))
        v = probe(op.shape[1], k, p.X.device)
        return Candidate(lambda: op @ v, notes=notes)

    return setup


def func_hvp_fn(p: Problem) -> Callable[[dict[str, Tensor]], dict[str, Tensor]]:
    """torch.func forward-over-reverse HVP ``jvp(grad(loss))`` (tied weights tied)."""
    from torch.func import functional_call, grad, jvp

    model, loss_fn, X, y = p.model, p.loss_fn, p.X, p.y

    def loss(params: dict[str, Tensor]) -> Tensor:
        return loss_fn(functional_call(model, params, (X,)), y)

    def hvp(tangents: dict[str, Tensor]) -> dict[str, Tensor]:
        params = {n: q.detach() for n, q in model.named_parameters()}
        return jvp(grad(loss), (params,), (tangents,))[1]

    return hvp


def func_ggnvp_fn(p: Problem) -> Callable[[dict[str, Tensor]], dict[str, Tensor]]:
    """torch.func GGN-vector product: ``J v`` by ``jvp``, the loss Hessian on it by
    ``jvp(grad)`` w.r.t. the output, then ``J^T`` by ``vjp``."""
    from torch.func import functional_call, grad, jvp, vjp

    model, loss_fn, X, y = p.model, p.loss_fn, p.X, p.y

    def f(params: dict[str, Tensor]) -> Tensor:
        return functional_call(model, params, (X,))

    def loss_grad(out: Tensor) -> Tensor:
        return grad(lambda o: loss_fn(o, y))(out)

    def ggnvp(tangents: dict[str, Tensor]) -> dict[str, Tensor]:
        params = {n: q.detach() for n, q in model.named_parameters()}
        out, jv = jvp(f, (params,), (tangents,))
        _, hjv = jvp(loss_grad, (out,), (jv,))
        _, pullback = vjp(f, params)
        return pullback(hjv)[0]

    return ggnvp


def func_setup(which: str, k: int) -> Setup:
    """torch.func HVP (``which="hvp"``) or GGNvp (``"ggnvp"``); ``vmap`` over the block."""

    def setup(p: Problem) -> Candidate:
        from torch.func import vmap

        fn = func_hvp_fn(p) if which == "hvp" else func_ggnvp_fn(p)
        params = h.trainable(p.model)
        v = probe(sum(q.numel() for q in params), k, p.X.device)
        tangents = named(split_flat(v, params), p.model)
        call = fn if k == 1 else vmap(fn)
        note = "jvp(grad(loss))" if which == "hvp" else "jvp -> loss-Hessian jvp(grad) -> vjp"
        if k > 1:
            note = f"vmap over {k} columns of " + note
        return Candidate(lambda: call(tangents), notes=[note])

    return setup


def double_backward_setup(k: int) -> Setup:
    """Plain reverse-over-reverse HVP: ``grad(grad(loss), v)`` (``is_grads_batched`` for a
    block)."""

    def setup(p: Problem) -> Candidate:
        params = h.trainable(p.model)
        vs = split_flat(probe(sum(q.numel() for q in params), k, p.X.device), params)

        def call() -> tuple[Tensor, ...]:
            loss = p.loss_fn(p.model(p.X), p.y)
            g = torch.autograd.grad(loss, params, create_graph=True)
            return torch.autograd.grad(g, params, vs, is_grads_batched=k > 1)

        note = "autograd.grad(create_graph) then autograd.grad(g, v)"
        if k > 1:
            note += ", is_grads_batched"
        return Candidate(call, notes=[note])

    return setup


def pyhessian_setup(mode: str) -> Setup:
    """PyHessian: ``"build+1"`` (``hessian()``: fwd+bwd with ``create_graph``, then one HVP),
    ``"cached"`` (one HVP on the graph built in set-up: the cost of each further product) or
    ``"build+k"`` (``hessian()``, then ``K`` HVPs one by one: no block API)."""

    def setup(p: Problem) -> Candidate:
        from pyhessian import hessian
        from pyhessian.utils import hessian_vector_product

        cuda = p.X.device.type == "cuda"
        params = h.trainable(p.model)
        n = sum(q.numel() for q in params)
        k = K if mode == "build+k" else 1
        vs = [split_flat(probe(n, 1, p.X.device, seed=j), params) for j in range(k)]
        notes = {
            "build+1": "hessian(): fwd+bwd(create_graph), then 1 HVP",
            "cached": "1 HVP on the gradient graph cached in set-up (the cost of each further "
            "product; excludes its fwd+bwd)",
            "build+k": f"hessian(), then {K} HVPs one by one (no block API)",
        }[mode]

        def reset() -> None:
            p.model.zero_grad(set_to_none=True)

        if mode == "cached":
            H = hessian(p.model, p.loss_fn, data=(p.X, p.y), cuda=cuda)
            return Candidate(
                lambda: hessian_vector_product(H.gradsH, H.params, vs[0]), notes=[notes]
            )

        def call() -> list[tuple[Tensor, ...]]:
            reset()
            H = hessian(p.model, p.loss_fn, data=(p.X, p.y), cuda=cuda)
            return [hessian_vector_product(H.gradsH, H.params, v) for v in vs]

        return Candidate(call, reset=reset, notes=[notes])

    return setup


# --------------------------------------------------------------------------------------------
# Product cells: the table
# --------------------------------------------------------------------------------------------


def ours(group: str, kind: str, k: int, layout: str = "flat") -> CellSpec:
    """beyondgrad's product cell (``layout="params"``: the per-parameter row)."""
    library = "beyondgrad" if layout == "flat" else "beyondgrad (per-parameter)"
    return CellSpec(group, library, ours_setup(kind, k, layout), OURS[kind][1], False)


def cl(group: str, kind: str, k: int) -> CellSpec:
    """A curvlinops product cell (n/a without curvlinops)."""
    return h.peer_spec(group, "curvlinops", "curvlinops", curvlinops_setup(kind, k))


def ph(group: str, mode: str) -> CellSpec:
    """A PyHessian cell (n/a without PyHessian)."""
    label = "pyhessian (cached graph)" if mode == "cached" else "pyhessian"
    return h.peer_spec(group, label, "pyhessian", pyhessian_setup(mode))


def cell_specs(problem: str, smoke: bool = False) -> list[CellSpec]:
    """Every product row, in table order; missing peers get a reason (``smoke``: the
    single-vector rows only)."""
    specs = [h.BASELINE]
    for k, (hv, gv, ev, kv, ekv) in (
        (1, ("hvp", "ggnvp", "efvp", "kfacvp", "ekfacvp")),
        (K, ("hmp", "ggnmp", "efmp", "kfacmp", "ekfacmp")),
    )[: 1 if smoke else 2]:
        # also in the per-parameter layout (the one torch.func and double backward take)
        layouts = ("flat", "params")
        specs += [
            *(ours(hv, "H", k, layout) for layout in layouts),
            cl(hv, "H", k),
            CellSpec(hv, "torch.func", func_setup("hvp", k)),
            CellSpec(hv, "double backward", double_backward_setup(k)),
        ]
        specs += [ph(hv, "build+1"), ph(hv, "cached")] if k == 1 else [ph(hv, "build+k")]
        specs += [
            *(ours(gv, "GGN", k, layout) for layout in layouts),
            cl(gv, "GGN", k),
            CellSpec(gv, "torch.func", func_setup("ggnvp", k)),
            *(ours(ev, "EF", k, layout) for layout in layouts),
            cl(ev, "EF", k),
            ours(kv, "KFAC", k),
            cl(kv, "KFAC", k),
            ours(ekv, "EKFAC", k),
            cl(ekv, "EKFAC", k),
        ]
    return specs


def slow_cfg(cfg: Config, spec: CellSpec) -> Config:
    """Block products cost up to ~K matvecs: one warm-up call (the first, untimed call) and
    at most one re-timing on a disturbed machine."""
    if not spec.group.endswith("mp"):
        return cfg
    return replace(cfg, warmup=min(cfg.warmup, 1), noise_retries=min(cfg.noise_retries, 1))


# --------------------------------------------------------------------------------------------
# Agreement checks (products)
# --------------------------------------------------------------------------------------------


def module_kinds(model: nn.Module, names: list[str]) -> str:
    """``"LayerNorm: 5, Linear: 1"`` for the owners of the named parameters."""
    owners = h.owner_types(model)
    by_name = dict(model.named_parameters())
    return h.count_kinds([owners.get(id(by_name[n]), "?") for n in names])


@dataclass
class Refs:
    """A problem, its probes ``v`` ``[P]`` and ``V`` ``[P, 4]``, and the reference products."""

    p: Problem
    cfg: Config
    v: Tensor
    V: Tensor
    hv: dict[str, Tensor]  # double backward
    hV: dict[str, Tensor]
    ggnv: dict[str, Tensor]  # torch.func
    ef_sample: dict[str, Tensor]  # torch.func, per-sample empirical Fisher
    ef_term: dict[str, Tensor]  # torch.func, per-term empirical Fisher

    @property
    def n(self) -> int:
        """Number of parameter tensors."""
        return len(h.trainable(self.p.model))

    def flat(self, x: Tensor) -> dict[str, Tensor]:
        """A flat vector (or block) as named parameter-shaped tensors."""
        return named(split_flat(x, h.trainable(self.p.model)), self.p.model)

    def product(self, op: Callable[[], Any], x: Tensor) -> Callable[[], dict[str, Tensor]]:
        """``op() @ x`` as named tensors, computed when called."""
        return lambda: self.flat(op() @ x)


def references(p: Problem, cfg: Config) -> Refs:
    """The reference products of ``p``: double backward (Hessian), torch.func (GGN and the two
    empirical Fishers)."""
    params = h.trainable(p.model)
    P = sum(q.numel() for q in params)
    v, V = probe(P, 1, cfg.device, seed=1), probe(P, 4, cfg.device, seed=2)
    g = torch.autograd.grad(p.loss_fn(p.model(p.X), p.y), params, create_graph=True)
    hv = torch.autograd.grad(g, params, split_flat(v, params), retain_graph=True)
    hV = torch.autograd.grad(g, params, split_flat(V, params), is_grads_batched=True)
    del g
    ggnv = func_ggnvp_fn(p)(named(split_flat(v, params), p.model))
    ef_sample, ef_term = empirical_fisher_refs(p, v)
    return Refs(p, cfg, v, V, named(hv, p.model), named(hV, p.model), ggnv, ef_sample, ef_term)


def agreement(problem: str, cfg: Config) -> dict[str, Any]:
    """Problem facts and float32 agreement of every product with a reference."""
    p = h.fresh_problem(problem, cfg)
    info = {
        "batch": p.X.shape[0],
        "num_params": sum(q.numel() for q in h.trainable(p.model)),
        "param_tensors": len(h.trainable(p.model)),
    }
    refs = references(p, cfg)
    checks = Checks(annotate=partial(module_kinds, p.model))
    our_checks(refs, checks)
    if h.peer_missing("pyhessian") is None:
        pyhessian_checks(refs, checks)
    if h.peer_missing("curvlinops") is None:
        curvlinops_checks(refs, checks)
        kfac_checks(refs, checks)
    return checks.result(info)


def our_checks(r: Refs, checks: Checks) -> None:
    """beyondgrad's Hessian, GGN and empirical Fisher products, and torch.func's HVP."""
    p, tol, data = r.p, r.cfg.tol, [(r.p.X, r.p.y)]

    def hessian() -> Any:
        return bg.linops.Hessian(p.model, p.loss_fn, data)

    def add(name: str, library: str, groups: list[str], value: Any, ref: Any) -> None:
        checks.compare(Check(name, library, groups), value, ref, tol, r.n)

    add("Hessian @ v: beyondgrad vs double backward", "beyondgrad", ["hvp"],
        r.product(hessian, r.v), r.hv)  # fmt: skip
    add("Hessian @ V (4 columns): beyondgrad vs double backward", "beyondgrad", ["hmp"],
        r.product(hessian, r.V), r.hV)  # fmt: skip
    add("Hessian @ v: torch.func jvp(grad) vs double backward", "torch.func", ["hvp", "hmp"],
        lambda: func_hvp_fn(p)(r.flat(r.v)), r.hv)  # fmt: skip
    add("GGN @ v: beyondgrad vs torch.func", "beyondgrad", ["ggnvp"],
        r.product(lambda: bg.linops.GGN(p.model, p.loss_fn, data), r.v), r.ggnv)  # fmt: skip
    add(
        "EmpiricalFisher @ v: beyondgrad vs torch.func, per-sample EF "
        "1/(NT) Σ_n G_n G_nᵀ v (G_n: gradient of sample n's summed loss terms)",
        "beyondgrad",
        ["efvp", "efmp"],
        r.product(lambda: bg.linops.EmpiricalFisher(p.model, p.loss_fn, data), r.v),
        r.ef_sample,
    )


def pyhessian_checks(r: Refs, checks: Checks) -> None:
    """PyHessian's HVP (both of its rows) against double backward."""

    def pyh() -> dict[str, Tensor]:
        from pyhessian import hessian
        from pyhessian.utils import hessian_vector_product

        q = h.copy_problem(r.p)
        Hq = hessian(q.model, q.loss_fn, data=(q.X, q.y), cuda=r.cfg.device == "cuda")
        out = hessian_vector_product(Hq.gradsH, Hq.params, split_flat(r.v, h.trainable(q.model)))
        return named(out, q.model)

    for lib in ("pyhessian", "pyhessian (cached graph)"):
        checks.compare(
            Check(f"Hessian @ v: {lib} vs double backward", lib, ["hvp", "hmp"]),
            pyh,
            r.hv,
            r.cfg.tol,
            r.n,
        )


def curvlinops_checks(r: Refs, checks: Checks) -> None:
    """curvlinops' Hessian, GGN and empirical Fisher products against the references."""

    def add(name: str, groups: list[str], kind: str, ref: Any, x: Tensor) -> None:
        def op() -> Any:
            return build_curvlinops(h.copy_problem(r.p), kind)[0]

        checks.compare(Check(name, "curvlinops", groups), r.product(op, x), ref, r.cfg.tol, r.n)

    add("Hessian @ v: curvlinops vs double backward", ["hvp"], "H", r.hv, r.v)
    add("Hessian @ V (4 columns): curvlinops vs double backward", ["hmp"], "H", r.hV, r.V)
    add("GGN @ v: curvlinops vs torch.func", ["ggnvp", "ggnmp"], "GGN", r.ggnv, r.v)
    add(
        "EmpiricalFisher @ v: curvlinops vs torch.func, per-term EF "
        "1/(NT) Σ_{n,t} g_nt g_ntᵀ v (g_nt: gradient of one loss term)",
        ["efvp", "efmp"],
        "EF",
        r.ef_term,
        r.v,
    )
    p = r.p
    if p.y[0].numel() > 1:
        ours_ef = r.flat(bg.linops.EmpiricalFisher(p.model, p.loss_fn, [(p.X, p.y)]) @ r.v)
        add(
            "EmpiricalFisher @ v: curvlinops vs beyondgrad (informational: per-term vs "
            "per-sample definitions, different matrices when T > 1)",
            [],
            "EF",
            ours_ef,
            r.v,
        )


def empirical_fisher_refs(p: Problem, v: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Two empirical Fishers times ``v`` from torch.func per-sample gradients, for a mean
    loss over N samples of T terms each (T tokens; 1 for the mlp and cnn), which agree for T=1:

    * per sample (beyondgrad's): ``1/(N T) sum_n G_n G_n^T`` with ``G_n`` the gradient of
      sample n's summed loss terms;
    * per term (curvlinops'): ``1/(N T) sum_{n,t} g_nt g_nt^T`` with ``g_nt`` the gradient of
      one term (the transformer: one token's loss; a loop over positions)."""
    from torch.func import functional_call, grad, vmap

    model, loss_fn, X, y = p.model, p.loss_fn, p.X, p.y
    params = h.trainable(model)
    names = [n for n, q in model.named_parameters() if q.requires_grad]
    N, T = X.shape[0], y[0].numel()

    def apply(gs: dict[str, Tensor]) -> Tensor:  # sum_n g_n g_n^T v for per-sample grads
        flat = torch.cat([gs[n].reshape(N, -1) for n in names], 1)
        return flat.T @ (flat @ v)

    per_sample = apply(h.func_per_sample_fn(p)()) * T * T / (N * T)  # G_n = T g_n
    if T == 1:
        per_term = per_sample
    else:
        detached = {n: q.detach() for n, q in model.named_parameters()}

        def term_loss(prm: dict[str, Tensor], x: Tensor, yt: Tensor, t: int) -> Tensor:
            out = functional_call(model, prm, (x.unsqueeze(0),))
            return loss_fn(out[..., t], yt.unsqueeze(0))

        per_term = torch.zeros_like(v)
        for t in range(y.shape[-1]):
            gs = vmap(grad(term_loss), in_dims=(None, 0, 0, None))(detached, X, y[..., t], t)
            per_term += apply(gs)
        per_term /= N * T
    return (
        named(split_flat(per_sample, params), model),
        named(split_flat(per_term, params), model),
    )


def kfac_checks(r: Refs, checks: Checks) -> None:
    """KFAC / EKFAC products against curvlinops, both with the empirical Fisher (deterministic;
    the timed rows use one MC sample, whose draws differ between the libraries)."""

    def ours(kind: str) -> Callable[[], dict[str, Tensor]]:
        def run() -> dict[str, Tensor]:
            p = h.copy_problem(r.p)
            cls = getattr(bg.linops, kind)
            try:
                op = cls(p.model, p.loss_fn, [(p.X, p.y)], fisher_type="empirical")
            except RuntimeError as exc:
                if is_tying_refusal(exc):
                    raise Refused(f"beyondgrad {REFUSED}: " + h.short(str(exc), 140)) from exc
                raise
            return r.flat(op @ r.v)

        return run

    def peer(kind: str) -> Callable[[], dict[str, Tensor]]:
        return lambda: r.flat(build_curvlinops(h.copy_problem(r.p), kind, "empirical")[0] @ r.v)

    for kind, groups in (("KFAC", ["kfacvp", "kfacmp"]), ("EKFAC", ["ekfacvp", "ekfacmp"])):
        checks.compare(
            Check(f"{kind} (empirical) @ v: curvlinops vs beyondgrad", "curvlinops", groups),
            ours(kind),
            peer(kind),
            r.cfg.tol,
            r.n,
            "empirical Fisher (the timed rows use MC)",
        )


# --------------------------------------------------------------------------------------------
# Algorithms: shared machinery
# --------------------------------------------------------------------------------------------


class _Stop(Exception):
    """Raised from a product hook to end a run once its trajectory has what it needs."""


@dataclass
class Opts:
    """Settings of the eigenvalue and trace sections."""

    seeds: list[int]
    eig_cap: int
    ref_iters: int
    trace_cap: int | None  # None: TRACE_CAPS per problem
    trace_ref_matvecs: int
    own_max_iter: int | None = None  # eigsh's max_iter with its own rule (None: its default)

    def cap_for(self, problem: str) -> int:
        """The largest trace budget on ``problem``."""
        return self.trace_cap or TRACE_CAPS.get(problem, 48)


class Job(NamedTuple):
    """One run of a method in the eigen or trace section: the problem, the settings, the
    reference value it aims at, its seed and its largest budget of products."""

    problem: str
    cfg: Config
    memory: h.CpuMemory | None
    ref: float
    seed: int
    cap: int


class Baseline:
    """Plain forward+backward samples in the algorithm's own process, before and after."""

    def __init__(self, problem: str, cfg: Config):
        self.cfg = cfg
        self.base = h.baseline_setup(h.fresh_problem(problem, cfg))
        for _ in range(2):
            self.base.call()
        t = h.time_sample(self.base.call, 1, cfg.device)
        self.k = max(1, math.ceil(cfg.target_s / max(t, 1e-9)))
        self.samples: list[float] = []

    def sample(self, n: int = 3) -> None:
        """Take ``n`` more samples."""
        self.samples += [h.time_sample(self.base.call, self.k, self.cfg.device) for _ in range(n)]
        self.base.reset()

    @property
    def ms(self) -> float:
        """Median sample in ms."""
        return statistics.median(self.samples) * 1e3


@contextlib.contextmanager
def pyhessian_hook(on_hvp: Callable[[tuple[Tensor, ...], list[Tensor]], None]) -> Iterator[None]:
    """Observe every HVP PyHessian computes (its module-level ``hessian_vector_product``).
    The hook adds one inner product per HVP, which PyHessian computes anyway."""
    import pyhessian  # noqa: F401  (its package attribute `hessian` is the class)

    module = sys.modules["pyhessian.hessian"]
    original = module.hessian_vector_product

    def hooked(gradsH: Any, params: Any, v: list[Tensor]) -> tuple[Tensor, ...]:
        hv = original(gradsH, params, v)
        on_hvp(hv, v)
        return hv

    module.hessian_vector_product = hooked
    try:
        yield
    finally:
        module.hessian_vector_product = original


def dot(a: list[Tensor] | tuple[Tensor, ...], b: list[Tensor] | tuple[Tensor, ...]) -> float:
    """Inner product of two lists of tensors."""
    return float(sum((x * y).sum() for x, y in zip(a, b)))


def fallback_runs(p: Problem, kind: str, cap: int, on_hvp: Callable[..., None]) -> None:
    """Without PyHessian: the same algorithms on double-backward HVPs over one cached gradient
    graph (power iteration from a normalized Gaussian vector; Rademacher Hutchinson)."""
    params = h.trainable(p.model)
    g = torch.autograd.grad(p.loss_fn(p.model(p.X), p.y), params, create_graph=True)
    v = [torch.randn_like(q) for q in params]
    if kind == "eigen":
        s = math.sqrt(dot(v, v))
        v = [x / s for x in v]
    for _ in range(cap):
        if kind == "trace":
            v = [torch.randint_like(q, 2) * 2 - 1 for q in params]
        hv = torch.autograd.grad(g, params, v, retain_graph=True)
        on_hvp(hv, v)
        if kind == "eigen":
            s = math.sqrt(dot(hv, hv))
            v = [x / (s + 1e-6) for x in hv]


def peer_label() -> str:
    """The peer of the eigen and trace sections: PyHessian, or this script's own fallback."""
    return "pyhessian" if h.peer_missing("pyhessian") is None else "own (double backward)"


# --------------------------------------------------------------------------------------------
# Top eigenvalue
# --------------------------------------------------------------------------------------------


class RitzRecorder(bg.linops.LinearOperator):
    """Wraps the operator ``eigsh`` runs on and rebuilds its Lanczos matrix on the fly:
    ``alpha_j = q_j . A q_j`` and ``beta_j = q_{j+1} . A q_j`` (exact under eigsh's full
    reorthogonalization), so the top Ritz value after each product is known without extra
    products (two inner products per step)."""

    symmetric = True

    def __init__(self, A: bg.linops.LinearOperator, on_step: Callable[[RitzRecorder], None]):
        super().__init__(A.shape, A.dtype, A.device)
        self.A, self.on_step = A, on_step
        self.alpha: list[float] = []
        self.beta: list[float] = []
        self.times: list[float] = []
        self.estimates: list[float] = []
        self._prev: Tensor | None = None

    def _children(self) -> list[bg.linops.LinearOperator]:
        return [self.A]  # eigsh's repeated_products() reaches the Hessian

    def _matmat(self, M: Tensor) -> Tensor:
        W = self.A @ M
        q, w = M[:, 0], W[:, 0]
        if self._prev is not None:
            self.beta.append(float(q @ self._prev))
        self.alpha.append(float(q @ w))
        self._prev = w
        self.times.append(time.perf_counter())
        m = len(self.alpha)
        T = torch.diag(torch.tensor(self.alpha, dtype=torch.float64))
        if m > 1:
            b = torch.tensor(self.beta[: m - 1], dtype=torch.float64)
            T += torch.diag(b, 1) + torch.diag(b, -1)
        self.estimates.append(float(torch.linalg.eigvalsh(T)[-1]))
        self.on_step(self)
        return W


def first_within(estimates: list[float], ref: float, target: float) -> int | None:
    """1-based index of the first estimate within ``target`` relative error, or None."""
    for i, e in enumerate(estimates):
        if abs(e - ref) <= target * abs(ref):
            return i + 1
    return None


def eigsh_run(
    problem: str,
    cfg: Config,
    memory: h.CpuMemory | None,
    ref: float,
    seed: int,
    tol: float,
    max_iter: int | None,
    abort: bool,
) -> tuple[RitzRecorder, float, float, float]:
    """One observed ``bg.linalg.eigsh(k=1)`` run (``abort``: end once within 1e-3):
    its recorder, start time, wall seconds and peak memory."""
    p = h.fresh_problem(problem, cfg)
    rec: list[RitzRecorder] = []

    def on_step(r: RitzRecorder) -> None:
        if abort and first_within(r.estimates[-1:], ref, EIG_TARGET):
            raise _Stop

    def call() -> float:
        t0 = time.perf_counter()
        rec.append(RitzRecorder(bg.linops.Hessian(p.model, p.loss_fn, [(p.X, p.y)]), on_step))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            with contextlib.suppress(_Stop):
                gen = h.generator(cfg.device, seed)
                bg.linalg.eigsh(rec[0], k=1, tol=tol, max_iter=max_iter, generator=gen)
        return t0

    t0, wall, mib = h.measured_call(call, cfg.device, memory)
    return rec[0], t0, wall, mib


def eig_ours(job: Job, own_max_iter: int | None = None) -> dict[str, Any]:
    """``bg.linalg.eigsh(k=1, tol=1e-3)`` with its default ``max_iter``: products and time
    until the Ritz value is within 1e-3 of the reference, and where its own rule stops. If it
    stops first, a second run (``tol=0``, ``max_iter=cap``) finds the products needed."""
    problem, cfg, memory, ref, seed, cap = job
    run = partial(eigsh_run, problem, cfg, memory, ref, seed)
    rec, t0, wall, mib = run(EIGSH_OWN_TOL, own_max_iter, abort=False)
    reach = first_within(rec.estimates, ref, EIG_TARGET)
    out: dict[str, Any] = {
        "own_stop": {
            "matvecs": len(rec.alpha),
            "s": wall,
            "estimate": rec.estimates[-1],
            "rel_err": abs(rec.estimates[-1] - ref) / abs(ref),
            "rule": f"eigsh(tol={EIGSH_OWN_TOL:g}) residual test, default max_iter",
        },
        "mem_mib": mib,
        "trajectory": rec.estimates,
    }
    if reach is None:
        rec, t0, wall, _ = run(0.0, cap, abort=True)
        reach = first_within(rec.estimates, ref, EIG_TARGET)
        out["trajectory"] = rec.estimates
        out["rerun"] = f"own rule stopped before 1e-3; re-run with tol=0, max_iter={cap}"
    out["matvecs"] = reach
    out["s"] = rec.times[reach - 1] - t0 if reach else None
    out["cap"] = cap if reach is None else None
    return out


def eig_peer(job: Job) -> dict[str, Any]:
    """PyHessian ``hessian(...).eigenvalues(maxIter=cap, tol=0)`` (power iteration on the
    cached gradient graph), observed per HVP: products and time (from before ``hessian()``,
    which builds the graph) until the Rayleigh quotient is within 1e-3; its own rule
    (``tol=1e-3``: relative change between iterates; default ``maxIter=100``) evaluated on
    the same iterates. Ends once both are known or at ``cap``."""
    problem, cfg, memory, ref, seed, cap = job
    p = h.fresh_problem(problem, cfg)
    est: list[float] = []
    times: list[float] = []
    own: dict[str, Any] = {}

    def on_hvp(hv: tuple[Tensor, ...], v: list[Tensor]) -> None:
        est.append(dot(hv, v))
        times.append(time.perf_counter())
        i = len(est)
        if not own and i >= 2 and abs(est[-2] - est[-1]) / (abs(est[-2]) + 1e-6) < PYHESSIAN_TOL:
            own.update(matvecs=i, estimate=est[-2], s=times[-1] - t0[0])
        if not own and i == PYHESSIAN_MAX_ITER:
            own.update(matvecs=i, estimate=est[-1], s=times[-1] - t0[0], note="maxIter reached")
        if (own or i >= PYHESSIAN_MAX_ITER) and (first_within(est, ref, EIG_TARGET) or i >= cap):
            raise _Stop

    t0 = [0.0]

    def call() -> None:
        torch.manual_seed(seed)  # PyHessian draws its start vector from the global generator
        t0[0] = time.perf_counter()
        with contextlib.suppress(_Stop):
            if h.peer_missing("pyhessian") is None:
                from pyhessian import hessian

                with pyhessian_hook(on_hvp):
                    H = hessian(p.model, p.loss_fn, data=(p.X, p.y), cuda=cfg.device == "cuda")
                    H.eigenvalues(maxIter=cap, tol=0.0)
            else:
                fallback_runs(p, "eigen", cap, on_hvp)
        p.model.zero_grad(set_to_none=True)

    _, _, mib = h.measured_call(call, cfg.device, memory)
    reach = first_within(est, ref, EIG_TARGET)
    if own:
        own["rel_err"] = abs(own["estimate"] - ref) / abs(ref)
        own["rule"] = f"relative change < {PYHESSIAN_TOL:g} (maxIter {PYHESSIAN_MAX_ITER})"
    return {
        "matvecs": reach,
        "s": times[reach - 1] - t0[0] if reach else None,
        "cap": cap if reach is None else None,
        "final": est[-1] if est else None,
        "final_rel_err": abs(est[-1] - ref) / abs(ref) if est else None,
        "own_stop": own or None,
        "mem_mib": mib,
        "trajectory": est,
    }


def run_eigen(problem: str, cfg: Config, opts: Opts, memory: h.CpuMemory | None) -> dict[str, Any]:
    """Reference, then both methods for every seed (one process; baseline before and after)."""
    load = h.ForeignLoad()
    load.start()
    base = Baseline(problem, cfg)
    base.sample()
    p = h.fresh_problem(problem, cfg)
    A = bg.linops.Hessian(p.model, p.loss_fn, [(p.X, p.y)])
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        lam, vec = bg.linalg.eigsh(
            A, k=2, tol=1e-10, max_iter=opts.ref_iters, generator=h.generator(cfg.device, REF_SEED)
        )
    x = vec[:, 0] / vec[:, 0].norm()
    ref, second = float(lam[0]), float(lam[1])
    r = float((A @ x - ref * x).norm())
    residual = r / abs(ref)
    bound = r * r / (ref - second) / abs(ref) if ref > second else math.inf
    ref_s = time.perf_counter() - t0
    del A, vec, x, p
    print(
        f"[{problem}] eigen reference {ref:.6g} (residual {residual:.2g}, {ref_s:.0f} s)",
        file=sys.stderr,
    )
    runs = []
    for seed in opts.seeds:
        ours = partial(eig_ours, own_max_iter=opts.own_max_iter)
        for method, fn in (("beyondgrad", ours), (peer_label(), eig_peer)):
            res = fn(Job(problem, cfg, memory, ref, seed, opts.eig_cap))
            res.update(method=method, seed=seed)
            runs.append(res)
            print(
                f"[{problem}] eigen {method} seed {seed}: {res['matvecs']} matvecs, "
                f"{res['s'] if res['s'] is None else round(res['s'], 2)} s, own stop "
                f"{(res['own_stop'] or {}).get('matvecs')} "
                f"({(res['own_stop'] or {}).get('rel_err', float('nan')):.2g})",
                file=sys.stderr,
            )
    base.sample()
    return {
        "reference": {
            "value": ref,
            "second": second,
            "rel_residual": residual,
            "rel_bound": bound,
            "method": f"bg.linalg.eigsh(k=2, tol=1e-10, max_iter={opts.ref_iters}), float32",
            "s": ref_s,
        },
        "base_ms": base.ms,
        "foreign_load": load.stop() if cfg.device == "cpu" else None,
        "runs": runs,
    }


# --------------------------------------------------------------------------------------------
# Trace
# --------------------------------------------------------------------------------------------


class Chunked(bg.linops.LinearOperator):
    """Apply an operator to a block a few columns at a time (bounds memory; reference only)."""

    symmetric = True

    def __init__(self, A: bg.linops.LinearOperator, chunk: int):
        super().__init__(A.shape, A.dtype, A.device)
        self.A, self.chunk = A, chunk

    def _children(self) -> list[bg.linops.LinearOperator]:
        return [self.A]

    def _matmat(self, M: Tensor) -> Tensor:
        return torch.cat([self.A @ c for c in M.split(self.chunk, 1)], 1)


def trace_grid(cap: int) -> list[int]:
    """Budgets 3, 6, 12, ... up to ``cap`` (multiples of 3: Hutch++ splits them in thirds)."""
    out, m = [], 3
    while m <= cap:
        out.append(m)
        m *= 2
    return out


def reached_at(grid: list[int], estimates: list[float], ref: float) -> int | None:
    """The smallest budget whose estimate and the next budget's are both within 5 %."""
    ok = [abs(e - ref) <= TRACE_TARGET * abs(ref) for e in estimates]
    for i in range(len(ok) - 1):
        if ok[i] and ok[i + 1]:
            return grid[i]
    return None


def trace_ours(job: Job, method: str = "hutch++") -> dict[str, Any]:
    """``bg.linalg.trace(Hessian, m, method)`` for budgets m = 3, 6, 12, ... (one clean call
    each, the operator built inside it), until two consecutive budgets are within 5 %."""
    problem, cfg, memory, ref, seed, cap = job
    grid = trace_grid(cap)
    if method == "xtrace":
        grid = [m for m in grid if m >= 6]  # xtrace needs 2 probes
    p = h.fresh_problem(problem, cfg)
    calls = []
    for m in grid:

        def call(m: int = m) -> tuple[Tensor, Tensor | None]:
            A = bg.linops.Hessian(p.model, p.loss_fn, [(p.X, p.y)])
            return bg.linalg.trace(A, m, method=method, generator=h.generator(cfg.device, seed))

        (est, err), s, mib = h.measured_call(call, cfg.device, memory)
        calls.append(
            {
                "matvecs": m,
                "estimate": float(est),
                "stderr": None if err is None else float(err),
                "s": s,
                "mem_mib": mib,
            }
        )
        if reached_at(grid, [c["estimate"] for c in calls], ref):
            break
    reach = reached_at(grid, [c["estimate"] for c in calls], ref)
    at = next((c for c in calls if c["matvecs"] == reach), None)
    last = calls[-1]
    projected = None
    if last["stderr"] is not None and method == "hutch++":
        # the deflated part's per-probe spread at the largest budget, g = m - 2 (m // 3) probes
        g = last["matvecs"] - 2 * (last["matvecs"] // 3)
        sd = last["stderr"] * math.sqrt(g)
        projected = 3 * math.ceil((sd / (TRACE_TARGET * abs(ref))) ** 2)
    return {
        "projected": projected,
        "matvecs": reach,
        "s": at["s"] if at else None,
        "mem_mib": at["mem_mib"] if at else max(c["mem_mib"] for c in calls),
        "stderr_rel": (at["stderr"] / abs(ref)) if at and at["stderr"] is not None else None,
        "cap": cap if reach is None else None,
        "calls": calls,
    }


def trace_exact(job: Job) -> dict[str, Any]:
    """``bg.linops.Hessian(...).trace()``: exact, one pass with the engine's ``DiagHessian``
    (raises on models outside its rules, e.g. LayerNorm)."""
    problem, cfg, memory, ref, _seed, _cap = job
    p = h.fresh_problem(problem, cfg)

    def call() -> Tensor:
        return bg.linops.Hessian(p.model, p.loss_fn, [(p.X, p.y)]).trace()

    try:
        value, s, mib = h.measured_call(call, cfg.device, memory)
    except RuntimeError as exc:
        return {"matvecs": None, "s": None, "mem_mib": None, "cap": None, "error": str(exc)}
    return {
        "matvecs": 0,
        "s": s,
        "mem_mib": mib,
        "estimate": float(value),
        "rel_err": abs(float(value) - ref) / abs(ref),
        "cap": None,
    }


@dataclass
class Hutchinson:
    """A Rademacher Hutchinson run observed per HVP: ``zᵀHz`` per probe and when it came;
    where PyHessian's own rule (``tol=1e-3`` on the change of the running mean; default
    ``maxIter=100``) would stop; ``early``: probes after which PyHessian returned by itself."""

    grid: list[int]
    ref: float
    cap: int
    samples: list[float] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    own: dict[str, Any] = field(default_factory=dict)
    t0: float = 0.0
    early: int | None = None

    def means(self) -> list[float]:
        """Running means at the budgets reached."""
        return [statistics.fmean(self.samples[:m]) for m in self.grid if m <= len(self.samples)]

    def restart(self) -> None:
        """Start (again) from no samples, the clock now."""
        self.samples.clear()
        self.times.clear()
        self.t0 = time.perf_counter()

    def on_hvp(self, hv: tuple[Tensor, ...], v: list[Tensor]) -> None:
        """Record one probe; :class:`_Stop` once both budgets and own rule are known."""
        self.samples.append(dot(hv, v))
        self.times.append(time.perf_counter())
        i, own = len(self.samples), self.own
        if not own and i >= 2:
            prev, cur = statistics.fmean(self.samples[:-1]), statistics.fmean(self.samples)
            if abs(cur - prev) / (prev + 1e-6) < PYHESSIAN_TOL:
                own.update(matvecs=i, estimate=cur, s=self.times[-1] - self.t0)
        if not own and i == PYHESSIAN_MAX_ITER:
            mean = statistics.fmean(self.samples)
            own.update(matvecs=i, estimate=mean, s=self.times[-1] - self.t0, note="maxIter reached")
        if (own or i >= PYHESSIAN_MAX_ITER) and (
            reached_at(self.grid, self.means(), self.ref) or i >= self.cap
        ):
            raise _Stop

    def summary(self, mib: float) -> dict[str, Any]:
        """The run's record (as that of :func:`trace_ours`)."""
        ref, samples = self.ref, self.samples
        reach = reached_at(self.grid, self.means(), ref)
        if self.own:
            self.own["rel_err"] = abs(self.own["estimate"] - ref) / abs(ref)
            self.own["rule"] = (
                f"running-mean change < {PYHESSIAN_TOL:g} (maxIter {PYHESSIAN_MAX_ITER})"
            )
        sd = statistics.stdev(samples[:reach]) if reach and reach > 1 else None
        sd_all = statistics.stdev(samples) if len(samples) > 1 else None
        return {
            "projected": (
                math.ceil((sd_all / (TRACE_TARGET * abs(ref))) ** 2) if sd_all is not None else None
            ),
            "matvecs": reach,
            "s": self.times[reach - 1] - self.t0 if reach else None,
            "mem_mib": mib,
            "stderr_rel": sd / math.sqrt(reach) / abs(ref) if sd is not None and reach else None,
            "cap": self.cap if reach is None else None,
            "own_stop": self.own or None,
            "note": EARLY_NOTE.format(self.early) if self.early else "",
            "estimates": dict(zip([m for m in self.grid if m <= len(samples)], self.means())),
            "samples": samples,
        }


EARLY_NOTE = (
    "PyHessian's trace() returned after {} probes (its relative-change test divides by the "
    "signed running mean, so it stops as soon as that is negative); products and time from the "
    "same Hutchinson on double-backward HVPs over a cached graph (this script)"
)


def trace_peer(job: Job) -> dict[str, Any]:
    """PyHessian ``hessian(...).trace(maxIter=cap, tol=0)`` (Rademacher Hutchinson, one HVP
    per probe on the cached graph), observed per HVP: the running mean at the same budgets and
    rule as ours; time from before ``hessian()`` to the budget's last HVP; its own rule on
    the same samples (:class:`Hutchinson`)."""
    problem, cfg, memory, ref, seed, cap = job
    p = h.fresh_problem(problem, cfg)
    run = Hutchinson(trace_grid(cap), ref, cap)

    def call() -> None:
        torch.manual_seed(seed)  # PyHessian draws its probes from the global generator
        run.restart()
        with contextlib.suppress(_Stop):
            if h.peer_missing("pyhessian") is None:
                from pyhessian import hessian

                with pyhessian_hook(run.on_hvp):
                    H = hessian(p.model, p.loss_fn, data=(p.X, p.y), cuda=cfg.device == "cuda")
                    H.trace(maxIter=cap, tol=0.0)
                # returned by itself before maxIter: its test divides by the signed running
                # mean, so a negative running mean ends it whatever tol says
                if len(run.samples) < cap:
                    run.early = len(run.samples)
            else:
                fallback_runs(p, "trace", cap, run.on_hvp)
        p.model.zero_grad(set_to_none=True)
        if run.early:  # the same estimator on double-backward HVPs, to get its budget anyway
            torch.manual_seed(seed)
            run.restart()
            with contextlib.suppress(_Stop):
                fallback_runs(p, "trace", cap, run.on_hvp)

    _, _, mib = h.measured_call(call, cfg.device, memory)
    return run.summary(mib)


def run_trace(problem: str, cfg: Config, opts: Opts, memory: h.CpuMemory | None) -> dict[str, Any]:
    """Reference, then every method for every seed (one process; baseline before and after)."""
    load = h.ForeignLoad()
    load.start()
    base = Baseline(problem, cfg)
    base.sample()
    p = h.fresh_problem(problem, cfg)
    t0 = time.perf_counter()
    try:
        diag = bg.compute(p.model, p.loss_fn, p.X, p.y, bg.DiagHessian())[bg.DiagHessian]
        reference = {
            "value": float(sum(t.double().sum() for t in diag.values())),
            "method": "exact: sum of bg.compute(..., bg.DiagHessian())",
            "stderr_rel": 0.0,
        }
    except RuntimeError as exc:
        A = Chunked(bg.linops.Hessian(p.model, p.loss_fn, [(p.X, p.y)]), 16)
        est, err = bg.linalg.trace(
            A, opts.trace_ref_matvecs, method="hutch++", generator=h.generator(cfg.device, REF_SEED)
        )
        reference = {
            "value": float(est),
            "method": f"hutch++ with {opts.trace_ref_matvecs} products (Rademacher, 16 "
            f"columns per pass); DiagHessian raises: {h.short(str(exc), 140)}",
            "stderr_rel": float(err) / abs(float(est)) if err is not None else None,
        }
    reference["s"] = time.perf_counter() - t0
    ref = reference["value"]
    del p
    print(
        f"[{problem}] trace reference {ref:.6g} ({reference['method'][:40]}, "
        f"{reference['s']:.0f} s)",
        file=sys.stderr,
    )
    runs = []
    for seed in opts.seeds:
        for method, fn in (
            ("beyondgrad", trace_ours),
            ("beyondgrad xtrace", partial(trace_ours, method="xtrace")),
            ("beyondgrad exact", trace_exact),
            (peer_label(), trace_peer),
        ):
            if method == "beyondgrad exact" and seed != opts.seeds[0]:
                continue  # deterministic: one run
            res = fn(Job(problem, cfg, memory, ref, seed, opts.cap_for(problem)))
            res.update(method=method, seed=seed)
            runs.append(res)
            print(
                f"[{problem}] trace {method} seed {seed}: {res['matvecs']} matvecs, "
                f"{res['s'] if res['s'] is None else round(res['s'], 2)} s",
                file=sys.stderr,
            )
    base.sample()
    return {
        "reference": reference,
        "base_ms": base.ms,
        "foreign_load": load.stop() if cfg.device == "cpu" else None,
        "runs": runs,
    }


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def run_problem(
    problem: str, cfg: Config, opts: Opts, sections: list[str], memory: h.CpuMemory | None
) -> dict[str, Any]:
    """The chosen sections of one problem, each part in a child of its own (on CPU)."""
    t0 = time.perf_counter()
    out: dict[str, Any] = {"problem": problem}

    def isolated(fn: Callable[[], Any]) -> Any:
        try:
            return h.run_isolated(fn, cfg.cell_timeout_s, cfg.isolate)
        except Exception as exc:
            h.log(f"[{problem}] error: {h.short(str(exc), 300)}")
            return {"error": h.short(str(exc).splitlines()[0] if str(exc) else repr(exc), 300)}

    if "products" in sections:
        cfg_for = partial(slow_cfg, cfg)
        specs = cell_specs(problem, cfg.smoke)
        rows = h.run_cells(problem, specs, cfg, memory, GROUPS, cfg_for)
        out["rows"] = [asdict(r) for r in rows]
        out["head_to_head"] = h.head_to_heads(problem, specs, rows, cfg, EXCLUDED_PEERS)
        out["agreement"] = h.run_agreement(problem, partial(agreement, problem, cfg), cfg)
    if "eigen" in sections:
        out["eigen"] = isolated(lambda: run_eigen(problem, cfg, opts, memory))
    if "trace" in sections:
        out["trace"] = isolated(lambda: run_trace(problem, cfg, opts, memory))
    out["wall_s"] = time.perf_counter() - t0
    return out


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def _median(xs: list[float | None]) -> float | None:
    ys = [x for x in xs if x is not None]
    return statistics.median(ys) if ys else None


def algo_summary(sec: dict[str, Any], method: str) -> dict[str, Any]:
    """Seed medians of one method's runs (None where a seed did not reach the target)."""
    runs = [r for r in sec["runs"] if r["method"] == method]
    reached = [r for r in runs if r["matvecs"] is not None]
    own = [r["own_stop"] for r in runs if r.get("own_stop")]
    return {
        "n": len(runs),
        "reached": len(reached),
        "matvecs": [r["matvecs"] for r in runs],
        "caps": sorted({r["cap"] for r in runs if r.get("cap")}),
        "med_matvecs": _median([r["matvecs"] for r in reached]),
        "med_s": _median([r["s"] for r in reached]),
        "med_ratio": _median([r["s"] * 1e3 / sec["base_ms"] for r in reached]),
        "med_mem": _median([r["mem_mib"] for r in runs]),
        "own_matvecs": _median([o["matvecs"] for o in own]),
        "own_err": _median([o["rel_err"] for o in own]),
        "own_errs": [o["rel_err"] for o in own],
        "own_s": _median([o["s"] for o in own]),
        "projected": _median([r.get("projected") for r in runs]),
    }


def _reach(s: dict[str, Any], projected: bool = False) -> str:
    if s["reached"] == 0:
        txt = f"not within {s['caps'][0] if s['caps'] else '?'} mv"
        if projected and s["projected"] is not None:
            txt += f" (projected {h.fmt(s['projected'])})"
        return txt
    txt = f"{h.fmt(s['med_matvecs'])} mv, {h.fmt(s['med_ratio'])}x"
    if s["reached"] < s["n"]:
        txt += f" ({s['reached']}/{s['n']} seeds)"
    return txt


def _own(s: dict[str, Any]) -> str:
    if s["own_matvecs"] is None:
        return "-"
    return f"{h.fmt(s['own_matvecs'])} mv, err {h.fmt(s['own_err'], 2)}"


def render(meta: dict[str, Any], results: list[dict[str, Any]]) -> str:
    """The markdown report."""
    title = "Curvature operators and their linear algebra: beyondgrad vs peers"
    lines = [
        *h.header_lines(meta, title),
        *(f"* **Correction after the run**: {c}" for c in meta.get("corrections", [])),
        *h.protocol_lines(meta),
        f"* **Products**: the {K}-column blocks get 1 warm-up call and at most one re-timing. "
        "Operators are built in set-up (not timed); KFAC/EKFAC construction (one pass over the "
        "data) is in the notes. Each library takes its native vector format (flat tensor: "
        "beyondgrad, curvlinops; per-parameter list/dict: double backward, torch.func, "
        "PyHessian), prepared in set-up; beyondgrad's Hessian, GGN and empirical Fisher "
        "products also run on per-parameter tensors (rows `beyondgrad "
        "(per-parameter)`), and the "
        "summary shows beyondgrad's faster row, named when it is that one.",
        "* **Eigenvalue / trace**: one process per problem and section; the fwd+bwd baseline is "
        "sampled there before and after the runs (its median is the denominator). Time of a "
        "run: from before the operator (beyondgrad) or `hessian()` (PyHessian, which builds "
        "the gradient graph) to the product at which the target was reached. Seeds: "
        f"{meta['seeds']}; tables give seed medians over the seeds that reached the target. "
        "Hooks observe each product (eigsh: two inner products per step on its strided basis "
        "columns, which inflates its times a little; PyHessian: one inner product per HVP).",
        "",
        *h.summary_table(
            results,
            GROUPS,
            "Summary: products, time x fwd+bwd (peak memory x fwd+bwd)",
            "Best peer: the fastest peer row that ran (PyHessian's cached-graph row excluded: it "
            "leaves out the forward+backward every other row pays), marked where it covers only "
            "some parameters (partial) or failed an agreement check (disagrees).",
            exclude=EXCLUDED_PEERS,
        ),
        *eigen_summary(results),
        *trace_summary(results),
    ]
    for res in results:
        lines += render_products(res, meta)
        lines += render_eigen(res)
        lines += render_trace(res)
    return "\n".join(lines) + "\n"


def finished(results: list[dict[str, Any]], section: str) -> list[dict[str, Any]]:
    """The problems whose ``section`` ran to the end."""
    return [r for r in results if isinstance(r.get(section), dict) and "runs" in r[section]]


def peer_of(sec: dict[str, Any]) -> str:
    """The peer method of an eigen or trace section (PyHessian or this script's own)."""
    return next(x["method"] for x in sec["runs"] if not x["method"].startswith("beyondgrad"))


def eigen_summary(results: list[dict[str, Any]]) -> list[str]:
    """Top eigenvalue: products and time to 1e-3 per problem (seed medians)."""
    lines: list[str] = []
    eig = finished(results, "eigen")
    if eig:
        lines += [
            f"## Summary: top Hessian eigenvalue to {EIG_TARGET:g} relative accuracy",
            "",
            "Products (mv) and time x fwd+bwd until the estimate is within 1e-3 of the "
            "reference (seed medians); *own stop*: where the method's own stopping rule ends "
            "(eigsh: residual tol=1e-3; PyHessian: relative change < 1e-3) and the median "
            "relative error there.",
            "",
            "| problem | λ_max | beyondgrad eigsh (Lanczos) | peer power iteration | "
            "eigsh own stop | peer own stop |",
            "|---|---:|---|---|---|---|",
        ]
        for r in eig:
            sec = r["eigen"]
            peer = peer_of(sec)
            s_o, s_p = algo_summary(sec, "beyondgrad"), algo_summary(sec, peer)
            lines.append(
                f"| {r['problem']} | {sec['reference']['value']:.5g} | {_reach(s_o)} | "
                f"{peer}: {_reach(s_p)} | {_own(s_o)} | {_own(s_p)} |"
            )
        lines.append("")
    return lines


def trace_summary(results: list[dict[str, Any]]) -> list[str]:
    """Trace: products and time to 5 % per problem (seed medians), or the projection."""
    lines: list[str] = []
    tr = finished(results, "trace")
    if tr:
        lines += [
            f"## Summary: Hessian trace to {TRACE_TARGET:.0%}",
            "",
            "Products (mv) and time x fwd+bwd to reach 5 % (seed medians), or the budget cap "
            "and the budget projected from the observed variance for a 5 % standard error; "
            "the median relative error of both at the largest budget every run evaluated; "
            "PyHessian's own stopping rule (running-mean change < 1e-3).",
            "",
            "| problem | trace (reference) | beyondgrad exact `Hessian.trace()` | "
            "beyondgrad hutch++ | beyondgrad xtrace | peer Hutchinson | "
            "rel. error at equal budget (hutch++ / xtrace / peer) | peer own stop |",
            "|---|---:|---|---|---|---|---|---|",
        ]
        for r in tr:
            sec = r["trace"]
            peer = peer_of(sec)
            s_o, s_p = algo_summary(sec, "beyondgrad"), algo_summary(sec, peer)
            s_x = algo_summary(sec, "beyondgrad xtrace")
            budget, errs = equal_budget_errors(sec, ["beyondgrad", "beyondgrad xtrace", peer])
            ref = sec["reference"]
            kind = "exact" if ref.get("stderr_rel") == 0.0 else "hutch++"
            lines.append(
                f"| {r['problem']} | {ref['value']:.5g} ({kind}) | {_exact(sec)} | "
                f"{_reach(s_o, True)} | {_reach(s_x) if s_x['n'] else '-'} | "
                f"{peer}: {_reach(s_p, True)} | at {budget} mv: "
                + " / ".join(h.fmt(e, 2) for e in errs)
                + f" | {_own(s_p)} |"
            )
        lines.append("")
    return lines


def _exact(sec: dict[str, Any]) -> str:
    run = next((r for r in sec["runs"] if r["method"] == "beyondgrad exact"), None)
    if run is None:
        return "-"
    if run.get("error"):
        return "raises (" + h.short(run["error"].split("(")[0], 60) + ")"
    return f"1 pass, {h.fmt(run['s'] * 1e3 / sec['base_ms'])}x (err {h.fmt(run['rel_err'], 2)})"


def trace_estimates(run: dict[str, Any]) -> dict[int, float]:
    """Estimate per budget of one trace run (ours: one call each; peer: running means; the
    exact trace: none)."""
    if "calls" in run:
        return {c["matvecs"]: c["estimate"] for c in run["calls"]}
    return {int(m): e for m, e in run.get("estimates", {}).items()}


def equal_budget_errors(sec: dict[str, Any], methods: list[str]) -> tuple[int, list[float | None]]:
    """The largest budget every estimator run evaluated and each method's median relative
    error there."""
    ref = sec["reference"]["value"]
    runs = [r for r in sec["runs"] if r["method"] in methods and trace_estimates(r)]
    budget = min((max(trace_estimates(r)) for r in runs), default=0)
    if budget == 0:
        return 0, [None] * len(methods)

    def err(method: str) -> float | None:
        return _median(
            [
                abs(trace_estimates(r)[budget] - ref) / abs(ref)
                for r in runs
                if r["method"] == method and budget in trace_estimates(r)
            ]
        )

    return budget, [err(m) for m in methods]


def render_products(res: dict[str, Any], meta: dict[str, Any]) -> list[str]:
    """One problem's product table and its agreement checks."""
    if "rows" not in res:
        return []
    agree = res.get("agreement", {})
    lines = [f"## {res['problem']}: products ({meta['device']})", ""]
    lines += h.problem_intro(res, agree.get("info", {}), base_mem=False)
    lines += ["", *h.rows_table(res["rows"], agree.get("checks", []), GROUPS)]
    return lines + h.agreement_table(
        res["problem"],
        agree,
        meta["tol"],
        "relative = max abs difference / max abs reference value over all compared tensors; "
        "per-tensor mismatches in *detail*, with the module types owning them.",
    )


def _noise_note(sec: dict[str, Any]) -> str:
    fl = sec.get("foreign_load")
    if fl is None:
        return ""
    return f" Other processes used {fl:.0%} of the CPUs meanwhile" + (
        " (NOISY)." if fl > 0.2 else "."
    )


def render_eigen(res: dict[str, Any]) -> list[str]:
    """One problem's eigenvalue table: per method and seed."""
    sec = res.get("eigen")
    if sec is None:
        return []
    lines = [f"## {res['problem']}: top Hessian eigenvalue to {EIG_TARGET:g} relative accuracy", ""]
    if "error" in sec:
        return [*lines, f"error: {sec['error']}", ""]
    ref = sec["reference"]
    lines += [
        f"Reference λ_max = {ref['value']:.7g} from {ref['method']} ({ref['s']:.0f} s; next "
        f"Ritz value {ref['second']:.5g}). Relative residual ‖Hx − λx‖/|λ| = "
        f"{ref['rel_residual']:.2g}; the reference's relative error is at most about "
        f"‖r‖²/(gap·|λ|) = {ref['rel_bound']:.2g} (gap from the next Ritz value). "
        f"Baseline fwd+bwd in this process: {h.fmt(sec['base_ms'])} ms.{_noise_note(sec)}",
        "",
        "| method | seed | products to 1e-3 | time to 1e-3 [s] | x fwd+bwd | peak mem [MiB] | "
        "own stop: products | own stop: rel. error | own stop: time [s] | notes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in sec["runs"]:
        own = r.get("own_stop") or {}
        label = (
            "beyondgrad eigsh (Lanczos)"
            if r["method"] == "beyondgrad"
            else f"{r['method']} power iteration"
        )
        notes = [x for x in (own.get("rule"), own.get("note"), r.get("rerun")) if x]
        if r["matvecs"] is None:
            notes.append(
                f"not within {r['cap']} products (rel. error there "
                f"{r.get('final_rel_err', float('nan')):.2g})"
            )
            final = r.get("final")
            if final is not None and abs(final) > abs(ref["value"]) * (1 + EIG_TARGET):
                notes.append(
                    f"converges to {final:.5g}: power iteration finds the eigenvalue of "
                    "largest magnitude, here a negative one"
                )
        lines.append(
            f"| {label} | {r['seed']} | {r['matvecs'] or '-'} | {h.fmt(r['s'])} | "
            f"{h.fmt(r['s'] * 1e3 / sec['base_ms']) if r['s'] else '-'} | {h.fmt(r['mem_mib'])} | "
            f"{own.get('matvecs', '-')} | {h.fmt(own.get('rel_err'), 2) if own else '-'} | "
            f"{h.fmt(own.get('s')) if own else '-'} | {'; '.join(notes)} |"
        )
    return [*lines, ""]


def render_trace(res: dict[str, Any]) -> list[str]:
    """One problem's trace table: per method and seed."""
    sec = res.get("trace")
    if sec is None:
        return []
    lines = [f"## {res['problem']}: Hessian trace to {TRACE_TARGET:.0%}", ""]
    if "error" in sec:
        return [*lines, f"error: {sec['error']}", ""]
    ref = sec["reference"]
    err = f" (relative standard error {ref['stderr_rel']:.2g})" if ref.get("stderr_rel") else ""
    lines += [
        f"Reference trace = {ref['value']:.7g}, {ref['method']}{err}; {ref['s']:.0f} s. "
        f"Budgets 3, 6, 12, ...; *products to 5 %*: the smallest budget whose estimate and "
        "the next budget's are both within 5 % (Hutchinson: running means of one probe "
        "sequence; Hutch++: independent calls). *its std. error*: at that budget, from "
        "the method's own sample variance. *projected for 5 %*: products for a 5 % standard "
        "error from the variance seen at the largest budget (Hutch++: of its deflated part, "
        "with the range sketch no better than there: pessimistic). Baseline fwd+bwd in this "
        "process: "
        f"{h.fmt(sec['base_ms'])} ms.{_noise_note(sec)}",
        "",
        "| method | seed | products to 5 % | time [s] | x fwd+bwd | peak mem [MiB] | "
        "its std. error (rel.) | projected for 5 % | own stop: products | "
        "own stop: rel. error | relative error by budget | notes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in sec["runs"]:
        own = r.get("own_stop") or {}
        label = {
            "beyondgrad": "beyondgrad trace(hutch++)",
            "beyondgrad xtrace": "beyondgrad trace(xtrace)",
            "beyondgrad exact": "beyondgrad Hessian.trace() (exact, DiagHessian)",
        }.get(r["method"], f"{r['method']} Hutchinson")
        if r["method"] == "beyondgrad exact":
            if r.get("error"):
                lines.append(
                    f"| {label} | - | - | | - | | | | | | | raises: {h.short(r['error'], 160)} |"
                )
            else:
                ratio = h.fmt(r["s"] * 1e3 / sec["base_ms"])
                lines.append(
                    f"| {label} | - | 0 | {h.fmt(r['s'])} | {ratio} | "
                    f"{h.fmt(r['mem_mib'])} | | | | | exact: {r['rel_err']:.2g} | one pass |"
                )
            continue
        by = trace_estimates(r)
        traj = ", ".join(
            f"{m}: {abs(e - ref['value']) / abs(ref['value']):.2g}" for m, e in sorted(by.items())
        )
        reach = r["matvecs"] if r["matvecs"] else f"> {r['cap']}"
        lines.append(
            f"| {label} | {r['seed']} | {reach} | {h.fmt(r['s'])} | "
            f"{h.fmt(r['s'] * 1e3 / sec['base_ms']) if r['s'] else '-'} | {h.fmt(r['mem_mib'])} | "
            f"{h.fmt(r.get('stderr_rel'), 2)} | {h.fmt(r.get('projected'))} | "
            f"{own.get('matvecs', '-')} | "
            f"{h.fmt(own.get('rel_err'), 2) if own else '-'} | {traj} | {r.get('note', '')} |"
        )
    return [*lines, ""]


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

SECTIONS = ("products", "eigen", "trace")


def parse_args(argv: list[str] | None = None) -> Any:
    """The shared options plus the sections' own."""
    ap = SCRIPT.parser()
    ap.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    ap.add_argument(
        "--from-json",
        type=Path,
        default=None,
        help="only re-render the markdown of a finished run's JSON (to --out or next to it)",
    )
    ap.add_argument(
        "--seeds", type=int, default=None, help="seeds per eigen/trace method (3; quick 2)"
    )
    ap.add_argument(
        "--eig-cap", type=int, default=None, help="most products per eigen run (150; quick 40)"
    )
    ap.add_argument(
        "--trace-cap",
        type=int,
        default=None,
        help=f"largest trace budget (default per problem {TRACE_CAPS}; quick 24)",
    )
    ap.add_argument(
        "--ref-iters",
        type=int,
        default=None,
        help="products of the eigen reference (100; quick 40)",
    )
    ap.add_argument(
        "--trace-ref-matvecs",
        type=int,
        default=None,
        help="Hutch++ products of the trace reference where DiagHessian raises (300; quick 60)",
    )
    return ap.parse_args(argv)


def options(args: Any) -> Opts:
    """The eigen and trace settings (``--quick`` and ``--smoke`` shrink them)."""
    size = "smoke" if args.smoke else ("quick" if args.quick else "full")
    seeds, eig_cap, ref_iters, trace_cap, ref_mv = {
        "full": (3, 150, 100, None, 300),
        "quick": (2, 40, 40, 24, 60),
        "smoke": (1, 6, 10, 6, 12),
    }[size]
    return Opts(
        own_max_iter=eig_cap if args.smoke else None,
        seeds=list(range(args.seeds or seeds)),
        eig_cap=args.eig_cap or eig_cap,
        ref_iters=args.ref_iters or ref_iters,
        trace_cap=args.trace_cap or trace_cap,
        trace_ref_matvecs=args.trace_ref_matvecs or ref_mv,
    )


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or re-render a finished run) and write its tables."""
    args = parse_args(argv)
    if args.from_json is not None:  # re-render a finished run
        data = json.loads(args.from_json.read_text())
        out = args.out or args.from_json.with_suffix(".md")
        out.write_text(render(data["meta"], data["results"]))
        h.log(f"wrote {out}")
        return 0
    cfg, memory, meta = SCRIPT.start(args, argv)
    out = SCRIPT.output(args)
    opts = options(args)
    meta.update(sections=args.sections, seeds=opts.seeds, opts=asdict(opts))
    jobs = [partial(run_problem, p, cfg, opts, args.sections, memory) for p in args.problems]
    results = h.timed_runs(meta, jobs)
    h.write_results(out, {"meta": meta, "results": results}, lambda: render(meta, results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
