"""``J V`` by forward-mode AD in the GGN and Jacobian operators: equal to dense float64
Jacobians and GGNs, the reverse route kept for single vectors on a kept vjp graph, and the
fallbacks (a second forward pass that would differ; an operation without a forward-mode
derivative)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import beyondgrad.linops.curvature as curvature
from beyondgrad.linops import GGN, Jacobian
from models import CASES
from oracles.curvature import ggn
from oracles.first_order import call


def dense_jacobian(model, X):
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def f(*values):
        return call(model, dict(zip([n for n, _ in named], values)), X)

    jac = torch.autograd.functional.jacobian(f, tuple(p.detach() for _, p in named))
    rows = f(*[p.detach() for _, p in named]).numel()
    return torch.cat([j.reshape(rows, -1) for j in jac], 1)


@pytest.fixture
def routes(monkeypatch):
    """Counts of forward-mode, reverse and fused (one dual forward pass) ``J V`` calls."""
    counts = {"forward": 0, "reverse": 0, "dual": 0}
    forward, reverse = curvature._forward_jv, curvature._JacobianProducts._reverse_jv
    dual = curvature._dual_forward

    def spy_dual(*args, **kwargs):
        counts["dual"] += 1
        return dual(*args, **kwargs)

    def spy_forward(*args, **kwargs):
        counts["forward"] += 1
        return forward(*args, **kwargs)

    def spy_reverse(self, *args, **kwargs):
        counts["reverse"] += 1
        return reverse(self, *args, **kwargs)

    monkeypatch.setattr(curvature, "_forward_jv", spy_forward)
    monkeypatch.setattr(curvature, "_dual_forward", spy_dual)
    monkeypatch.setattr(curvature._JacobianProducts, "_reverse_jv", spy_reverse)
    return counts


@pytest.mark.parametrize("case", ["mlp", "gpt", "resnet", "two_inputs"])
def test_forward_mode_products_match_dense(case, routes):
    model, X, y, loss_fn = CASES[case]()
    data = [(X, y)]
    G, J = GGN(model, loss_fn, data), Jacobian(model, data)
    dense_ggn, dense_j = ggn(model, loss_fn, X, y)["full"], dense_jacobian(model, X)
    for k in (1, 3):
        M = torch.randn(G.shape[0], k, dtype=torch.float64)
        torch.testing.assert_close(G @ M, dense_ggn @ M)
        torch.testing.assert_close(J @ M, dense_j @ M)
    # one vector: the GGN runs one dual forward pass (graph and J v together)
    if case == "gpt":  # nn.MultiheadAttention's fast path (taken under jvp) has no forward AD
        assert routes == {"forward": 2, "reverse": 3, "dual": 1}  # one attempt each, remembered
    else:
        assert routes == {"forward": 3, "reverse": 0, "dual": 1}


def test_kept_batches_go_reverse(routes):
    """Inside repeated_products a kept batch runs no forward pass again (the kept vjp graph is
    differentiated); batches beyond ``cache_batches`` use forward mode."""
    model, X, y, loss_fn = CASES["mlp"]()
    data = [(X[:3], y[:3]), (X[3:], y[3:])]
    G = GGN(model, loss_fn, data, cache_batches=1)
    dense = ggn(model, loss_fn, X, y)["full"]
    v, M = torch.randn(G.shape[0], dtype=torch.float64), torch.randn(G.shape[0], 2).double()
    with G.repeated_products():
        torch.testing.assert_close(G @ v, dense @ v)
        torch.testing.assert_close(G @ M, dense @ M)
    assert routes == {"forward": 1, "reverse": 2, "dual": 1}


def test_training_batch_norm_keeps_one_forward_pass(routes):
    """A forward pass updates batch-norm buffers in training mode: products there take the
    reverse route, equal to it when forced, and move the buffers once per product."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2))
    model = model.double().train()
    X, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,))
    loss_fn = nn.CrossEntropyLoss()
    G = GGN(model, loss_fn, [(X, y)], allow_train_mode=True)
    M = torch.randn(G.shape[0], 2, dtype=torch.float64)
    before = model[1].num_batches_tracked.item()
    first = G @ M
    assert model[1].num_batches_tracked.item() == before + 1
    assert routes == {"forward": 0, "reverse": 1, "dual": 0}
    single = G @ M[:, :1]  # no dual pass either: a failed one would have moved the buffers
    assert model[1].num_batches_tracked.item() == before + 2
    assert routes == {"forward": 0, "reverse": 2, "dual": 0}
    dense = torch.autograd.functional.jacobian(
        lambda *p: torch.func.functional_call(
            model, dict(zip([n for n, _ in model.named_parameters()], p)), (X,)
        ),
        tuple(p.detach() for p in model.parameters()),
    )
    J = torch.cat([j.reshape(12, -1) for j in dense], 1)
    out = model(X).detach()
    H = torch.autograd.functional.hessian(lambda o: loss_fn(o.view(6, 2), y), out.reshape(-1))
    torch.testing.assert_close(first, J.T @ H @ J @ M)
    torch.testing.assert_close(single, J.T @ H @ J @ M[:, :1])


class NoForwardSquare(torch.autograd.Function):
    """``x ** 2`` with a backward only (no forward-mode formula, no functorch support)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad


class SquareNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.fc2(NoForwardSquare.apply(self.fc1(x)))


def test_missing_forward_derivative_falls_back_to_reverse(routes):
    torch.manual_seed(0)
    model = SquareNet().double()
    X, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    loss_fn = nn.MSELoss()
    G = GGN(model, loss_fn, [(X, y)])
    M = torch.randn(G.shape[0], 3, dtype=torch.float64)
    params = tuple(p.detach() for p in model.parameters())
    names = [n for n, _ in model.named_parameters()]
    jac = torch.autograd.functional.jacobian(
        lambda *p: torch.func.functional_call(model, dict(zip(names, p)), (X,)), params
    )
    J = torch.cat([j.reshape(10, -1) for j in jac], 1)
    H = torch.eye(10, dtype=torch.float64) * 2 / 10  # MSE (mean over 10 entries)
    torch.testing.assert_close(G @ M, J.T @ H @ J @ M)
    torch.testing.assert_close(G @ M, J.T @ H @ J @ M)  # remembered: no second attempt
    assert routes == {"forward": 1, "reverse": 2, "dual": 0}
    G = GGN(model, loss_fn, [(X, y)])  # one vector: the dual pass fails, then reverse
    v = M[:, 0]
    torch.testing.assert_close(G @ v, J.T @ H @ J @ v)
    torch.testing.assert_close(G @ v, J.T @ H @ J @ v)  # remembered
    assert routes == {"forward": 1, "reverse": 4, "dual": 1}
