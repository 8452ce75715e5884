"""What the Cockpit and the engine remember from step to step follows changes of the model and
of the loss between steps: each step's record equals that of a fresh Cockpit."""

from __future__ import annotations

import warnings

import torch
from torch import nn

import beyondgrad as bg


def _step(cockpit, model, loss_fn, X, y, step):
    model.zero_grad(set_to_none=True)
    with cockpit(step) as record:
        loss = loss_fn(model(X), y)
        loss.backward()
    return record


def _fresh(model, loss_fn, X, y, config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return _step(bg.cockpit.Cockpit(model, loss_fn, config=config), model, loss_fn, X, y, 0)


def _same(record, fresh, keys):
    for key in keys:
        assert (key in record) == (key in fresh), key
        if key in fresh:
            torch.testing.assert_close(torch.tensor(record[key]), torch.tensor(fresh[key]))


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randint(2, (6,), generator=g)


def test_coupling_hook_and_mode_changes_between_steps():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    loss_fn, (X, y) = nn.CrossEntropyLoss(), _data()
    config = ["Loss", "GradNorm", "NormTest", "InnerTest"]
    cockpit = bg.cockpit.Cockpit(model, loss_fn, config=config)
    keys = ["Loss", "GradNorm", "NormTest", "InnerTest"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        _same(_step(cockpit, model, loss_fn, X, y, 0), _fresh(model, loss_fn, X, y, config), keys)
        handle = model[1].register_forward_hook(lambda m, a, out: out - out.mean(0))
        coupled = _step(cockpit, model, loss_fn, X, y, 1)
        assert "NormTest" not in coupled and "NormTest" in coupled["dropped"]
        _same(coupled, _fresh(model, loss_fn, X, y, config), keys)
        handle.remove()
        _same(_step(cockpit, model, loss_fn, X, y, 2), _fresh(model, loss_fn, X, y, config), keys)


def test_loss_changes_between_steps():
    """The per-sample loss terms (Alpha's start point) follow the loss module's attributes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    loss_fn, (X, y) = nn.CrossEntropyLoss(), _data()
    cockpit = bg.cockpit.Cockpit(model, loss_fn, config=["Loss"])
    out = model(X).detach()
    for smoothing in (0.0, 0.3):
        loss_fn.label_smoothing = smoothing
        terms = cockpit._unreduced()(out, y)
        expected = nn.CrossEntropyLoss(reduction="none", label_smoothing=smoothing)(out, y)
        torch.testing.assert_close(terms, expected)
        assert loss_fn.reduction == "mean"


def test_pooled_convolution_rows_are_reused_and_each_step_equals_a_fresh_cockpit():
    """The unfolded inputs and materialized rows of a convolution live in the Cockpit's buffer
    pool: from the second tracked step on the same memory, no growth, and every step's
    per-sample instruments equal a fresh Cockpit's (which allocates its own)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 5, 3), nn.Tanh(), nn.Conv2d(5, 4, 3, stride=2), nn.Flatten(), nn.Linear(36, 3)
    ).double()
    loss_fn = nn.CrossEntropyLoss()
    config = ["Loss", "GradNorm", "NormTest", "InnerTest", "OrthoTest", "MeanGSNR", "GradHist1d"]
    keys = config[:-1]
    cockpit = bg.cockpit.Cockpit(model, loss_fn, config=config)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    g = torch.Generator().manual_seed(1)
    held = []
    for step in range(3):
        X = torch.randn(6, 2, 9, 9, generator=g, dtype=torch.float64)
        y = torch.randint(3, (6,), generator=g)
        record = _step(cockpit, model, loss_fn, X, y, step)
        _same(record, _fresh(model, loss_fn, X, y, config), keys)
        held.append(cockpit._pool.nbytes)
        opt.step()
    # two unfolded inputs and two materialized convolution rows, once each
    assert held[0] > 0 and held[0] == held[1] == held[2]


def _conv_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 5, 3), nn.Tanh(), nn.Conv2d(5, 4, 3, stride=2), nn.Flatten(), nn.Linear(36, 3)
    ).double()


def test_pool_is_bounded_when_only_curvature_is_tracked():
    """A configuration without per-sample rows still starts a new round of the pool at every
    tracked step: the curvature pass's buffers are reused, not accumulated."""
    model, loss_fn = _conv_model(), nn.CrossEntropyLoss()
    cockpit = bg.cockpit.Cockpit(model, loss_fn, config=["Loss", "HessTrace"])
    g = torch.Generator().manual_seed(1)
    held = []
    for step in range(4):
        X = torch.randn(6, 2, 9, 9, generator=g, dtype=torch.float64)
        _step(cockpit, model, loss_fn, X, torch.randint(3, (6,), generator=g), step)
        held.append(cockpit._pool.nbytes)
    assert held[0] > 0 and len(set(held)) == 1


def _numbers(value):
    if isinstance(value, dict):
        return [x for k in sorted(value) for x in _numbers(value[k])]
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in _numbers(v)]
    return [float(value)] if isinstance(value, (int, float)) else []


def test_pooled_buffers_give_the_records_of_fresh_allocations(monkeypatch):
    """The full preset with Alpha and an optimizer, tracked every other step, on a CNN: the
    records with the pool equal those of a run where every pooled request allocates afresh
    (no buffer is overwritten while something still reads it)."""
    from beyondgrad.buffers import BufferPool

    def run():
        model, loss_fn = _conv_model(), nn.CrossEntropyLoss()
        opt = torch.optim.SGD(model.parameters(), lr=0.2)
        cockpit = bg.cockpit.Cockpit(
            model, loss_fn, config="full", schedule=bg.cockpit.every(2), hess_iters=6
        )
        g = torch.Generator().manual_seed(2)
        for step in range(6):
            X = torch.randn(6, 2, 9, 9, generator=g, dtype=torch.float64)
            y = torch.randint(3, (6,), generator=g)
            opt.zero_grad()
            with cockpit(step, optimizer=opt):
                loss_fn(model(X), y).backward()
            opt.step()
        return cockpit.output()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        pooled = run()
        monkeypatch.setattr(
            BufferPool,
            "empty",
            lambda self, shape, dtype, device: torch.empty(
                tuple(shape), dtype=dtype, device=device
            ),
        )
        fresh = run()
    assert sorted(pooled) == sorted(fresh) == [0, 1, 2, 3, 4, 5]
    assert any("Alpha" in rec for rec in pooled.values())
    for step in pooled:
        assert sorted(pooled[step]) == sorted(fresh[step])
        torch.testing.assert_close(
            torch.tensor(_numbers(pooled[step]), dtype=torch.float64),
            torch.tensor(_numbers(fresh[step]), dtype=torch.float64),
            rtol=1e-12,
            atol=0,
            equal_nan=True,
        )
