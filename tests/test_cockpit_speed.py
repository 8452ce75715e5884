"""The Cockpit's shortcuts against the general paths and float64 oracles: Alpha's start point
from the gradient tests' dot products for a plain SGD step, HessMaxEV's warm-started Lanczos,
the histogram range's order statistics, nested sessions recording each layer call once, and
the trainer callbacks' shared base."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from beyondgrad.cockpit import Cockpit, _engine, formulas
from beyondgrad.cockpit import reductions as red
from beyondgrad.integrations.base import CockpitCallbackBase
from models import CASES
from oracles.first_order import per_sample_grads

torch.set_default_dtype(torch.float64)


def _step(cockpit, model, loss_fn, X, y, step, optimizer):
    optimizer.zero_grad()
    with cockpit(step, optimizer=optimizer):
        loss = loss_fn(model(X), y)
        loss.backward()
    optimizer.step()
    return cockpit.output()[step]


def _per_sample(model, loss_fn, X, y):
    """Per-sample losses and gradients ``[N, D]`` (scaled so the batch gradient is their mean)."""
    N = y.shape[0]
    per = per_sample_grads(model, loss_fn, X, y)
    G = torch.cat([v.reshape(N, -1) for v in per.values()], 1) * N
    f = torch.stack([loss_fn(model(X[n : n + 1]), y[n : n + 1]) for n in range(N)]).detach()
    return f, G


@pytest.mark.parametrize(
    "case, options, projections",
    [
        ("mlp", {}, 2),
        ("mlp", {"momentum": 0.9}, 4),
        ("mlp", {"weight_decay": 0.1}, 4),
        ("gpt", {}, 2),
        ("gpt", {"momentum": 0.9}, 4),
    ],
)
def test_alpha_matches_the_oracle_with_and_without_the_sgd_shortcut(
    monkeypatch, case, options, projections
):
    """Plain SGD: the start point's slopes come from the dot products (one projection per
    Alpha, at its end point); momentum or weight decay: projected on the update (two).
    Counted over steps 1 and 2 (each the end of one Alpha and the start of the next). On the
    GPT (positions: rows materialized) the end point's slopes and the gradient tests' dot
    products come from one product per layer with the two vectors stacked."""
    fused = []
    both = _engine.Rows.projections

    def projections_counted(self, direction, dots):
        fused.extend([1] if direction is not None and dots and self._form.materialized else [])
        return both(self, direction, dots)

    monkeypatch.setattr(_engine.Rows, "projections", projections_counted)
    calls = []
    original = red.directional
    monkeypatch.setattr(red, "directional", lambda *a: calls.append(1) or original(*a))
    gather = red.gather_rows

    def gather_counted(*a):  # the end point's slopes: formed with the step's other reductions
        calls.extend([1] if a[6] is not None else [])
        return gather(*a)

    monkeypatch.setattr(red, "gather_rows", gather_counted)
    import beyondgrad.cockpit.updates as upd

    monkeypatch.setattr(upd, "directional", red.directional)
    model, X, y, loss_fn = CASES[case]()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, **options)
    cockpit = Cockpit(model, loss_fn, config="economy")
    _step(cockpit, model, loss_fn, X, y, 0, opt)  # momentum buffers exist from here on
    before = [p.detach().clone() for p in model.parameters()]
    f0, G0 = _per_sample(model, loss_fn, X, y)
    calls.clear()
    _step(cockpit, model, loss_fn, X, y, 1, opt)
    s = torch.cat([(p.detach() - b).reshape(-1) for p, b in zip(model.parameters(), before)])
    f1, G1 = _per_sample(model, loss_fn, X, y)
    rec = _step(cockpit, model, loss_fn, X, y, 2, opt)
    assert len(calls) == projections
    assert rec["Alpha"] == pytest.approx(formulas.alpha(f0, G0 @ s, f1, G1 @ s), rel=1e-8)
    assert len(fused) > 0 or case == "mlp"  # the GPT's rows: the fused product ran
    g = G1.mean(0)
    assert rec["InnerTest"] == pytest.approx(
        float(((G1 @ g - g @ g) ** 2).sum() / (len(G1) * (len(G1) - 1))) ** 0.5 / float(g @ g),
        rel=1e-8,
    )


def test_clipped_gradients_take_the_general_path(monkeypatch):
    """A gradient modified between backward and step (clipping): the update is not
    ``-lr * grad``, so the slopes are projected on the measured update."""
    calls = []
    import beyondgrad.cockpit.updates as upd

    original = upd.directional
    monkeypatch.setattr(upd, "directional", lambda *a: calls.append(1) or original(*a))
    model, X, y, loss_fn = CASES["mlp"]()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cockpit = Cockpit(model, loss_fn, config="economy")
    opt.zero_grad()
    with cockpit(0, optimizer=opt):
        loss_fn(model(X), y).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
    opt.step()
    assert calls == [1]
    calls.clear()
    _step(cockpit, model, loss_fn, X, y, 1, opt)
    _step(cockpit, model, loss_fn, X, y, 2, opt)
    assert calls == []  # plain steps: the shortcut


def _dense_hessian_eigenvalues(model, loss_fn, X, y) -> torch.Tensor:
    params = dict(model.named_parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in params.values()])
    shapes = [p.shape for p in params.values()]

    def loss_of(theta):
        chunks, start = {}, 0
        for n, shape in zip(params, shapes):
            chunks[n] = theta[start : start + shape.numel()].view(shape)
            start += shape.numel()
        return loss_fn(torch.func.functional_call(model, chunks, (X,)), y)

    return torch.linalg.eigvalsh(torch.func.hessian(loss_of)(flat))


def _dense_max_ev(model, loss_fn, X, y) -> float:
    return float(_dense_hessian_eigenvalues(model, loss_fn, X, y)[-1])


def test_warm_started_hess_max_ev_matches_the_dense_hessian_and_survives_a_restart():
    model, X, y, loss_fn = CASES["mlp"]()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    cockpit = Cockpit(model, loss_fn, config=["Loss", "HessMaxEV"], hess_iters=200, hess_tol=1e-4)
    assert cockpit.curvature.warm.vector is None
    for step in range(2):
        _step(cockpit, model, loss_fn, X, y, step, opt)
    warm = cockpit.curvature.warm.vector.clone()
    expected = _dense_max_ev(model, loss_fn, X, y)  # the Hessian at step 2's parameters
    rec = _step(cockpit, model, loss_fn, X, y, 2, opt)
    assert rec["HessMaxEV"] == pytest.approx(expected, rel=1e-6)
    assert not torch.equal(cockpit.curvature.warm.vector, warm)  # carried to the next step
    again = Cockpit(model, loss_fn, config=["Loss", "HessMaxEV"], hess_iters=200, hess_tol=1e-4)
    again.load_state_dict(cockpit.state_dict())
    torch.testing.assert_close(again.curvature.warm.vector, cockpit.curvature.warm.vector)


def test_hess_max_ev_default_tolerance_is_close_and_takes_fewer_products(monkeypatch):
    """The default residual tolerance (1e-2) stops Lanczos early; the eigenvalue stays within
    1e-3 of the dense Hessian's (quadratic accuracy in the residual). Bad values are refused."""
    from beyondgrad.cockpit.hessian import HessianOfGraph

    products = []
    original = HessianOfGraph._matmat
    monkeypatch.setattr(
        HessianOfGraph, "_matmat", lambda self, M: products.append(M.shape[1]) or original(self, M)
    )
    model, X, y, loss_fn = CASES["mlp"]()
    expected = _dense_max_ev(model, loss_fn, X, y)
    counts = {}
    for tol in (1e-2, 1e-6):
        products.clear()
        cockpit = Cockpit(
            model, loss_fn, config=["Loss", "HessMaxEV"], hess_iters=200, hess_tol=tol
        )
        rec = _step(cockpit, model, loss_fn, X, y, 0, torch.optim.SGD(model.parameters(), lr=0.0))
        counts[tol] = sum(products)
        assert rec["HessMaxEV"] == pytest.approx(expected, rel=1e-3 if tol == 1e-2 else 1e-9)
    assert counts[1e-2] < counts[1e-6]
    for bad in (0.0, 1.0, -1e-3):
        with pytest.raises(ValueError, match="hess_tol"):
            Cockpit(model, loss_fn, config=["HessMaxEV"], hess_tol=bad)


