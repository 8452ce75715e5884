"""Cockpit edges (float64 oracles): models that couple their samples, Hessian-vector products
that autograd cannot form exactly, fused attention, per-instrument oracles not covered by
test_cockpit.py, and the instrument objects (needs computed once, custom instruments)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.attention import SDPBackend, sdpa_kernel

import beyondgrad as bg
from beyondgrad.cockpit import Cockpit, Instrument, _engine
from beyondgrad.cockpit import reductions as red
from models import CASES
from oracles.curvature import ggn
from oracles.first_order import per_sample_grads

torch.set_default_dtype(torch.float64)


def _track(cockpit, model, loss_fn, X, y, step=0, optimizer=None):
    (optimizer or model).zero_grad()
    with cockpit(step, optimizer=optimizer):
        loss = loss_fn(model(X), y)
        loss.backward()
    if optimizer is not None:
        optimizer.step()
    return cockpit.output()[step]


def _hessian_max_ev(model, loss_fn, X, y) -> float:
    """Largest eigenvalue of the dense Hessian of the mini-batch loss (torch.func)."""
    params = dict(model.named_parameters())
    names, shapes = list(params), [p.shape for p in params.values()]
    flat = torch.cat([p.detach().reshape(-1) for p in params.values()])

    def loss_of(theta):
        chunks = dict(
            zip(
                names, (c.view(s) for c, s in zip(theta.split([s.numel() for s in shapes]), shapes))
            )
        )
        return loss_fn(torch.func.functional_call(model, chunks, (X,)), y)

    with sdpa_kernel([SDPBackend.MATH]):
        H = torch.func.hessian(loss_of)(flat)
    return float(torch.linalg.eigvalsh(H)[-1])


def _finite_difference_max_ev(model, loss_fn, X, y, eps: float = 1e-5) -> float:
    """Largest eigenvalue of the Hessian by central differences of autograd's gradient (an
    oracle independent of double backward; torch.func's hessian through batch_norm in
    training mode is off by ~3% on torch 2.13)."""
    params = list(model.parameters())

    def grad_at(shift):
        pieces = [c.view_as(p) for c, p in zip(shift.split([p.numel() for p in params]), params)]
        with torch.no_grad():
            torch._foreach_add_(params, pieces)
        loss = loss_fn(model(X), y)
        g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, params)])
        with torch.no_grad():
            torch._foreach_sub_(params, pieces)
        return g

    n = sum(p.numel() for p in params)
    cols = [(grad_at(eps * e) - grad_at(-eps * e)) / (2 * eps) for e in torch.eye(n)]
    H = torch.stack(cols, 1)
    return float(torch.linalg.eigvalsh((H + H.T) / 2)[-1])


# -- samples coupled by BatchNorm ---------------------------------------------------------------
def _batchnorm_mlp(track_running_stats: bool = False):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 6), nn.BatchNorm1d(6, track_running_stats=track_running_stats), nn.Tanh(),
        nn.Linear(6, 3),
    ).train()  # fmt: skip
    return model, torch.randn(6, 4), torch.randint(0, 3, (6,)), nn.CrossEntropyLoss()


PER_SAMPLE = {
    "Alpha", "NormTest", "InnerTest", "OrthoTest", "GradNoiseScale", "GradHist1d", "MeanGSNR",
    "EarlyStopping", "CABS", "HessTrace", "TICDiag", "TICTrace", "GradHist2d", "LayerSpectra",
}  # fmt: skip


def test_batchnorm_in_train_mode_drops_per_sample_instruments_and_keeps_exact_ones():
    model, X, y, loss_fn = _batchnorm_mlp()
    cockpit = Cockpit(
        model, loss_fn, config="full", curvature_mc=None, hess_iters=200, hess_tol=1e-4
    )
    with pytest.warns(RuntimeWarning, match="couples the samples"):
        rec = _track(cockpit, model, loss_fn, X, y)
    assert set(rec["dropped"]) == PER_SAMPLE
    assert not PER_SAMPLE & set(rec)  # nothing undefined is logged
    assert set(cockpit.dropped) == PER_SAMPLE and "BatchNorm1d" in cockpit.dropped["NormTest"]
    # what is defined is exact: loss, gradient norm (batch statistics as the function they
    # are), and the largest Hessian eigenvalue of the mini-batch loss
    loss = loss_fn(model(X), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert rec["Loss"] == pytest.approx(float(loss.detach()), rel=1e-12)
    assert rec["GradNorm"] == pytest.approx(
        float(torch.cat([g.reshape(-1) for g in grads]).norm()), rel=1e-10
    )
    assert rec["HessMaxEV"] == pytest.approx(
        _finite_difference_max_ev(model, loss_fn, X, y), rel=1e-6
    )


def test_batchnorm_train_mode_update_size_still_logged_and_raise_mode():
    model, X, y, loss_fn = _batchnorm_mlp(track_running_stats=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cockpit = Cockpit(model, loss_fn, config="economy")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.warns(RuntimeWarning, match="BatchNorm1d"):
        rec0 = _track(cockpit, model, loss_fn, X, y, step=0, optimizer=opt)
        step = torch.cat([(p.detach() - b).reshape(-1) for p, b in zip(model.parameters(), before)])
        rec1 = _track(cockpit, model, loss_fn, X, y, step=1, optimizer=opt)
    assert "NormTest" not in rec0 and "Alpha" not in rec1
    assert rec0["UpdateSize"] == pytest.approx(float(step.norm()), rel=1e-10)
    assert rec1["Distance"] == pytest.approx(float(step.norm()), rel=1e-10)
    strict = Cockpit(model, loss_fn, config="economy", on_undefined="raise")
    with pytest.raises(RuntimeError, match=r"NormTest.*couples the samples"), strict(0):
        pass
    model.eval()  # running statistics: samples independent again, everything logged
    assert "NormTest" in _track(strict, model, loss_fn, X, y, step=0)
    with pytest.raises(ValueError, match="on_undefined"):
        Cockpit(model, loss_fn, on_undefined="ignore")


def test_batchnorm_resnet_in_train_mode_logs_no_gradient_tests():
    """Issue: NormTest / GradNoiseScale were logged (and wrong) on a training ResNet."""
    model, X, y, loss_fn = CASES["resnet"]()
    model.train()
    cockpit = Cockpit(model, loss_fn, config="economy")
    with pytest.warns(RuntimeWarning):
        rec = _track(cockpit, model, loss_fn, X, y)
    assert "NormTest" not in rec and "GradNoiseScale" not in rec and "GradNorm" in rec


# -- Hessian-vector products that autograd cannot form exactly -------------------------------------
class _OnceTanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        out = torch.tanh(x)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        return grad * (1 - out**2)


class _TanhNet(nn.Module):
    def __init__(self, once: bool):
        super().__init__()
        self.once, self.a, self.b = once, nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = self.a(x)
        return self.b(_OnceTanh.apply(h) if self.once else torch.tanh(h))


def test_hess_max_ev_refused_through_once_differentiable_op():
    """Issue: HessMaxEV came out 5.3 instead of 1.18: autograd silently drops the second
    derivative of a @once_differentiable function."""
    torch.manual_seed(0)
    X, y, loss_fn = torch.randn(8, 4), torch.randint(0, 3, (8,)), nn.CrossEntropyLoss()
    exact = _TanhNet(once=False)
    once = _TanhNet(once=True)
    once.load_state_dict(exact.state_dict())
    cockpit = Cockpit(exact, loss_fn, config=["Loss", "HessMaxEV"], hess_iters=200, hess_tol=1e-4)
    rec = _track(cockpit, exact, loss_fn, X, y)
    assert rec["HessMaxEV"] == pytest.approx(_hessian_max_ev(exact, loss_fn, X, y), rel=1e-6)
    cockpit = Cockpit(
        once, loss_fn, config=["Loss", "GradNorm", "HessMaxEV"], hess_iters=200, hess_tol=1e-4
    )
    with pytest.warns(RuntimeWarning, match=r"_OnceTanh.*once_differentiable"):
        rec = _track(cockpit, once, loss_fn, X, y)
    assert "HessMaxEV" not in rec and rec["dropped"] == ["HessMaxEV"] and "GradNorm" in rec
    strict = Cockpit(once, loss_fn, config=["HessMaxEV"], on_undefined="raise")
    with pytest.raises(RuntimeError, match=r"HessMaxEV not computed.*once_differentiable"):
        _track(strict, once, loss_fn, X, y)


def test_hess_max_ev_refused_without_double_backward_formula():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Hardsigmoid(), nn.Linear(6, 3))
    X, y, loss_fn = torch.randn(8, 4), torch.randint(0, 3, (8,)), nn.CrossEntropyLoss()
    cockpit = Cockpit(model, loss_fn, config=["Loss", "HessMaxEV"])
    with pytest.warns(RuntimeWarning, match="hardsigmoid_backward"):
        rec = _track(cockpit, model, loss_fn, X, y)
    assert "HessMaxEV" not in rec and math.isfinite(rec["Loss"])


class _SDPANet(nn.Module):
    """Causal attention through F.scaled_dot_product_attention (fused kernel by default)."""

    def __init__(self, d: int = 8, heads: int = 2, classes: int = 3):
        super().__init__()
        self.heads, self.qkv, self.out = heads, nn.Linear(d, 3 * d), nn.Linear(d, classes)

    def forward(self, x):
        N, T, d = x.shape
        q, k, v = self.qkv(x).view(N, T, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(h.transpose(1, 2).reshape(N, T, d).mean(1))


def test_full_config_on_sdpa_attention_uses_a_twice_differentiable_kernel():
    """Issue: config="full" died with "derivative for ..._flash_attention_..._backward is not
    implemented"."""
    torch.manual_seed(0)
    model = _SDPANet()
    X, y, loss_fn = torch.randn(5, 4, 8), torch.randint(0, 3, (5,)), nn.CrossEntropyLoss()
    cockpit = Cockpit(
        model, loss_fn, config="full", curvature_mc=None, hess_iters=200, hess_tol=1e-4
    )
    rec = _track(cockpit, model, loss_fn, X, y)
    assert "dropped" not in rec
    assert rec["HessMaxEV"] == pytest.approx(_hessian_max_ev(model, loss_fn, X, y), rel=1e-6)
    dense = ggn(model, loss_fn, X, y)["full"]
    assert rec["HessTrace"] == pytest.approx(float(torch.diagonal(dense).sum()), rel=1e-8)
    G = (
        torch.cat([v.reshape(5, -1) for v in per_sample_grads(model, loss_fn, X, y).values()], 1)
        * 5
    )
    g = G.mean(0)
    assert rec["GradNoiseScale"] == pytest.approx(
        float(((G - g) ** 2).sum()) / 4 / float(g @ g), rel=1e-8
    )


