"""The Laplace fit reads a plain DataLoader over tensors by slicing: the same batches, and the
same fitted approximation, as iterating the loader; anything else is iterated as it is."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import beyondgrad as bg
from beyondgrad.laplace.batches import read_batches, sliceable


def _data(n=10):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, 3, generator=g, dtype=torch.float64)
    y = torch.randn(n, 2, generator=g, dtype=torch.float64)
    labels = torch.randint(4, (n,), generator=g)
    return X, y, labels


@pytest.mark.parametrize("batch_size, drop_last", [(3, False), (3, True), (5, False), (64, False)])
def test_sliced_batches_equal_the_loader(batch_size, drop_last):
    X, y, labels = _data()
    loader = DataLoader(TensorDataset(X, y, labels), batch_size=batch_size, drop_last=drop_last)
    assert sliceable(loader)
    fast, slow = read_batches(loader), list(loader)
    assert len(fast) == len(slow)
    for a, b in zip(fast, slow):
        assert len(a) == len(b)
        for s, t in zip(a, b):
            assert s.dtype == t.dtype and s.shape == t.shape
            assert torch.equal(s, t)


def test_other_loaders_are_iterated():
    X, y, _ = _data()
    ds = TensorDataset(X, y)
    shuffled = DataLoader(ds, batch_size=4, shuffle=True)
    collated = DataLoader(
        ds, batch_size=4, collate_fn=lambda b: [torch.stack(c) * 2 for c in zip(*b)]
    )
    assert not sliceable(shuffled) and not sliceable(collated)
    assert not sliceable([(X, y)])
    doubled = read_batches(collated)
    assert torch.equal(doubled[0][0], 2 * X[:4])
    pairs = [(X[:4], y[:4]), (X[4:], y[4:])]
    assert read_batches(iter(pairs)) == pairs


@pytest.mark.parametrize("structure", ["kfac", "diag", "full"])
def test_fit_from_a_loader_equals_fit_from_its_batches(structure):
    X, y, _ = _data(12)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    loader = DataLoader(TensorDataset(X, y), batch_size=5)
    kwargs = dict(structure=structure, prior_precision=0.7, sigma_noise=0.5)
    fast = bg.laplace.Laplace(model, nn.MSELoss(), loader, **kwargs)
    slow = bg.laplace.Laplace(model, nn.MSELoss(), [(a, b) for a, b in loader], **kwargs)
    torch.testing.assert_close(fast.log_marginal_likelihood(), slow.log_marginal_likelihood())
    torch.testing.assert_close(fast.functional_variance(X), slow.functional_variance(X))


def test_kronecker_bases_computed_at_first_use():
    """The evidence reads the eigenvalues alone; the bases come at the first predictive and
    give the same variances as a structure restored from the state (bases included)."""
    X, y, _ = _data(12)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    la = bg.laplace.Laplace(model, nn.MSELoss(), [(X, y)], structure="kfac", sigma_noise=0.5)
    la.log_marginal_likelihood()
    blocks = la.curvature.blocks
    assert all(b.left is None and b.bases is not None for b in blocks)
    var = la.functional_variance(X)
    assert all(b.left is not None and b.bases is None for b in blocks)
    restored = bg.laplace.Laplace(model, nn.MSELoss(), structure="kfac", sigma_noise=0.5)
    restored.load_state_dict(la.state_dict())
    torch.testing.assert_close(restored.functional_variance(X), var)
    torch.testing.assert_close(restored.log_marginal_likelihood(), la.log_marginal_likelihood())
