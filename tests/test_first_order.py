"""Every first-order quantity against the brute-force float64 oracle, on every model family."""

from __future__ import annotations

import pytest
import torch

import beyondgrad as bg
from models import CASES
from oracles.first_order import autograd_grad, reference

QUANTITIES = [
    bg.Grad(),
    bg.BatchGrad(),
    bg.BatchL2(),
    bg.BatchDot(),
    bg.SumGradSquared(),
    bg.Variance(),
]


def assert_close(actual: dict, expected: dict, what: str) -> None:
    assert set(actual) == set(expected), f"{what}: keys {set(actual) ^ set(expected)}"
    for name, value in expected.items():
        torch.testing.assert_close(
            actual[name], value, rtol=1e-9, atol=1e-12, msg=f"{what}[{name}]"
        )


@pytest.mark.parametrize("case", sorted(CASES))
def test_all_quantities_match_oracle(case):
    model, X, y, loss_fn = CASES[case]()
    res = bg.compute(model, loss_fn, X, y, *QUANTITIES)
    ref = reference(model, loss_fn, X, y)
    for q in QUANTITIES:
        assert_close(res[q], ref[q.key], f"{case}/{q.key}")
        assert not any(v.requires_grad for v in res[q].values()), "results hold a graph"
    # the per-sample gradients sum to the ordinary autograd gradient
    assert_close(res.grad, autograd_grad(model, loss_fn, X, y), f"{case}/autograd")
    torch.testing.assert_close(
        res.loss,
        loss_fn(
            model(*X) if isinstance(X, tuple) else model(**X) if isinstance(X, dict) else model(X),
            y,
        ),
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_quantity_alone_matches_oracle(case):
    """Requested alone, each quantity takes its own contraction path (Gram tricks, cross terms
    of tied weights) instead of reading materialized per-sample gradients."""
    model, X, y, loss_fn = CASES[case]()
    ref = reference(model, loss_fn, X, y)
    for q in QUANTITIES:
        assert_close(bg.compute(model, loss_fn, X, y, q)[q], ref[q.key], f"{case}/{q.key}/alone")


@pytest.mark.parametrize("case", ["mlp", "gpt", "rnn", "two_inputs"])
def test_subsampling(case):
    model, X, y, loss_fn = CASES[case]()
    index = [3, 0, 3]
    res = bg.compute(model, loss_fn, X, y, *QUANTITIES, subsampling=index)
    ref = reference(model, loss_fn, X, y, index=torch.tensor(index))
    for q in QUANTITIES:
        assert_close(res[q], ref[q.key], f"{case}/sub/{q.key}")
    assert res[bg.BatchGrad][next(iter(res.grad))].shape[0] == 3


def test_result_access():
    model, X, y, loss_fn = CASES["mlp"]()
    res = bg.compute(model, loss_fn, X, y, bg.BatchL2(), bg.Grad())
    assert bg.BatchL2 in res and bg.BatchGrad not in res
    assert res[bg.BatchL2] is res[bg.BatchL2()]
    with pytest.raises(KeyError, match="BatchGrad"):
        res[bg.BatchGrad]
    assert list(res.grad) == [n for n, _ in model.named_parameters()]
    for name, p in model.named_parameters():
        assert res[bg.BatchL2][name].shape == (5,)
        assert res.grad[name].shape == p.shape
    res2 = bg.compute(model, loss_fn, X, y, bg.BatchL2())
    with pytest.raises(AttributeError, match=r"bg\.Grad"):
        _ = res2.grad


def test_tied_weights_are_one_parameter():
    model, X, y, loss_fn = CASES["gpt"]()
    res = bg.compute(model, loss_fn, X, y, bg.BatchGrad())
    assert "tok.weight" in res[bg.BatchGrad] and "head.weight" not in res[bg.BatchGrad]
    assert res.rules["tok.weight"] == "mixed"
    # nn.MultiheadAttention: in-projection and out_proj as Linear calls (rules.attention)
    assert res.rules["blocks.1.attn.attn.in_proj_weight"] == "linear"
    assert res.rules["blocks.1.attn.attn.out_proj.weight"] == "linear"
    assert res.rules["blocks.0.attn.qkv.weight"] == "linear"


def test_capture_api_on_ordinary_training_step():
    model, X, y, loss_fn = CASES["mlp"]()
    with bg.capture(model, loss_fn, bg.BatchL2(), bg.Grad()) as session:
        loss = loss_fn(model(X), y)
    res = session.compute(loss)
    ref = reference(model, loss_fn, X, y)
    assert_close(res[bg.BatchL2], ref["BatchL2"], "capture")


def test_float32_model_runs_in_float32():
    model, X, y, loss_fn = CASES["gpt"]()
    model = model.float()
    res = bg.compute(model, loss_fn, X, y, bg.BatchL2(), bg.SumGradSquared())
    for v in res[bg.BatchL2].values():
        assert v.dtype == torch.float32 and torch.isfinite(v).all()


@pytest.mark.parametrize(("S", "num"), [(3, 50), (12, 5), (30, 4)])  # Gram trick / scattered rows
def test_scatter_form_batch_l2_both_paths(S, num):
    """The embedding form's squared row norms equal the norms of its scattered rows on both
    evaluation paths (few positions against the table, and many)."""
    from beyondgrad.forms.scatter import ScatterForm

    g = torch.Generator().manual_seed(0)
    K, N, d = 2, 3, 4
    index = torch.randint(0, num, (N, S), generator=g)
    G = torch.randn(K * N, S, d, generator=g, dtype=torch.float64)
    form = ScatterForm(index, G, num, vectors=K)
    expected = torch.stack(
        [
            torch.zeros(num, d, dtype=torch.float64).index_add_(0, index[r % N], G[r]).pow(2).sum()
            for r in range(K * N)
        ]
    )
    torch.testing.assert_close(form._batch_l2(), expected)