# -- per-instrument oracles not covered elsewhere -------------------------------------------------
def test_cabs_and_per_layer_values_match_brute_force():
    model, X, y, loss_fn = CASES["mlp"]()
    opt = torch.optim.SGD(model.parameters(), lr=0.03)
    cockpit = Cockpit(model, loss_fn, config="business", curvature_mc=None)
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    per = per_sample_grads(model, loss_fn, X, y)
    N = y.shape[0]
    G = torch.cat([v.reshape(N, -1) for v in per.values()], 1) * N
    loss = float(loss_fn(model(X), y))
    diag = torch.diagonal(ggn(model, loss_fn, X, y)["full"])
    rec = _track(cockpit, model, loss_fn, X, y, optimizer=opt)
    var = (G**2).mean(0) - G.mean(0) ** 2
    assert rec["CABS"] == pytest.approx(0.03 * float(var.sum()) / loss, rel=1e-8)
    start = 0
    for name, v in per.items():
        size = v[0].numel()
        assert rec["GradNorm_layers"][name] == pytest.approx(float(v.sum(0).norm()), rel=1e-9)
        assert rec["HessTrace_layers"][name] == pytest.approx(
            float(diag[start : start + size].sum()), rel=1e-8
        )
        moved = model.get_parameter(name).detach() - theta0[name]
        assert rec["UpdateSize_layers"][name] == pytest.approx(float(moved.norm()), rel=1e-10)
        start += size


