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