def test_hess_max_ev_residual_bounds_its_error_and_an_early_stop_is_said():
    """HessMaxEVResidual is ``||H v - value v|| / |value|``: a dense eigenvalue lies within
    ``residual * |value|`` of the logged value, at most ``hess_tol`` once Lanczos converged;
    stopped after ``hess_iters`` products it is larger and the Cockpit warns (once)."""
    model, X, y, loss_fn = CASES["mlp"]()
    eigenvalues = _dense_hessian_eigenvalues(model, loss_fn, X, y)
    sgd = torch.optim.SGD(model.parameters(), lr=0.0)  # the Hessian stays that of step 0
    cockpit = Cockpit(model, loss_fn, config=["Loss", "HessMaxEV"], hess_iters=200, hess_tol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a converged run does not warn
        rec = _step(cockpit, model, loss_fn, X, y, 0, sgd)
    assert 0 <= rec["HessMaxEVResidual"] <= 1e-6
    assert rec["HessMaxEV"] == pytest.approx(float(eigenvalues[-1]), rel=1e-9)

    early = Cockpit(model, loss_fn, config=["Loss", "HessMaxEV"], hess_iters=2, hess_tol=1e-6)
    with pytest.warns(RuntimeWarning, match=r"HessMaxEV stopped after hess_iters=2 .*residual"):
        first = _step(early, model, loss_fn, X, y, 0, sgd)
    value, residual = first["HessMaxEV"], first["HessMaxEVResidual"]
    assert residual > 1e-6
    assert value < float(eigenvalues[-1]) * (1 - 1e-6)  # a lower bound, not converged
    nearest = float((eigenvalues - value).abs().min())
    assert nearest <= residual * abs(value) * (1 + 1e-9)
    # a residual 10x too small would not bound the error
    assert nearest > residual * abs(value) / 10
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _step(early, model, loss_fn, X, y, 1, sgd)  # warned once


@pytest.mark.parametrize("quantile", [0.0, 0.25, 0.5, 0.9, 0.99, 0.999])
def test_histogram_range_is_torch_quantile_to_the_bit(quantile):
    g = torch.Generator().manual_seed(int(quantile * 1000))
    for n in (1, 2, 7, 1000, 4097):
        for dtype in (torch.float32, torch.float64):
            values = torch.randn(n, generator=g, dtype=dtype) * 1e-3
            expected = float(torch.quantile(values.abs(), quantile)) or float(values.abs().max())
            assert formulas.robust_limit(values, quantile) == (expected or 1.0)


def test_nested_sessions_record_each_layer_call_once():
    """business: the curvature session inside the first-order watch; neither replays a
    layer's forward to check the other's hook (a user hook ahead of them still is)."""
    model, X, y, loss_fn = CASES["mlp"]()
    calls = []
    first = next(m for m in model.modules() if isinstance(m, nn.Linear))
    original = first.forward
    first.forward = lambda x: calls.append(1) or original(x)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    cockpit = Cockpit(model, loss_fn, config="business", curvature_mc=None)
    _step(cockpit, model, loss_fn, X, y, 0, opt)  # probes the samples' coupling once
    calls.clear()
    rec = _step(cockpit, model, loss_fn, X, y, 1, opt)
    assert "HessTrace" in rec and "NormTest" in rec
    assert len(calls) == 1


def test_callback_base_builds_the_cockpit_for_the_model(tmp_path):
    model, _, _, loss_fn = CASES["mlp"]()
    holder = nn.Module()
    holder.net, holder.loss_fn = model, loss_fn
    base = CockpitCallbackBase("business", log_dir=None, seed=3)
    cockpit = base.attach(holder, tmp_path / "default")
    assert base.cockpit is cockpit and cockpit.loss_fn is loss_fn
    assert cockpit.config == "business" and cockpit.log_dir == tmp_path / "default"
    explicit = CockpitCallbackBase(loss_fn="loss_fn", log_dir=tmp_path / "mine")
    assert explicit.attach(holder, tmp_path / "default").log_dir == tmp_path / "mine"
    with pytest.raises(ValueError, match="loss module"):
        CockpitCallbackBase(loss_fn="missing").attach(holder, tmp_path)


def test_alpha_end_point_by_the_gram_trick_matches_the_oracle(monkeypatch):
    """Plain SGD on wide dense layers with a small batch: the end point's slopes along the
    update ``-lr * sum_m h_m`` come from the rows kept at the start (``sum_m (G_n.H_m)
    (A_n.B_m)``), not from a projection on the measured update; Alpha equals the oracle's
    on the measured update. A batch modified in place in between falls back to projecting."""
    from beyondgrad.cockpit._engine import DenseLayer

    used = []  # the earlier layers read by the Gram trick (inner products across steps)
    original = DenseLayer.inner

    def spy(self, other=None):
        if other is not None:
            used.append(other.names)
        return original(self, other)

    monkeypatch.setattr(DenseLayer, "inner", spy)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(24, 40), nn.Tanh(), nn.Linear(40, 30), nn.Tanh(), nn.Linear(30, 3)
    )
    X, y = torch.randn(5, 24), torch.randint(0, 3, (5,))
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cockpit = Cockpit(model, loss_fn, config="economy")
    _step(cockpit, model, loss_fn, X, y, 0, opt)
    before = [p.detach().clone() for p in model.parameters()]
    f0, G0 = _per_sample(model, loss_fn, X, y)
    used.clear()
    _step(cockpit, model, loss_fn, X, y, 1, opt)
    assert used == [("0.weight", "0.bias"), ("2.weight", "2.bias")]  # not the 30 -> 3 one
    s = torch.cat([(p.detach() - b).reshape(-1) for p, b in zip(model.parameters(), before)])
    f1, G1 = _per_sample(model, loss_fn, X, y)
    rec = _step(cockpit, model, loss_fn, X, y, 2, opt)
    assert rec["Alpha"] == pytest.approx(formulas.alpha(f0, G0 @ s, f1, G1 @ s), rel=1e-8)
    used.clear()
    X.mul_(1.0)  # an in-place change of the kept layer input: the Gram trick is refused
    _step(cockpit, model, loss_fn, X, y, 3, opt)
    assert used == [("2.weight", "2.bias")]  # the first layer's kept input changed: projected