def test_gradient_histograms_count_the_sampled_per_sample_entries():
    """Re-draw the Cockpit's entries (same seed, same order) and histogram the true entries."""
    model, X, y, loss_fn = CASES["mlp"]()
    bins, entries, samples = 7, 20, 3
    cockpit = Cockpit(
        model, loss_fn, config=["GradHist1d", "GradHist2d"], hist_bins=bins,
        hist_entries=entries, hist_samples=samples, seed=3,
    )  # fmt: skip
    rec = _track(cockpit, model, loss_fn, X, y)
    N = y.shape[0]
    g = torch.Generator().manual_seed(3)
    values, thetas = [], []
    per = per_sample_grads(model, loss_fn, X, y)
    L = len(per)  # all layers drawn at once: samples (taken in turn), then entries
    chosen = torch.rand(L, N, generator=g).argsort(1)[:, :samples]
    picks = chosen[:, torch.arange(entries) % samples]
    uniform = torch.rand(L, entries, generator=g, dtype=torch.float64)
    for i, (name, v) in enumerate(per.items()):
        D = v[0].numel()
        E = min(entries, samples * D)
        rows, flat = picks[i, :E], (uniform[i, :E] * D).floor().long()
        assert len(set(rows.tolist())) <= samples and int(flat.max()) < D
        values.append(v.reshape(N, -1)[rows, flat] * N)
        thetas.append(model.get_parameter(name).detach().reshape(-1)[flat])
    values, thetas = torch.cat(values), torch.cat(thetas)
    limit = float(torch.quantile(values.abs(), 0.99))  # a robust range: the 99% quantile
    assert limit < float(values.abs().max())
    assert rec["GradHist1d"]["limit"] == pytest.approx(limit, rel=1e-12)
    assert rec["GradHist1d"]["clipped"] == int((values.abs() > limit).sum()) > 0
    clamped = values.clamp(-limit, limit)  # entries beyond the range: in the edge bins
    expected = torch.histc(clamped, bins=bins, min=-limit, max=limit)
    assert rec["GradHist1d"]["counts"] == expected.tolist()
    t_lim = float(torch.quantile(thetas.abs(), 0.99))
    expected2 = torch.histogramdd(
        torch.stack([thetas.clamp(-t_lim, t_lim), clamped], 1),
        bins=[bins, bins],
        range=[-t_lim, t_lim, -limit, limit],
    ).hist
    assert rec["GradHist2d"]["counts"] == expected2.tolist()


