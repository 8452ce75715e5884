"""Exact curvature diagonals through convolutions (``K`` = classes backpropagated vectors):
``DiagGGN`` and ``BatchDiagGGN`` against the float64 GGN oracle over the conv settings table
(1-d/2-d/3-d, transposed, odd strides, padding, dilation, groups, padding modes), with the
conv form's block-wise squared sums at their default block and at one sample per block."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import beyondgrad as bg
import beyondgrad.rules.conv as conv_rules
from oracles.curvature import batch_diag_ggn, diag_ggn, ggn
from test_conv_rules import SETTINGS, make


@pytest.mark.parametrize("block", [None, 1])
@pytest.mark.parametrize("name,factory,spatial", SETTINGS, ids=[s[0] for s in SETTINGS])
def test_exact_diagonals_through_conv(monkeypatch, name, factory, spatial, block):
    if block is not None:
        monkeypatch.setattr(conv_rules, "BLOCK_ELEMENTS", block)
    model, x, y = make(factory, spatial)
    loss_fn = nn.CrossEntropyLoss()
    ref = ggn(model, loss_fn, x, y)
    res = bg.compute(model, loss_fn, x, y, bg.DiagGGN(), bg.BatchDiagGGN())
    for pname, value in diag_ggn(ref).items():
        torch.testing.assert_close(res[bg.DiagGGN][pname], value, msg=f"{name}/{pname}")
    for pname, value in batch_diag_ggn(ref).items():
        torch.testing.assert_close(res[bg.BatchDiagGGN][pname], value, msg=f"{name}/{pname}")


def test_conv_form_blocks_equal_rows():
    """The block-wise squared sums of a conv form equal the explicit rows (several blocks,
    a partial last block), and a form whose rows were materialized gives the same."""
    g = torch.Generator().manual_seed(0)
    K, N, S, I, O = 3, 5, 4, 6, 2
    A = torch.randn(N, I, S, dtype=torch.float64, generator=g).transpose(1, 2)
    G = torch.randn(K * N, O, S, dtype=torch.float64, generator=g).transpose(1, 2)
    rows = torch.einsum("knso,nsi->knoi", G.reshape(K, N, S, O), A)
    for block in (1, 2 * O * I, 1 << 16):
        conv_rules.BLOCK_ELEMENTS, saved = block, conv_rules.BLOCK_ELEMENTS
        try:
            form = conv_rules.ConvOuterForm(A, G, (O, I), K)
            torch.testing.assert_close(form.sum_grad_squared(), rows.square().sum((0, 1)))
            torch.testing.assert_close(form.batch_sum_grad_squared(), rows.square().sum(0))
        finally:
            conv_rules.BLOCK_ELEMENTS = saved
    done = conv_rules.ConvOuterForm(A, G, (O, I), K)
    done.batch_grad()
    torch.testing.assert_close(done.sum_grad_squared(), rows.square().sum((0, 1)))


class _PoisonSecondVector(torch.autograd.Function):
    """Identity whose backward turns the gradient non-finite on its second call only (the
    second backpropagated vector of the per-vector path)."""

    calls = 0

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        _PoisonSecondVector.calls += 1
        return g * float("nan") if _PoisonSecondVector.calls == 2 else g


class _Poisoned(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.head = nn.Linear(3 * 3 * 3, 3)

    def forward(self, x):
        return self.head(_PoisonSecondVector.apply(torch.relu(self.conv(x))).flatten(1))


@pytest.mark.parametrize("finite", [True, False])
def test_non_finite_gradient_of_one_vector_is_named(finite):
    """Exact vectors through a conv go one pass each; a non-finite gradient in any one pass
    raises and names the layer it reached first; a finite run passes."""
    torch.manual_seed(0)
    model = _Poisoned().double()
    x, y = torch.randn(2, 2, 5, 5, dtype=torch.float64), torch.tensor([0, 2])
    _PoisonSecondVector.calls = -100 if finite else 0
    if finite:
        bg.compute(model, nn.CrossEntropyLoss(), x, y, bg.DiagGGN())
        return
    with pytest.raises(FloatingPointError, match=r"non-finite gradient.*'conv'"):
        bg.compute(model, nn.CrossEntropyLoss(), x, y, bg.DiagGGN())
