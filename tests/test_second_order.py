"""GGN-family quantities (DiagGGN, BatchDiagGGN, SqrtGGN; exact and Monte-Carlo) against the
brute-force float64 GGN ``J^T H J``, on every model family."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import beyondgrad as bg
from models import CASES
from oracles.curvature import batch_diag_ggn, diag_ggn, ggn, split
from test_first_order import assert_close

CURVATURE_CASES = sorted(CASES)


@pytest.mark.parametrize("case", CURVATURE_CASES)
def test_exact_ggn_quantities(case):
    model, X, y, loss_fn = CASES[case]()
    ref = ggn(model, loss_fn, X, y)
    res = bg.compute(
        model, loss_fn, X, y, bg.DiagGGN(), bg.BatchDiagGGN(), bg.SqrtGGN(), bg.Grad(), bg.BatchL2()
    )
    assert_close(res[bg.DiagGGN], diag_ggn(ref), f"{case}/DiagGGN")
    assert_close(res[bg.BatchDiagGGN], batch_diag_ggn(ref), f"{case}/BatchDiagGGN")
    for q in (bg.DiagGGN(), bg.BatchDiagGGN(), bg.SqrtGGN()):
        assert not any(v.requires_grad for v in res[q].values()), "results hold a graph"
    # V V^T is the GGN
    V = torch.cat([v.flatten(2) for v in res[bg.SqrtGGN].values()], 2)  # [K, N, P]
    K, N, P = V.shape
    outputs = ref["J"].shape[1]  # per sample
    if isinstance(loss_fn, torch.nn.CrossEntropyLoss):  # C - 1 vectors per position (rank)
        C = model(X).shape[1]
        assert K == outputs - outputs // C
    else:
        assert K == outputs
    flat = V.reshape(K * N, P)
    torch.testing.assert_close(flat.T @ flat, ref["full"], rtol=1e-9, atol=1e-12)
    # first-order quantities computed in the same backward stay right
    from oracles.first_order import reference

    first = reference(model, loss_fn, X, y)
    assert_close(res.grad, first["Grad"], f"{case}/Grad")
    assert_close(res[bg.BatchL2], first["BatchL2"], f"{case}/BatchL2")


@pytest.mark.parametrize("case", ["mlp", "gpt", "resnet", "seq_linear"])
def test_each_curvature_quantity_alone_and_subsampled(case):
    model, X, y, loss_fn = CASES[case]()
    ref = ggn(model, loss_fn, X, y)
    assert_close(bg.compute(model, loss_fn, X, y, bg.DiagGGN())[bg.DiagGGN], diag_ggn(ref), "alone")
    index = torch.tensor([3, 1])
    res = bg.compute(model, loss_fn, X, y, bg.BatchDiagGGN(), bg.DiagGGN(), subsampling=index)
    expected = {k: v[index] for k, v in batch_diag_ggn(ref).items()}
    assert_close(res[bg.BatchDiagGGN], expected, "subsampled")
    assert_close(res[bg.DiagGGN], diag_ggn(ref), "DiagGGN ignores subsampling")


@pytest.mark.parametrize("case", ["mlp", "two_inputs", "dict_inputs", "gpt"])
def test_mc_ggn_is_seeded_and_converges(case):
    model, X, y, loss_fn = CASES[case]()
    exact = diag_ggn(ggn(model, loss_fn, X, y))

    def mc(M, seed):
        q = bg.DiagGGN(mc_samples=M)
        return bg.compute(model, loss_fn, X, y, q, generator=torch.Generator().manual_seed(seed))[q]

    a, b = mc(2, 0), mc(2, 0)
    for k in a:
        assert torch.equal(a[k], b[k])

    def rel(d):
        num = sum((d[k] - exact[k]).pow(2).sum() for k in exact)
        return float(num.sqrt() / sum(v.pow(2).sum() for v in exact.values()).sqrt())

    err_small, err_large = rel(mc(4, 1)), rel(mc(2000, 1))
    assert err_large < 0.1, err_large
    assert err_large < err_small / 3


def test_mc_sqrt_ggn_shape_and_batch_consistency():
    model, X, y, loss_fn = CASES["mlp"]()
    q1, q2 = bg.SqrtGGN(mc_samples=3), bg.DiagGGN(mc_samples=3)
    res = bg.compute(model, loss_fn, X, y, q1, q2, generator=torch.Generator().manual_seed(0))
    for name, V in res[q1].items():
        assert V.shape[:2] == (3, X.shape[0])
        torch.testing.assert_close(V.pow(2).sum((0, 1)), res[q2][name])


def test_large_outputs_are_refused_with_a_hint():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 300)).double()
    X = torch.randn(2, 3, dtype=torch.float64)
    y = torch.randint(0, 300, (2,))
    with pytest.raises(RuntimeError, match="mc_samples"):
        bg.compute(model, nn.CrossEntropyLoss(), X, y, bg.DiagGGN())
    res = bg.compute(model, nn.CrossEntropyLoss(), X, y, bg.DiagGGN(max_vectors=300))
    ref = diag_ggn(ggn(model, nn.CrossEntropyLoss(), X, y))
    assert_close(res[bg.DiagGGN], ref, "explicit max_vectors")
    with pytest.raises(ValueError, match="mc_samples"):
        bg.DiagGGN(mc_samples=0)


def test_ggn_for_every_loss():
    from loss_cases import loss_cases

    for name, (loss_fn, shape, y) in loss_cases().items():
        torch.manual_seed(0)
        out = 1
        for s in shape[1:]:
            out *= s

        class Net(nn.Module):
            def __init__(self, out: int, shape: tuple[int, ...]):
                super().__init__()
                self.shape = shape
                self.l1 = nn.Linear(2, 3)
                self.l2 = nn.Linear(3, out)

            def forward(self, x):
                return self.l2(torch.tanh(self.l1(x))).reshape(x.shape[0], *self.shape[1:])

        model = Net(out, shape).double()
        X = torch.randn(shape[0], 2, dtype=torch.float64)
        ref = ggn(model, loss_fn, X, y)
        res = bg.compute(model, loss_fn, X, y, bg.DiagGGN(), bg.BatchDiagGGN())
        assert_close(res[bg.DiagGGN], diag_ggn(ref), f"{name}/DiagGGN")
        assert_close(res[bg.BatchDiagGGN], batch_diag_ggn(ref), f"{name}/BatchDiagGGN")
    assert split  # helper used by other tests


CONV_SETTINGS = [
    "1d-stride-pad-dil",
    "1d-reflect",
    "2d-groups",
    "2d-same-dil",
    "2d-patchify",
    "3d-hyper",
    "1d-transpose-outpad",
    "2d-transpose-groups-nobias",
]


@pytest.mark.parametrize("setting", CONV_SETTINGS)
def test_conv_families_exact_and_per_sample_diagonals(setting):
    from test_conv_rules import SETTINGS, make

    factory, spatial = next((f, s) for n, f, s in SETTINGS if n == setting)
    model, X, y = make(factory, spatial)
    loss_fn = nn.CrossEntropyLoss()
    ref = ggn(model, loss_fn, X, y)
    res = bg.compute(model, loss_fn, X, y, bg.DiagGGN(), bg.BatchDiagGGN())
    assert_close(res[bg.DiagGGN], diag_ggn(ref), f"{setting}/DiagGGN")
    assert_close(res[bg.BatchDiagGGN], batch_diag_ggn(ref), f"{setting}/BatchDiagGGN")
