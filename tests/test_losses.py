"""The backpropagated output-space vectors (grad / exact / mc) of every supported loss against
``torch.func.hessian`` and autograd, in float64."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import beyondgrad as bg
from loss_cases import loss_cases

CASES = loss_cases()


def output_for(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def per_sample_hessians(loss_fn, f, y):
    """[N, K, K] diagonal blocks of d2L/df2, asserting the off-diagonal blocks vanish."""
    N = f.shape[0]
    K = f[0].numel()
    H = torch.func.hessian(lambda out: loss_fn(out, y))(f).reshape(N, K, N, K)
    blocks = torch.stack([H[n, :, n] for n in range(N)])
    off = H.clone()
    for n in range(N):
        off[n, :, n] = 0
    assert off.abs().max() < 1e-12, "samples interact through the loss"
    return blocks


def vv(V):
    K = V.shape[0]
    N = V.shape[1]
    flat = V.reshape(K, N, -1)
    return torch.einsum("kni,knj->nij", flat, flat)


@pytest.mark.parametrize("name", sorted(CASES))
def test_grad_vectors(name):
    loss_fn, shape, y = CASES[name]
    f = output_for(shape).requires_grad_(True)
    (expected,) = torch.autograd.grad(loss_fn(f, y), f)
    V = bg.loss_vectors(loss_fn, f, y, "grad")
    assert V.shape == (1, *shape)
    torch.testing.assert_close(V[0], expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", sorted(CASES))
def test_exact_vectors_factor_the_loss_hessian(name):
    loss_fn, shape, y = CASES[name]
    f = output_for(shape)
    V = bg.loss_vectors(loss_fn, f, y, "exact")
    assert V.shape[1:] == shape
    torch.testing.assert_close(vv(V), per_sample_hessians(loss_fn, f, y), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("name", [n for n in sorted(CASES) if "posweight" not in n])
def test_mc_vectors_are_seeded_and_converge(name):
    loss_fn, shape, y = CASES[name]
    f = output_for(shape)
    V1 = bg.loss_vectors(
        loss_fn, f, y, "mc", mc_samples=3, generator=torch.Generator().manual_seed(3)
    )
    V2 = bg.loss_vectors(
        loss_fn, f, y, "mc", mc_samples=3, generator=torch.Generator().manual_seed(3)
    )
    assert V1.shape == (3, *shape)
    assert torch.equal(V1, V2)
    exact = per_sample_hessians(loss_fn, f, y)
    errors = []
    for M in (100, 10000):
        V = bg.loss_vectors(
            loss_fn, f, y, "mc", mc_samples=M, generator=torch.Generator().manual_seed(0)
        )
        errors.append(((vv(V) - exact).norm() / exact.norm()).item())
    assert errors[1] < 0.06, errors  # ~ 1/sqrt(M) with a generous constant
    assert errors[1] < errors[0]


def test_mc_rejects_pos_weight_and_bad_samples():
    loss_fn, shape, y = CASES["bce-posweight-mean"]
    with pytest.raises(NotImplementedError, match="pos_weight"):
        bg.loss_vectors(loss_fn, output_for(shape), y, "mc")
    loss_fn, shape, y = CASES["ce-mean"]
    with pytest.raises(ValueError, match="mc_samples"):
        bg.loss_vectors(loss_fn, output_for(shape), y, "mc", mc_samples=0)
    with pytest.raises(ValueError, match="kind"):
        bg.loss_vectors(loss_fn, output_for(shape), y, "hessian")


@pytest.mark.parametrize("name", sorted(CASES))
def test_first_order_quantities_for_every_loss(name):
    """Per-sample quantities through a small MLP for every loss configuration."""
    from oracles.first_order import reference

    loss_fn, shape, y = CASES[name]
    torch.manual_seed(0)
    out = 1
    for s in shape[1:]:
        out *= s

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1 = nn.Linear(2, 4)
            self.l2 = nn.Linear(4, out)

        def forward(self, x):
            return self.l2(torch.tanh(self.l1(x))).reshape(x.shape[0], *shape[1:])

    model = Net().double()
    X = torch.randn(shape[0], 2, dtype=torch.float64)
    qs = [bg.Grad(), bg.BatchGrad(), bg.BatchL2(), bg.SumGradSquared(), bg.Variance()]
    res = bg.compute(model, loss_fn, X, y, *qs)
    ref = reference(model, loss_fn, X, y)
    for q in qs:
        for k, v in ref[q.key].items():
            torch.testing.assert_close(res[q][k], v, rtol=1e-9, atol=1e-13, msg=f"{q.key}[{k}]")


def test_sampled_classes_follow_the_probabilities_and_skip_impossible_ones():
    """Inverse-CDF class draws (the MC loss vectors' labels): ``[P, M]`` long, the empirical
    frequencies within 4 standard errors of the probabilities, classes of probability 0 never
    drawn, and the same draws for the same generator state."""
    from beyondgrad.engine.losses import sample_classes

    probs = torch.tensor(
        [[0.5, 0.0, 0.3, 0.2], [0.0, 0.0, 1.0, 0.0], [0.25, 0.25, 0.25, 0.25]],
        dtype=torch.float32,
    )
    M = 20000
    given = probs.clone()
    draws = sample_classes(probs, M, torch.Generator().manual_seed(0))
    assert torch.equal(probs, given)  # the probabilities are not modified
    as64 = probs.double()
    sample_classes(as64, 2, None)
    assert torch.equal(as64, given.double())  # not even when no dtype conversion copies them
    assert draws.shape == (3, M) and draws.dtype == torch.long
    freq = torch.nn.functional.one_hot(draws, 4).double().mean(1)
    se = (probs.double() * (1 - probs.double()) / M).sqrt()
    assert bool(((freq - probs.double()).abs() <= 4 * se + 1e-12).all())
    assert not bool((draws[0] == 1).any()) and bool((draws[1] == 2).all())
    again = sample_classes(probs, M, torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)
    for bad in ([[0.5, float("nan")]], [[0.0, 0.0]], [[1.5, -0.5]], [[float("inf"), 1.0]]):
        with pytest.raises(ValueError, match="non-negative"):
            sample_classes(torch.tensor(bad), 1, None)


def test_sampled_classes_in_blocks_of_rows(monkeypatch):
    """Rows are sampled block by block (bounded float64 temporaries): the same frequencies."""
    import beyondgrad.engine.losses as losses

    monkeypatch.setattr(losses, "SAMPLE_BLOCK", 8)  # two rows of four classes per block
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.4]]).repeat(5, 1)
    M = 20000
    draws = losses.sample_classes(probs, M, torch.Generator().manual_seed(1))
    assert draws.shape == (5, M)
    freq = torch.nn.functional.one_hot(draws, 4).double().mean(1)
    se = (probs.double() * (1 - probs.double()) / M).sqrt()
    assert bool(((freq - probs.double()).abs() <= 4 * se).all())


@pytest.mark.parametrize("C", [1, 2, 3, 10])
@pytest.mark.parametrize("peak", [None, 0, 1])
def test_cross_entropy_exact_vectors_have_the_hessians_rank(C, peak):
    """Cross-entropy's Hessian ``diag p - p p^T`` has rank ``C - 1``: the exact vectors are
    ``C - 1`` per position (one zero vector for one class) and factor it exactly, also for
    near one-hot probabilities (on the Householder pivot class 0 or another)."""
    torch.manual_seed(C)
    f = torch.randn(5, C, 3, dtype=torch.float64)
    if peak is not None and peak < C:
        f[:, peak] += 40.0  # p_peak = 1 - O(e^-40)
    y = torch.randint(0, C, (5, 3))
    loss_fn = torch.nn.CrossEntropyLoss()
    V = bg.loss_vectors(loss_fn, f, y, "exact")
    assert V.shape == (3 * max(C - 1, 1), 5, C, 3)
    torch.testing.assert_close(vv(V), per_sample_hessians(loss_fn, f, y), rtol=1e-10, atol=1e-15)
