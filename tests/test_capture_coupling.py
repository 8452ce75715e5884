"""Samples coupled by any op are refused in ``bg.capture`` sessions too (not only in
``bg.compute``), and the Cockpit drops its per-sample instruments instead of logging them."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import beyondgrad as bg


class Centred(nn.Module):
    """A layer computing ``(x - x.mean(0)) * gain``: it couples the samples."""

    def __init__(self, d: int):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return (x - x.mean(0)) * self.gain


def _problem(coupled: bool):
    torch.manual_seed(0)
    layers = [nn.Linear(3, 4), nn.Tanh()]
    layers += [Centred(4)] if coupled else []
    model = nn.Sequential(*layers, nn.Linear(4, 2)).double()
    X = torch.randn(5, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (5,))
    return model, nn.CrossEntropyLoss(), X, y


@pytest.mark.parametrize("from_backward", [False, True])
def test_capture_refuses_samples_coupled_by_an_op(from_backward):
    model, loss_fn, X, y = _problem(coupled=True)
    with bg.capture(model, loss_fn, bg.BatchL2(), from_backward=from_backward) as session:
        loss = loss_fn(model(X), y)
        if from_backward:
            loss.backward()
    with pytest.raises(bg.SamplesCoupledError, match="couples its samples"):
        session.compute(loss)


def test_capture_probe_can_be_skipped_and_leaves_exact_results():
    model, loss_fn, X, y = _problem(coupled=False)
    with bg.capture(model, loss_fn, bg.BatchL2()) as session:
        loss = loss_fn(model(X), y)
    res = session.compute(loss)
    ref = bg.compute(model, loss_fn, X, y, bg.BatchL2())
    for name, value in ref[bg.BatchL2].items():
        torch.testing.assert_close(res[bg.BatchL2][name], value, rtol=1e-12, atol=0)
    model, loss_fn, X, y = _problem(coupled=True)
    with bg.capture(model, loss_fn, bg.BatchL2(), check_samples=False) as session:
        loss = loss_fn(model(X), y)
    session.compute(loss)  # the user's explicit choice: no probe


def test_cockpit_drops_per_sample_instruments_on_op_coupling(tmp_path):
    model, loss_fn, X, y = _problem(coupled=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cockpit = bg.cockpit.Cockpit(model, loss_fn, config="economy", log_dir=str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with cockpit(0, optimizer=opt):
            loss = loss_fn(model(X), y)
            loss.backward()
    record = cockpit.log[-1] if hasattr(cockpit, "log") else None
    dropped = getattr(cockpit, "dropped", {})
    assert dropped, "per-sample instruments must be dropped on a coupled model"
    assert any("couples its samples" in str(reason) for reason in dropped.values())
    if record is not None:
        assert "NormTest" not in record