# -- instruments as objects ------------------------------------------------------------------------
def test_shared_reductions_are_computed_once_per_step(monkeypatch):
    model, X, y, loss_fn = CASES["mlp"]()
    calls = {"batch_l2": 0, "dots_with_sum": 0, "sum_grad_squared": 0}
    for method in calls:
        original = getattr(_engine.Rows, method)

        def counted(self, *args, _m=method, _f=original):
            calls[_m] += 1
            return _f(self, *args)

        monkeypatch.setattr(_engine.Rows, method, counted)
    grouped: list[list[str]] = []
    small_layers = red._small_layers

    def small_counted(small, *args):
        grouped.append(list(small))
        return small_layers(small, *args)

    monkeypatch.setattr(red, "_small_layers", small_counted)
    cockpit = Cockpit(model, loss_fn, config="business")  # 4 tests share l2/dots, 5 share sgs
    _track(cockpit, model, loss_fn, X, y)
    names = [n for n, _ in model.named_parameters()]
    biases = [n for n in names if n.endswith("bias")]  # held as rows: read as one matrix
    assert grouped == [biases]
    layers = len(names) - len(biases)
    assert calls == {"batch_l2": layers, "dots_with_sum": layers, "sum_grad_squared": layers}


def test_a_custom_instrument_is_one_object():
    model, X, y, loss_fn = CASES["mlp"]()

    def grad_max(data):
        return {"GradMax": float(torch.cat(data.grads).abs().max())}

    custom = Instrument("GradMax", frozenset({red.GRAD}), grad_max)
    cockpit = Cockpit(model, loss_fn, config=["Loss", custom, "NormTest"])
    rec = _track(cockpit, model, loss_fn, X, y)
    grads = torch.autograd.grad(loss_fn(model(X), y), list(model.parameters()))
    assert rec["GradMax"] == pytest.approx(
        float(torch.cat([g.reshape(-1) for g in grads]).abs().max()), rel=1e-12
    )
    assert "NormTest" in rec and not custom.per_sample
    assert all(name in bg.cockpit.REGISTRY for name in bg.cockpit.INSTRUMENTS)


