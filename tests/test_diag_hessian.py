"""DiagHessian: the exact Hessian diagonal against torch.func.hessian on residual MLPs and CNNs
with element-wise nonlinearities; clear errors where the decomposition does not hold."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import beyondgrad as bg
from models import CASES
from oracles.first_order import call

ACTIVATIONS = {
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "relu": torch.relu,
    "elu": F.elu,
    "softplus": F.softplus,
    "gelu": F.gelu,
    "silu": F.silu,
}


def hessian_diagonal(model, loss_fn, X, y) -> dict[str, torch.Tensor]:
    named = [(n, p) for n, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for _, p in named])

    def f(theta):
        params, start = {}, 0
        for n, p in named:
            params[n] = theta[start : start + p.numel()].view(p.shape)
            start += p.numel()
        return loss_fn(call(model, params, X), y)

    diag = torch.diagonal(torch.func.hessian(f)(flat))
    out, start = {}, 0
    for n, p in named:
        out[n] = diag[start : start + p.numel()].view(p.shape)
        start += p.numel()
    return out


class ResidualMLP(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.act = act
        self.inp = nn.Linear(3, 4)
        self.hidden = nn.Linear(4, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        h = self.act(self.inp(x))
        h = h + self.act(self.hidden(h))  # residual connection
        return self.out(h)


class ResidualCNN(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.act = act
        self.conv1 = nn.Conv2d(2, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1, groups=3)
        self.pool = nn.AvgPool2d(2)
        self.out = nn.Linear(3 * 2 * 2, 2)

    def forward(self, x):
        h = self.act(self.conv1(x))
        h = h + self.conv2(h)
        return self.out(self.pool(self.act(h)).flatten(1))


@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_residual_mlp(act, loss):
    torch.manual_seed(0)
    model = ResidualMLP(ACTIVATIONS[act]).double()
    X = torch.randn(4, 3, dtype=torch.float64)
    if loss == "ce":
        loss_fn, y = nn.CrossEntropyLoss(), torch.randint(0, 3, (4,))
    else:
        loss_fn, y = nn.MSELoss(reduction="sum"), torch.randn(4, 3, dtype=torch.float64)
    res = bg.compute(model, loss_fn, X, y, bg.DiagHessian(), bg.DiagGGN())
    expected = hessian_diagonal(model, loss_fn, X, y)
    for name, value in expected.items():
        torch.testing.assert_close(res[bg.DiagHessian][name], value, rtol=1e-8, atol=1e-12)
    if act != "relu":  # the residual terms matter
        gap = sum((res[bg.DiagGGN][n] - v).abs().sum() for n, v in expected.items())
        assert gap > 1e-6


@pytest.mark.parametrize("act", ["tanh", "sigmoid", "relu"])
def test_residual_cnn(act):
    torch.manual_seed(0)
    model = ResidualCNN(ACTIVATIONS[act]).double()
    X = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 2, (2,))
    res = bg.compute(model, nn.CrossEntropyLoss(), X, y, bg.DiagHessian())
    for name, value in hessian_diagonal(model, nn.CrossEntropyLoss(), X, y).items():
        torch.testing.assert_close(res[bg.DiagHessian][name], value, rtol=1e-8, atol=1e-12)


def test_module_activations_and_batchnorm_eval():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(3, 4),
        nn.BatchNorm1d(4),
        nn.ELU(),
        nn.Linear(4, 4),
        nn.Softplus(),
        nn.Linear(4, 2),
    ).double()
    model[1].running_mean.uniform_(-0.5, 0.5)
    model.eval()
    X, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,))
    res = bg.compute(model, nn.CrossEntropyLoss(), X, y, bg.DiagHessian())
    for name, value in hessian_diagonal(model, nn.CrossEntropyLoss(), X, y).items():
        torch.testing.assert_close(res[bg.DiagHessian][name], value, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize(
    "case,match",
    [("gpt", "NativeLayerNormBackward0.*ln"), ("mlp_resnet", "same parameters")],
)
def test_non_elementwise_models_raise(case, match):
    model, X, y, loss_fn = CASES[case]()
    with pytest.raises(RuntimeError, match=match):
        bg.compute(model, loss_fn, X, y, bg.DiagHessian())


def test_residual_vector_limit():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 50), nn.Tanh(), nn.Linear(50, 2)).double()
    X, y = torch.randn(2, 3, dtype=torch.float64), torch.randint(0, 2, (2,))
    with pytest.raises(RuntimeError, match="max_vectors"):
        bg.compute(model, nn.CrossEntropyLoss(), X, y, bg.DiagHessian(max_vectors=20))


def test_hesscale_is_exact_in_the_last_layer_and_a_heuristic_elsewhere():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4), nn.Sigmoid(), nn.Linear(4, 3)
    ).double()
    X, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 3, (6,))
    loss_fn = nn.CrossEntropyLoss()
    q = bg.DiagHessian(method="hesscale")
    res = bg.compute(model, loss_fn, X, y, q, bg.DiagHessian())
    exact = hessian_diagonal(model, loss_fn, X, y)
    torch.testing.assert_close(res[q]["4.weight"], exact["4.weight"])
    torch.testing.assert_close(res[q]["4.bias"], exact["4.bias"])
    torch.testing.assert_close(res[bg.DiagHessian()]["0.weight"], exact["0.weight"])
    # earlier layers: an approximation of the right magnitude, not exact
    approx, true = res[q]["0.weight"], exact["0.weight"]
    assert not torch.allclose(approx, true)
    assert 0.1 < float(approx.abs().sum() / true.abs().sum()) < 10
    with pytest.raises(NotImplementedError, match="Sequential"):
        model2, X2, y2, loss2 = CASES["mlp_resnet"]()
        bg.compute(model2, loss2, X2, y2, q)
    with pytest.raises(ValueError, match="method"):
        bg.DiagHessian(method="bl89")
