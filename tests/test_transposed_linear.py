"""Hugging Face's ``Conv1D`` (a Linear layer with its weight stored ``[in, out]``): a fast rule
recognized by class path (transformers is not needed: a stand-in class with the same path),
Kronecker statistics, the KFAC optimizer; the centred ``Variance``; the MC refusal."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import beyondgrad as bg
from beyondgrad.optim import KFAC
from oracles.curvature import diag_ggn, ggn
from oracles.first_order import reference
from test_first_order import assert_close


class Conv1D(nn.Module):
    """Same class path and forward as ``transformers.pytorch_utils.Conv1D``."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.5)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x: Tensor) -> Tensor:
        size_out = (*x.size()[:-1], self.nf)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


Conv1D.__module__ = "transformers.pytorch_utils"


class OwnForward(Conv1D):
    """A subclass overriding ``forward`` is not trusted by the fast rule."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) * 2


def _model(layer: type = Conv1D) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(layer(5, 3), nn.Tanh(), layer(4, 5)).double()


def _data(N: int = 4, T: int = 3):
    g = torch.Generator().manual_seed(1)
    return torch.randn(N, T, 3, generator=g, dtype=torch.float64), torch.randint(
        0, 4, (N, T), generator=g
    )


class Logits(nn.Module):
    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x).transpose(1, 2)  # [N, C, T]


@pytest.mark.parametrize("layer", [Conv1D, OwnForward])
def test_quantities_match_oracle(layer):
    model = Logits(_model(layer))
    X, y = _data()
    loss_fn = nn.CrossEntropyLoss()
    first = reference(model, loss_fn, X, y)
    ref = ggn(model, loss_fn, X, y)
    qs = [bg.BatchGrad(), bg.BatchL2(), bg.Variance(), bg.BatchDot()]
    res = bg.compute(model, loss_fn, X, y, *qs, bg.DiagGGN())
    for q in qs:
        assert_close(res[q], first[type(q).__name__], type(q).__name__)
    assert_close(res[bg.DiagGGN], diag_ggn(ref), "DiagGGN")
    expected = "transposed_linear" if layer is Conv1D else "generic"
    assert res.rules["body.0.weight"] == expected


def _linear_twin(model: Logits) -> Logits:
    twin = Logits(nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4))).double()
    with torch.no_grad():
        for i in (0, 2):
            twin.body[i].weight.copy_(model.body[i].weight.T)
            twin.body[i].bias.copy_(model.body[i].bias)
    return twin


def test_kronecker_factors_equal_linear_twin():
    model = Logits(_model())
    twin = _linear_twin(model)
    X, y = _data()
    loss_fn = nn.CrossEntropyLoss()
    q = bg.KFAC(fisher_type="type-2")
    blocks = bg.compute(model, loss_fn, X, y, q)[q]
    twin_blocks = bg.compute(twin, loss_fn, X, y, q)[q]
    for name in ("body.0", "body.2"):
        a, b = blocks[name], twin_blocks[name]
        assert isinstance(a, bg.KroneckerFactors) and a.weight_perm == (1, 0)
        torch.testing.assert_close(a.A, b.A)
        torch.testing.assert_close(a.B, b.B)


def test_kfac_optimizer_preconditions_and_matches_linear_twin():
    model = Logits(_model())
    twin = _linear_twin(model)
    X, y = _data()
    loss_fn = nn.CrossEntropyLoss()
    opts = [
        KFAC(m, loss_fn, lr=0.3, damping=0.05, fisher_type="type-2", kl_clip=None)
        for m in (model, twin)
    ]
    assert "body.0.weight" in opts[0].routing() and opts[0].routes["body.0.weight"][0] == "kfac"
    for m, opt in zip((model, twin), opts):
        opt.zero_grad()
        with opt.capture():
            loss = loss_fn(m(X), y)
        loss.backward()
        opt.step()
    for i in (0, 2):
        torch.testing.assert_close(model.body[i].weight.T, twin.body[i].weight)
        torch.testing.assert_close(model.body[i].bias, twin.body[i].bias)


def test_variance_is_centred():
    """Per-sample gradients with a large common mean and a tiny spread: float32 keeps the
    variance to about the spread's own precision (the E[g^2] - E[g]^2 form returns noise)."""
    g = torch.Generator().manual_seed(0)
    N, D = 8, 6
    X64 = 1000.0 + 1e-2 * torch.randn(N, D, generator=g, dtype=torch.float64)
    y64 = torch.full((N, 1), -1.0, dtype=torch.float64)
    model = nn.Linear(D, 1, dtype=torch.float32)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()
    X32 = X64.float()
    loss_fn = nn.MSELoss(reduction="sum")
    res = bg.compute(model, loss_fn, X32, y64.float(), bg.Variance())[bg.Variance()]
    # float64 oracle on the same (float32-representable) inputs: rows 2 x_n
    rows = 2 * X32.double()
    expected = (rows - rows.mean(0)).pow(2).mean(0)
    torch.testing.assert_close(res["weight"].double(), expected[None], rtol=2e-2, atol=0)