class _MixedPrecisionNet(nn.Module):
    """A float32 layer (and norm) feeding a float64 one: held rows of two dtypes."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(5, 4)
        self.norm = nn.LayerNorm(4)
        self.second = nn.Linear(4, 3, dtype=torch.float64)

    def forward(self, x):
        h = torch.tanh(self.norm(self.first(x.to(self.first.weight.dtype))))
        return self.second(h.to(self.second.weight.dtype))


def test_held_rows_of_two_dtypes_are_reduced_apart_and_match_float64():
    """Biases and norm parameters are read as one concatenated matrix per dtype: a float32
    and a float64 group give the gradient tests and histogram of the all-float64 twin."""
    g = torch.Generator().manual_seed(0)
    X, y = (
        torch.randn(12, 5, generator=g, dtype=torch.float64),
        torch.randint(3, (12,), generator=g),
    )
    mixed = _MixedPrecisionNet()
    twin = _MixedPrecisionNet().double()
    twin.load_state_dict({k: v.double() for k, v in mixed.state_dict().items()})
    loss_fn = nn.CrossEntropyLoss()
    config = ["NormTest", "InnerTest", "OrthoTest", "GradNorm", "GradHist1d"]
    rec = _track(Cockpit(mixed, loss_fn, config=config, seed=1), mixed, loss_fn, X, y)
    ref = _track(Cockpit(twin, loss_fn, config=config, seed=1), twin, loss_fn, X, y)
    for key in ("NormTest", "InnerTest", "OrthoTest", "GradNorm"):
        assert rec[key] == pytest.approx(ref[key], rel=1e-5)
    assert rec["GradHist1d"]["counts"] == ref["GradHist1d"]["counts"]


def _scaled_run(scale: float | None, steps: int, weight_gain: float = 1.0):
    """Records of the economy preset on a tiny MLP trained by SGD through a ``GradScaler``
    with ``init_scale=scale`` (None: no scaler)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).float()  # fp32 range
    with torch.no_grad():
        model[2].weight.mul_(weight_gain)
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    scaler = None if scale is None else torch.amp.GradScaler("cpu", init_scale=scale)
    cockpit = Cockpit(model, loss_fn, config="economy")
    X, y = torch.randn(16, 4, dtype=torch.float32), torch.randint(0, 3, (16,))
    for step in range(steps):
        opt.zero_grad()
        with cockpit(step, optimizer=opt):
            loss = loss_fn(model(X), y)
            (loss if scaler is None else scaler.scale(loss)).backward()
        if scaler is None:
            opt.step()
        else:
            scaler.step(opt)
            scaler.update()
    return cockpit.records


def test_loss_scaled_steps_match_unscaled_and_overflows_are_logged_not_raised():
    """Through a GradScaler the instruments read the gradients per unit of loss (the same
    values as without a scaler); a step whose scaled layer gradients overflow, which the
    scaler skips, is logged with its loss and ``overflow`` instead of raising out of the
    training loop. Without a loss scale a non-finite gradient still raises."""
    plain, scaled = _scaled_run(None, 3), _scaled_run(2.0**10, 3)
    for a, b in zip(plain, scaled):
        for key in ("Loss", "GradNorm", "NormTest", "InnerTest", "OrthoTest"):
            assert math.isclose(a[key], b[key], rel_tol=1e-5), (key, a[key], b[key])
    # output gradients ~1e4 * 0.1 * 2^127 overflow until the scaler has halved the scale
    # about 20 times; then the steps are measured again
    records = _scaled_run(2.0**127, 24, weight_gain=1e4)
    overflowed = [rec for rec in records if "overflow" in rec]
    measured = [rec for rec in records if "overflow" not in rec]
    assert overflowed and measured and records.index(measured[0]) == len(overflowed)
    assert all(math.isfinite(rec["Loss"]) and "NormTest" not in rec for rec in overflowed)
    assert "non-finite gradient" in overflowed[0]["overflow"]  # a layer's output gradient
    # (later: finite layer gradients, overflowing parameter gradients: the values are checked)
    assert any("loss-scaled" in rec["overflow"] for rec in overflowed)
    assert all(math.isfinite(rec["NormTest"]) for rec in measured)
    # a user's non-finite info number is logged as given, not taken for an overflow
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).float()
    loss_fn, scaler = nn.CrossEntropyLoss(), torch.amp.GradScaler("cpu", init_scale=2.0**10)
    cockpit = Cockpit(model, loss_fn, config="economy")
    X, y = torch.randn(16, 4, dtype=torch.float32), torch.randint(0, 3, (16,))
    with cockpit(0, val_loss=float("nan")) as record:
        scaler.scale(loss_fn(model(X), y)).backward()
    assert "overflow" not in record and math.isfinite(record["NormTest"])
    assert math.isnan(record["val_loss"])
    # without a loss scale (the backward seeded with 1) the engine's error is raised
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).float()
    loss_fn = nn.CrossEntropyLoss()
    cockpit = Cockpit(model, loss_fn, config="economy")
    X, y = torch.randn(16, 4, dtype=torch.float32), torch.randint(0, 3, (16,))
    X[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="not finite"):
        with cockpit(0):
            loss_fn(model(X), y).backward()
