"""Edge cases a careful user reaches (issue 13): user hooks, samples coupled outside BatchNorm
modules, activation checkpointing, non-finite values, model state, inputs that need a clear
error. Every result is compared in float64 with a brute-force oracle, or must raise."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import beyondgrad as bg
from oracles import curvature as curv_oracle
from oracles import first_order as fo_oracle

N = 5
DT = torch.float64


class Scale(nn.Module):
    """A layer served by the generic rule."""

    def __init__(self, d: int):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, d, dtype=DT))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.w


def data(out: int = 2) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(N, 3, generator=gen, dtype=DT), torch.randn(N, out, generator=gen, dtype=DT)


def mlp(middle: nn.Module | None = None) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(3, 4), middle if middle is not None else nn.Identity(), nn.Tanh(), nn.Linear(4, 2)
    ).to(DT)


def assert_exact(model: nn.Module, X: Tensor, y: Tensor, loss_fn: nn.Module) -> None:
    """BatchGrad, Grad and DiagGGN equal their oracles."""
    res = bg.compute(model, loss_fn, X, y, bg.BatchGrad(), bg.Grad(), bg.DiagGGN())
    per_sample = fo_oracle.per_sample_grads(model, loss_fn, X, y)
    grad = fo_oracle.autograd_grad(model, loss_fn, X, y)
    diag = curv_oracle.diag_ggn(curv_oracle.ggn(model, loss_fn, X, y))
    for name in per_sample:
        torch.testing.assert_close(res[bg.BatchGrad][name], per_sample[name])
        torch.testing.assert_close(res.grad[name], grad[name])
        torch.testing.assert_close(res[bg.DiagGGN][name], diag[name])


# -- 1. user hooks ------------------------------------------------------------------------------
def _double_output(module, args, output):
    return 2 * output


def _double_input(module, args):
    return (2 * args[0],)


def _add_input(module, args, output):
    return output + args[0]


HOOKS = {
    "forward hook on Linear": (0, "forward", _double_output, {}),
    "forward hook on Linear, prepend": (0, "forward", _double_output, {"prepend": True}),
    "pre-hook on Linear": (0, "pre", _double_input, {}),
    "forward hook on generic": (1, "forward", _double_output, {}),
    "forward hook on generic using input": (1, "forward", _add_input, {}),
    "pre-hook on generic": (1, "pre", _double_input, {}),
}


@pytest.mark.parametrize("case", list(HOOKS))
def test_user_hooks_changing_values_are_exact(case):
    index, kind, hook, kwargs = HOOKS[case]
    model = mlp(Scale(4))
    module = model[index]
    if kind == "forward":
        module.register_forward_hook(hook, **kwargs)
    else:
        module.register_forward_pre_hook(hook, **kwargs)
    X, y = data()
    assert_exact(model, X, y, nn.MSELoss())


def test_user_hook_registered_inside_capture_block():
    model, (X, y), loss_fn = mlp(), data(), nn.MSELoss()
    with bg.capture(model, loss_fn, bg.BatchGrad()) as session:
        handle = model[0].register_forward_hook(_double_output)
        loss = loss_fn(model(X), y)
    handle.remove()
    res = session.compute(loss)
    handle = model[0].register_forward_hook(_double_output)
    expected = fo_oracle.per_sample_grads(model, loss_fn, X, y)
    torch.testing.assert_close(res[bg.BatchGrad]["0.weight"], expected["0.weight"])


def test_global_hook_changing_outputs_is_refused():
    model, (X, y), loss_fn = mlp(), data(), nn.MSELoss()
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda m, a, o: 2 * o if isinstance(m, nn.Linear) else None
    )
    try:
        with pytest.raises(RuntimeError, match=r"module '0'.*forward hook"):
            bg.compute(model, loss_fn, X, y, bg.BatchGrad())
        # a global hook that changes nothing (a profiler, a logger) is fine
        handle.remove()
        handle = torch.nn.modules.module.register_module_forward_hook(lambda m, a, o: None)
        assert_exact(model, X, y, loss_fn)
    finally:
        handle.remove()
