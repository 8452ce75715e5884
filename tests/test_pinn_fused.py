"""The closed-form forward Laplacian and backward (``beyondgrad.pinn.fused``) in float64 against
autograd: third derivatives of every activation, and residuals, layer inputs and output
gradients against the autograd forward Laplacian (``taylor_forward`` with records) for every
activation, partial Laplacians (a slice and a gather), deep, shallow and bias-free networks."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import beyondgrad as bg
from beyondgrad.pinn.fused import derivatives3, residual_pass

pinn = bg.pinn


pytestmark = pytest.mark.usefixtures("float64_seeded")


class Cube(nn.Module):
    """A custom activation registered at test time (third derivative by the autograd
    fallback)."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z**3


ACTS = [nn.Tanh(), nn.Sigmoid(), nn.Softplus(beta=1.7), nn.SiLU(), nn.Identity()]


@pytest.mark.parametrize("act", [*ACTS, Cube()], ids=lambda a: type(a).__name__)
def test_third_derivatives_equal_autograd(act: nn.Module, monkeypatch) -> None:
    monkeypatch.setitem(pinn.ACTIVATIONS, Cube, lambda _, z: (z**3, 3 * z**2, 6 * z))
    z = torch.linspace(-3, 3, 13, requires_grad=True)
    h, d1, d2, d3 = derivatives3(act, z.detach())
    ref = [act(z)]
    for _ in range(3):
        if not ref[-1].requires_grad:  # a constant derivative (identity)
            ref.append(torch.zeros_like(z))
            continue
        ref.append(torch.autograd.grad(ref[-1].sum(), z, create_graph=True)[0])
    for ours, r in zip((h, d1, d2, d3), ref):
        torch.testing.assert_close(ours, r.detach())


def reference(model: nn.Module, X: torch.Tensor, pde: pinn.PDE | None):
    """Residuals, inputs and output gradients by autograd through ``taylor_forward``."""
    if pde is None:
        res = pinn.taylor_forward(model, X, order=0, record=True)
        r = res.u[:, 0]
    else:
        res = pinn.taylor_forward(model, X, pde.laplace_dims, record=True)
        r = pde.residual(X, res)[:, 0]
    g = torch.autograd.grad(r.sum(), [rec.outputs for rec in res.layers])
    return r.detach(), [rec.augmented_inputs() for rec in res.layers], list(g)


def screened(dims: tuple[int, ...] | None) -> pinn.PDE:
    """``-Laplace u + u_0 + 2 u = 1`` with the Laplacian over ``dims`` (all residual terms)."""
    base = pinn.poisson(3)

    def residual(X: torch.Tensor, r: pinn.TaylorResult) -> torch.Tensor:
        return -r.lap_u + r.grad_u[:, :1] + 2 * r.u - 1  # type: ignore[index, operator]

    return pinn.PDE(
        "screened", 3, residual, base.exact, base.sample_interior, base.sample_boundary, dims
    )


NETS = {
    "deep": lambda act: nn.Sequential(nn.Linear(3, 5), act, nn.Linear(5, 4), act, nn.Linear(4, 1)),
    "shallow": lambda act: nn.Sequential(nn.Linear(3, 6), act, nn.Linear(6, 1)),
    "no-bias": lambda act: nn.Sequential(
        nn.Linear(3, 5, bias=False), act, nn.Linear(5, 1, bias=False)
    ),
    "linear-linear": lambda act: nn.Sequential(
        nn.Linear(3, 4), nn.Linear(4, 5), act, nn.Linear(5, 1)
    ),
    "two-acts": lambda act: nn.Sequential(nn.Linear(3, 4), act, nn.Identity(), nn.Linear(4, 1)),
    "one-linear": lambda act: nn.Linear(3, 1),
}


@pytest.mark.parametrize("dims", [None, (1, 2), (2, 0)], ids=["all", "slice", "gather"])
@pytest.mark.parametrize("net", sorted(NETS))
@pytest.mark.parametrize("act", ACTS, ids=lambda a: type(a).__name__)
def test_residual_pass_equals_autograd(act: nn.Module, net: str, dims) -> None:
    model, pde = NETS[net](act), screened(dims)
    X = torch.randn(5, 3)
    for p in (pde, None):
        ours = residual_pass(
            model, X, None if p is None else p.residual, None if p is None else p.laplace_dims
        )
        r, Z, g = reference(model, X, p)
        torch.testing.assert_close(ours.r, r)
        assert len(ours.Z) == len(Z) == len(ours.g) == len(g)
        for a, b in zip(ours.Z, Z):
            torch.testing.assert_close(a, b)
        for a, b in zip(ours.g, g):
            torch.testing.assert_close(a, b)


def test_residual_pass_refuses_several_outputs() -> None:
    with pytest.raises(ValueError, match="one output"):
        residual_pass(nn.Sequential(nn.Linear(2, 3), nn.Tanh()), torch.randn(4, 2), None)


@pytest.mark.parametrize("bias", [True, False])
def test_first_layer_shortcuts_equal_the_generic_products(bias: bool) -> None:
    """``Evaluation.initial``: the first layer's transpose and Jacobian-vector products that
    skip the unit and zero Taylor rows equal the generic ones."""
    pde = pinn.heat(2)
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5, bias=bias), nn.Tanh(), nn.Linear(5, 1, bias=bias))
    loss = pinn.PINNLoss(model, pde, pde.sample_interior(7, gen), pde.sample_boundary(4, gen))
    ev = loss.evaluate()
    assert ev.initial
    generic = dataclasses.replace(ev, initial=False)
    vs = [[torch.randn_like(b) for b in loss.blocks()] for _ in range(3)]
    for a, b in zip(ev.gradient(), generic.gradient()):
        torch.testing.assert_close(a, b)
    for a, b in zip(ev.layer_jvps(vs), generic.layer_jvps(vs)):
        torch.testing.assert_close(a[0], b[0])
        torch.testing.assert_close(a[1], b[1])
    w, wb = torch.randn(7), torch.randn(4)
    for a, b in zip(ev.transpose_product(w, wb), generic.transpose_product(w, wb)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("bias", [True, False])
def test_backward_adds_the_autograd_gradient(bias: bool) -> None:
    """``PINNLoss.backward()`` returns the loss and adds to ``.grad`` exactly what
    ``value().backward()`` adds (from a non-zero ``.grad``, a frozen parameter untouched)."""
    pde = pinn.heat(2)
    gen = torch.Generator().manual_seed(1)
    model = nn.Sequential(
        nn.Linear(3, 6, bias=bias), nn.Tanh(), nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 1)
    )
    loss = pinn.PINNLoss(model, pde, pde.sample_interior(9, gen), pde.sample_boundary(5, gen))
    model[2].bias.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    value = loss.value()
    expected = torch.autograd.grad(value, params)
    start = [torch.randn_like(p) for p in params]
    for p, s in zip(params, start):
        p.grad = s.clone()
    params[-1].grad = None  # one parameter without a gradient yet
    out = loss.backward()
    torch.testing.assert_close(out, value.detach())
    assert out.requires_grad is False
    for i, (p, s, e) in enumerate(zip(params, start, expected)):
        torch.testing.assert_close(p.grad, e if i == len(params) - 1 else s + e)
    assert model[2].bias.grad is None