def _variance_paths(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Record, per reduced parameter, whether ``Variance`` kept the uncentred form."""
    from beyondgrad.quantities import first_order

    taken: list[bool] = []
    original = first_order._uncentred_variance

    def spy(form, c, S):  # type: ignore[no-untyped-def]
        out = original(form, c, S)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(first_order, "_uncentred_variance", spy)
    return taken


def test_variance_uncentred_where_safe_centred_where_not(monkeypatch: pytest.MonkeyPatch):
    """Noisy per-sample gradients (the usual case) take the squared-sums path (no rows) and
    match a float64 per-sample loop to float32 round-off; a tiny spread around a large mean
    sends the parameter to the centred form (checked against the oracle above)."""
    taken = _variance_paths(monkeypatch)
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(16, 5, generator=g), torch.randn(16, 2, generator=g)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2))
    res = bg.compute(model, nn.MSELoss(), X, y, bg.Variance())[bg.Variance()]
    assert taken == [True] * 4
    twin = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    twin.load_state_dict(model.state_dict())
    rows = []
    for n in range(16):  # gradients of the per-sample losses (c g_n for reduction="mean")
        loss = nn.MSELoss()(twin(X[n : n + 1].double()), y[n : n + 1].double())
        rows.append(torch.autograd.grad(loss, list(twin.parameters())))
    for i, name in enumerate(dict(model.named_parameters())):
        per_sample = torch.stack([r[i] for r in rows])
        expected = (per_sample - per_sample.mean(0)).pow(2).mean(0)
        torch.testing.assert_close(res[name].double(), expected, rtol=1e-4, atol=1e-9)
    taken.clear()
    test_variance_is_centred()
    assert taken == [False, False]  # weight: tiny spread; bias: identical rows (variance 0)


def test_mc_vectors_that_cannot_fit_in_memory_are_refused(monkeypatch):
    """All sampled vectors are held at every layer output at once: an estimate above the
    memory available is refused before the backward pass (instead of the process being
    killed)."""
    from beyondgrad.engine import memory

    model = Logits(_model())
    X, y = _data()
    loss_fn = nn.CrossEntropyLoss()
    monkeypatch.setattr(memory, "available_memory", lambda device: 10_000)
    with pytest.raises(MemoryError, match="mc_samples"):
        bg.compute(model, loss_fn, X, y, bg.DiagGGN(mc_samples=50))
    bg.compute(model, loss_fn, X, y, bg.DiagGGN(mc_samples=1))  # 1 vector: about 2 KB


def _to_linear_layout(model: nn.Module, flat: Tensor) -> Tensor:
    """A flat vector over ``model``'s parameters with every weight transposed (the Linear
    twin's layout)."""
    parts, i = [], 0
    for name, p in model.named_parameters():
        v = flat[i : i + p.numel()].view_as(p)
        parts.append((v.T if name.endswith("weight") else v).reshape(-1))
        i += p.numel()
    return torch.cat(parts)


def test_linops_kfac_equals_linear_twin():
    model = Logits(_model())
    twin = _linear_twin(model)
    X, y = _data()
    loss_fn = nn.CrossEntropyLoss()
    ops = [bg.linops.KFAC(m, loss_fn, [(X, y)], fisher_type="type-2") for m in (model, twin)]
    v = torch.randn(
        ops[0].shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(3)
    )
    expected = ops[1] @ _to_linear_layout(model, v)
    torch.testing.assert_close(_to_linear_layout(model, ops[0] @ v), expected)