def test_gradient_only_instruments_watch_no_per_sample_rows(monkeypatch):
    """GradNorm, Distance and UpdateSize come from autograd's gradient and the parameters:
    such a configuration captures no per-sample rows (no layer hooks, no forms)."""
    from beyondgrad.cockpit import _engine

    def refuse(*args, **kwargs):
        raise AssertionError("per-sample rows were captured")

    monkeypatch.setattr(_engine.StepWatch, "rows", refuse)
    monkeypatch.setattr(_engine, "capture", refuse)
    model, X, y, loss_fn = CASES["mlp"]()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cockpit = Cockpit(model, loss_fn, config=["Loss", "GradNorm", "Distance", "UpdateSize"])
    rec = _step(cockpit, model, loss_fn, X, y, 0, opt)
    rec1 = _step(cockpit, model, loss_fn, X, y, 1, opt)
    rec1 = cockpit.output()[1]  # with step 1's update size
    norms = {n: float(p.grad.norm()) for n, p in model.named_parameters()}  # step 1's gradient
    assert rec1["GradNorm"] == pytest.approx(sum(v**2 for v in norms.values()) ** 0.5, rel=1e-10)
    assert rec1["GradNorm_layers"] == pytest.approx(norms, rel=1e-10)
    assert rec["UpdateSize"] > 0 and rec1["Distance"] > 0
