"""What the engine remembers between calls (the rule of each module class, the sample-axis and
coupling probes per input signature) never outlives a change of the model: the model is changed
between two calls and the second result is compared with the float64 oracle."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import beyondgrad as bg
from oracles.first_order import reference


def assert_close(actual: dict, expected: dict, what: str) -> None:
    assert set(actual) == set(expected), f"{what}: keys {set(actual) ^ set(expected)}"
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, rtol=1e-9, atol=1e-12, msg=name)


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def _batch(n: int = 5):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randint(2, (n,), generator=g)


def _check(model, X, y, loss_fn=None):
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    res = bg.compute(model, loss_fn, X, y, bg.BatchGrad(), bg.BatchL2())
    ref = reference(model, loss_fn, X, y)
    assert_close(res[bg.BatchGrad], ref["BatchGrad"], "BatchGrad")
    assert_close(res[bg.BatchL2], ref["BatchL2"], "BatchL2")
    return res


def test_requires_grad_toggled_between_calls():
    model, (X, y) = _mlp(), _batch()
    assert set(_check(model, X, y)[bg.BatchGrad]) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    model[0].weight.requires_grad_(False)
    assert set(_check(model, X, y)[bg.BatchGrad]) == {"0.bias", "2.weight", "2.bias"}
    model[0].weight.requires_grad_(True)
    model[2].bias.requires_grad_(False)
    assert set(_check(model, X, y)[bg.BatchGrad]) == {"0.weight", "0.bias", "2.weight"}


def test_module_and_parameter_replaced_between_calls():
    model, (X, y) = _mlp(), _batch()
    _check(model, X, y)
    model[2] = nn.Linear(4, 3).double()  # another shape, another parameter object
    res = _check(model, X, y % 3)
    assert res[bg.BatchGrad]["2.weight"].shape == (5, 3, 4)
    model[0].bias = nn.Parameter(torch.randn(4, dtype=torch.float64))
    _check(model, X, y % 3)
    model[0].register_parameter("bias", None)
    assert "0.bias" not in _check(model, X, y % 3)[bg.BatchGrad]


class _Affine(nn.Linear):
    """A Linear subclass with the stock forward at first (served by the Linear rule)."""


def test_class_forward_changed_between_calls(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(_Affine(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    X, y = _batch()
    assert _check(model, X, y).stats.rules["0.weight"] == "linear"

    def doubled(self, x):  # no longer the stock forward: the generic rule must serve it
        return nn.functional.linear(2 * x, self.weight, self.bias)

    monkeypatch.setattr(_Affine, "forward", doubled)
    assert _check(model, X, y).stats.rules["0.weight"] == "generic"
    monkeypatch.undo()
    assert _check(model, X, y).stats.rules["0.weight"] == "linear"


def test_train_eval_toggled_between_calls():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double()
    X, y = _batch()
    model.train()
    with pytest.raises(bg.SamplesCoupledError):
        bg.compute(model, nn.CrossEntropyLoss(), X, y, bg.BatchGrad())
    model.eval()
    _check(model, X, y)
    model.train()
    with pytest.raises(bg.SamplesCoupledError):
        bg.compute(model, nn.CrossEntropyLoss(), X, y, bg.BatchGrad())


def test_input_signature_changed_between_calls():
    model, (X, y) = _mlp(), _batch(5)
    _check(model, X, y)
    X2, y2 = _batch(3)
    _check(model, X2, y2)
    _check(model, X, y)


def test_user_hook_added_between_calls():
    model, (X, y) = _mlp(), _batch()
    _check(model, X, y)
    handle = model[1].register_forward_hook(lambda m, a, out: out * 3)
    _check(model, X, y)
    handle.remove()
    _check(model, X, y)


def test_coupling_hook_added_between_calls():
    """A user hook that couples the samples, added after a first call: probed again."""
    model, (X, y) = _mlp(), _batch()
    _check(model, X, y)
    handle = model[1].register_forward_hook(lambda m, a, out: out - out.mean(0))
    with pytest.raises(bg.SamplesCoupledError):
        bg.compute(model, nn.CrossEntropyLoss(), X, y, bg.BatchGrad())
    handle.remove()
    _check(model, X, y)


def test_unchanged_model_is_not_probed_again():
    """The probes run once per model state and input signature: later calls forward once."""
    model, (X, y) = _mlp(), _batch()
    calls = []
    model.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    for _ in range(3):
        calls.clear()
        bg.compute(model, nn.CrossEntropyLoss(), X, y, bg.BatchGrad(), bg.DiagGGN())
    assert calls == [5]
    loss_fn = nn.CrossEntropyLoss()
    with bg.capture(model, loss_fn, bg.BatchL2()) as session:
        calls.clear()
        loss = loss_fn(model(X), y)
    session.compute(loss)
    assert calls == [5]
