"""bg.laplace against dense float64 formulas: the full GGN from the oracles (exact structure),
each approximate structure against its own definition (diagonal of the GGN, the KFAC/EKFAC
operators' matrices, the GGN's leading eigenpairs), dense logdet / evidence / GLM predictive
variance, gradients of the evidence, prior optimization, sampling and state round trips."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

import beyondgrad as bg
from beyondgrad.laplace import Laplace
from oracles.curvature import ggn

STRUCTURES = ["full", "diag", "kfac", "ekfac", "lowrank"]


def problem(loss: str, N: int = 7, seed: int = 0):
    """A tiny MLP with CE (3 classes), MSE (2 outputs) or BCE (2 outputs), two uneven batches."""
    torch.manual_seed(seed)
    K = 3 if loss == "ce" else 2
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, K)).double()
    X = torch.randn(N, 3, dtype=torch.float64)
    if loss == "ce":
        y, loss_fn = torch.randint(0, K, (N,)), nn.CrossEntropyLoss()
    elif loss == "mse":
        y, loss_fn = torch.randn(N, K, dtype=torch.float64), nn.MSELoss()
    else:
        y, loss_fn = torch.randint(0, 2, (N, K)).double(), nn.BCEWithLogitsLoss()
    return model, loss_fn, X, y, [(X[:4], y[:4]), (X[4:], y[4:])]


def summed(loss_fn: nn.Module) -> nn.Module:
    return type(loss_fn)(reduction="sum")


def definition(structure: str, model, loss_fn, X, y, data, rank: int) -> torch.Tensor:
    """The matrix each structure stands for, built independently (curvature of the summed
    loss)."""
    H = ggn(model, summed(loss_fn), X, y)["full"]
    if structure == "full":
        return H
    if structure == "diag":
        return torch.diag(torch.diagonal(H))
    if structure == "lowrank":
        e, V = torch.linalg.eigh(H)
        return V[:, -rank:] @ torch.diag(e[-rank:]) @ V[:, -rank:].T
    cls = bg.linops.KFAC if structure == "kfac" else bg.linops.EKFAC
    return cls(model, summed(loss_fn), data, fisher_type="type-2").to_dense()


def layerwise_prior(model) -> torch.Tensor:
    """One value per parameter tensor, equal for a weight and its bias (Kronecker blocks)."""
    return torch.tensor([0.5, 0.5, 2.0, 2.0], dtype=torch.float64)


def dense_evidence(la: Laplace, H: torch.Tensor, prior, sigma, loss: str, loss_sum) -> torch.Tensor:
    s = 1 / (2 * sigma**2) if loss == "mse" else torch.ones((), dtype=torch.float64)
    prior_vec = la.prior_vector(prior)
    P = s * H + torch.diag(prior_vec)
    if loss == "mse":
        loglik = -loss_sum / (2 * sigma**2) - 0.5 * la.num_outputs * torch.log(
            2 * math.pi * sigma**2
        )
    else:
        loglik = -loss_sum
    theta = la.mean
    return loglik - 0.5 * (
        torch.logdet(P) - prior_vec.log().sum() + (prior_vec * theta * theta).sum()
    )


@pytest.mark.parametrize("loss", ["ce", "mse", "bce"])
@pytest.mark.parametrize("structure", STRUCTURES)
def test_evidence_posterior_and_sampling_match_dense(structure, loss):
    model, loss_fn, X, y, data = problem(loss)
    rank = 12
    prior, sigma = layerwise_prior(model), 0.7 if loss == "mse" else 1.0
    la = Laplace(
        model,
        loss_fn,
        data,
        structure=structure,
        prior_precision=prior,
        sigma_noise=sigma,
        rank=rank,
    )
    H = definition(structure, model, loss_fn, X, y, data, rank)
    # lowrank: Lanczos pairs, accurate to its residual tolerance (1e-8 relative)
    tol = dict(atol=1e-7, rtol=1e-6) if structure == "lowrank" else dict(atol=1e-9, rtol=1e-8)
    torch.testing.assert_close(la.curvature.to_dense(), H, **tol)
    loss_sum = summed(loss_fn)(model(X), y).detach()
    sig = torch.tensor(sigma, dtype=torch.float64)
    expected = dense_evidence(la, H, prior, sig, loss, loss_sum)
    torch.testing.assert_close(la.log_marginal_likelihood(), expected, **tol)
    s = 1 / (2 * sigma**2) if loss == "mse" else 1.0
    cov = torch.linalg.inv(s * H + torch.diag(la.prior_vector()))
    torch.testing.assert_close(la.posterior_covariance(), cov, **tol)
    eye = torch.eye(la.num_params, dtype=torch.float64)
    T = la.curvature.inverse_sqrt(torch.tensor(s, dtype=torch.float64), la.prior_vector(), eye)
    torch.testing.assert_close(T @ T.T, cov, **tol)
    # whiten gives T^T: the quadratic forms of the GLM predictive
    Wh = la.curvature.whiten(torch.tensor(s, dtype=torch.float64), la.prior_vector(), eye)
    torch.testing.assert_close(Wh.T @ Wh, cov, **tol)


@pytest.mark.parametrize("loss", ["ce", "mse", "bce"])
def test_glm_predictive_matches_dense_jacobian_formula(loss):
    model, loss_fn, _X, y, data = problem(loss)
    la = Laplace(model, loss_fn, data, structure="full", prior_precision=0.8, sigma_noise=1.0)
    Xt = torch.randn(3, 3, dtype=torch.float64)
    J = ggn(model, summed(loss_fn), Xt, y[:3])["J"]  # [N, K, P]
    var = torch.einsum("nkp,pq,nlq->nkl", J, la.posterior_covariance(), J)
    torch.testing.assert_close(la.functional_variance(Xt), var, atol=1e-10, rtol=1e-8)
    chunked = la.functional_variance(Xt, max_vectors=4)  # chunks of 1 or 2 inputs
    torch.testing.assert_close(chunked, var, atol=1e-10, rtol=1e-8)
    f = model(Xt).detach()
    pred = la.predictive(Xt, pred_type="glm", link_approx="probit")
    if loss == "mse":
        mean, cov = pred
        torch.testing.assert_close(mean, f)
        torch.testing.assert_close(cov, var + torch.eye(2, dtype=torch.float64))
        return
    kappa = 1 / torch.sqrt(1 + math.pi / 8 * torch.diagonal(var, dim1=1, dim2=2))
    link = torch.softmax if loss == "ce" else (lambda t, dim: torch.sigmoid(t))
    torch.testing.assert_close(pred, link(kappa * f, dim=-1))
    # Monte-Carlo link: the mean of the link over f ~ N(f(x), var), checked against draws
    # made here from the dense covariance
    mc = la.predictive(
        Xt, link_approx="mc", n_samples=20000, generator=torch.Generator().manual_seed(0)
    )
    L = torch.linalg.cholesky(var + 1e-12 * torch.eye(var.shape[-1], dtype=torch.float64))
    eps = torch.randn(
        20000, *f.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    draws = f + torch.einsum("nij,snj->sni", L, eps)
    torch.testing.assert_close(mc, link(draws, dim=-1).mean(0), atol=0.01, rtol=0)


def test_kfac_exact_for_one_layer_one_sample():
    """For a single Linear layer and one sample, KFAC (type-2, joint bias) is the GGN."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    X, y = torch.randn(1, 3, dtype=torch.float64), torch.randn(1, 2, dtype=torch.float64)
    la = Laplace(
        model, nn.MSELoss(), [(X, y)], structure="kfac", prior_precision=0.3, sigma_noise=0.5
    )
    H = ggn(model, nn.MSELoss(reduction="sum"), X, y)["full"]
    P = H / (2 * 0.25) + 0.3 * torch.eye(8, dtype=torch.float64)
    torch.testing.assert_close(
        la.curvature.logdet(torch.tensor(2.0, dtype=torch.float64), la.prior_vector()),
        torch.logdet(P),
    )


def test_last_layer_subset_is_the_principal_block():
    model, loss_fn, X, y, data = problem("ce")
    la = Laplace(model, loss_fn, data, structure="full", subset="last_layer")
    assert la.names == ["2.weight", "2.bias"]
    H = ggn(model, summed(loss_fn), X, y)["full"]
    torch.testing.assert_close(la.curvature.to_dense(), H[-15:, -15:])
    named = Laplace(model, loss_fn, data, structure="diag", subset=["2.bias", "0.bias"])
    assert named.names == ["0.bias", "2.bias"]


@pytest.mark.parametrize("structure", ["full", "kfac", "lowrank"])
def test_evidence_gradients_match_dense_formula(structure):
    model, loss_fn, X, y, data = problem("mse")
    la = Laplace(model, loss_fn, data, structure=structure, rank=8)
    H = definition(structure, model, loss_fn, X, y, data, 8)
    loss_sum = summed(loss_fn)(model(X), y).detach()
    grads = []
    for dense in (False, True):
        prior = torch.tensor([0.7, 0.7, 1.5, 1.5], dtype=torch.float64, requires_grad=True)
        sigma = torch.tensor(0.6, dtype=torch.float64, requires_grad=True)
        value = (
            dense_evidence(la, H, prior, sigma, "mse", loss_sum)
            if dense
            else la.log_marginal_likelihood(prior, sigma)
        )
        grads.append(torch.autograd.grad(value, [prior, sigma]))
    (prior_grad, sigma_grad), (dense_prior, dense_sigma) = grads
    tol = dict(atol=1e-6, rtol=1e-6) if structure == "lowrank" else dict(atol=1e-8, rtol=1e-7)
    torch.testing.assert_close(sigma_grad, dense_sigma, **tol)
    if structure == "kfac":  # defined for tied values only: compare per Kronecker block
        prior_grad = prior_grad.reshape(2, 2).sum(1)
        dense_prior = dense_prior.reshape(2, 2).sum(1)
    torch.testing.assert_close(prior_grad, dense_prior, **tol)


def test_optimize_prior_precision_by_marglik_reaches_a_stationary_point():
    model, loss_fn, _X, _y, data = problem("ce")
    la = Laplace(model, loss_fn, data, structure="kfac", prior_precision=1.0)
    before = la.log_marginal_likelihood().item()
    prior = la.optimize_prior_precision(n_steps=300, lr=0.1)
    assert prior.ndim == 0 and la.log_marginal_likelihood().item() > before
    log_prior = prior.log().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(la.log_marginal_likelihood(log_prior.exp()), log_prior)
    assert abs(float(g)) < 1e-3
    layerwise = la.optimize_prior_precision(prior_structure="layerwise", n_steps=50)
    assert layerwise.shape == (4,)
    assert layerwise[0] == layerwise[1] and layerwise[2] == layerwise[3]  # tied per block
    with pytest.raises(ValueError, match="Kronecker"):
        la.optimize_prior_precision(prior_structure="diagonal")


def test_optimize_sigma_noise_and_diagonal_prior():
    model, loss_fn, _X, _y, data = problem("mse")
    la = Laplace(model, loss_fn, data, structure="diag", prior_precision=1.0, sigma_noise=1.0)
    before = la.log_marginal_likelihood().item()
    prior = la.optimize_prior_precision(
        prior_structure="diagonal", n_steps=100, optimize_sigma_noise=True
    )
    assert prior.shape == (la.num_params,)
    assert la.sigma_noise.item() != 1.0 and la.log_marginal_likelihood().item() > before


def test_gridsearch_minimizes_validation_nll():
    model, loss_fn, X, y, data = problem("ce")
    la = Laplace(model, loss_fn, data, structure="diag")
    val = [(X[:3], y[:3])]
    grid = [0.01, 1.0, 100.0]
    nlls = []
    for v in grid:
        la.prior_precision = v
        nlls.append(la.validation_nll(val))
    best = la.optimize_prior_precision(method="gridsearch", val_data=val, grid=grid)
    assert float(best) == grid[nlls.index(min(nlls))]
    with pytest.raises(ValueError, match="val_data"):
        la.optimize_prior_precision(method="gridsearch")


def test_nn_predictive_equals_glm_for_a_linear_model():
    """A model linear in its parameters: parameter samples give the GLM predictive."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    X, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    la = Laplace(
        model, nn.MSELoss(), [(X, y)], structure="full", prior_precision=2.0, sigma_noise=0.5
    )
    mean, cov = la.predictive(X[:2])
    g = torch.Generator().manual_seed(0)
    m_nn, c_nn = la.predictive(X[:2], pred_type="nn", n_samples=20000, generator=g)
    torch.testing.assert_close(m_nn, mean, atol=0.02, rtol=0)
    torch.testing.assert_close(c_nn, cov, atol=0.02, rtol=0.05)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_state_dict_round_trip(structure):
    model, loss_fn, X, _y, data = problem("ce")
    la = Laplace(
        model, loss_fn, data, structure=structure, prior_precision=layerwise_prior(model), rank=5
    )
    buffer = io.BytesIO()
    torch.save(la.state_dict(), buffer)
    buffer.seek(0)
    other = Laplace(model, loss_fn, None, structure=structure)
    with pytest.raises(RuntimeError, match="not fitted"):
        other.log_marginal_likelihood()
    other.load_state_dict(torch.load(buffer, weights_only=True))
    torch.testing.assert_close(other.log_marginal_likelihood(), la.log_marginal_likelihood())
    torch.testing.assert_close(other.predictive(X[:2]), la.predictive(X[:2]))
    with pytest.raises(ValueError, match="structure"):
        Laplace(
            model, loss_fn, None, structure="diag" if structure != "diag" else "full"
        ).load_state_dict(la.state_dict())


def test_invalid_inputs_raise():
    model, loss_fn, _X, _y, data = problem("ce")
    with pytest.raises(ValueError, match="structure"):
        Laplace(model, loss_fn, data, structure="block")
    with pytest.raises(ValueError, match="weight"):
        Laplace(model, nn.CrossEntropyLoss(weight=torch.ones(3, dtype=torch.float64)), data)
    with pytest.raises(ValueError, match="sigma_noise"):
        Laplace(model, loss_fn, data, sigma_noise=2.0)
    with pytest.raises(ValueError, match="prior_precision"):
        Laplace(model, loss_fn, data, prior_precision=torch.ones(3))
    la = Laplace(
        model, loss_fn, data, structure="kfac", prior_precision=torch.tensor([1.0, 2.0, 1.0, 1.0])
    )
    with pytest.raises(ValueError, match="constant on the Kronecker block"):
        la.log_marginal_likelihood()


def test_empirical_fisher_scale_and_mc_fisher():
    """``fisher_type="empirical"``: ``H = sum_n g_n g_n^T`` of the summed loss, scaled by
    ``1/(4 sigma^4)`` for MSE (the empirical Fisher of the Gaussian negative log-likelihood).
    ``"mc"``: the same seeded draws give the same structure."""
    from oracles.first_order import per_sample_grads

    model, loss_fn, X, y, data = problem("mse")
    la = Laplace(model, loss_fn, data, structure="full", fisher_type="empirical", sigma_noise=0.7)
    G = per_sample_grads(model, summed(loss_fn), X, y)
    G = torch.cat([g.reshape(g.shape[0], -1) for g in G.values()], 1)
    torch.testing.assert_close(la.curvature.to_dense(), G.T @ G)
    nll_grads = G / (2 * 0.7**2)  # gradients of the Gaussian negative log-likelihood
    P = nll_grads.T @ nll_grads + torch.eye(G.shape[1], dtype=torch.float64)
    torch.testing.assert_close(la.posterior_covariance(), torch.linalg.inv(P))
    runs = [
        Laplace(model, loss_fn, data, structure=s, fisher_type="mc",
                generator=torch.Generator().manual_seed(3)).curvature.to_dense()
        for s in ("kfac", "kfac", "diag")
    ]  # fmt: skip
    torch.testing.assert_close(runs[0], runs[1])
    assert runs[2].count_nonzero() == runs[2].diagonal().count_nonzero()


@pytest.mark.parametrize("fisher_type", ["mc", "empirical", "type-2"])
@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_kfac_fit_takes_the_loss_from_its_pass(loss, fisher_type):
    """KFAC's one pass gives the log-likelihood's summed loss and counts too (no forward
    pass of its own): the loss at the data's labels (not the MC draws), the same counts and
    evidence as a diagonal fit's forward pass, with uneven batches."""
    model, loss_fn, X, y, data = problem(loss)
    kw = dict(fisher_type=fisher_type, generator=torch.Generator().manual_seed(1))
    if loss == "mse":
        kw["sigma_noise"] = 0.7
    kfac = Laplace(model, loss_fn, data, structure="kfac", **kw)
    diag = Laplace(model, loss_fn, data, structure="diag", **kw)
    expected = summed(loss_fn)(model(X), y).detach()
    torch.testing.assert_close(kfac.loss_sum, expected, rtol=1e-14, atol=0)
    assert (
        (kfac.num_data, kfac.num_outputs)
        == (diag.num_data, diag.num_outputs)
        == (7, y.numel() if loss == "mse" else 21)
    )
    torch.testing.assert_close(kfac.log_likelihood(), diag.log_likelihood(), rtol=1e-14, atol=0)


@pytest.mark.parametrize("fisher_type", ["type-2", "empirical"])
def test_dense_rows_chunked_and_unused_parameters(fisher_type):
    """The full structure from the engine's rows, chunked down to one sample per chunk,
    equals the oracle (GGN, or ``sum_n g_n g_n^T``); a parameter no call reaches has a zero
    block; the MC Fisher has no rows (the operator serves it)."""
    from beyondgrad.laplace.linops_adapter import dense_from_rows
    from oracles.first_order import per_sample_grads

    net, loss_fn, X, y, data = problem("ce")

    class WithUnused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net, self.unused = net, nn.Linear(2, 2).double()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    model = WithUnused()
    names = [n for n, _ in model.named_parameters()]
    H = dense_from_rows(model, summed(loss_fn), data, names, fisher_type, budget=1)
    used = [n for n in names if not n.startswith("unused")]
    P = sum(p.numel() for n, p in model.named_parameters() if n in used)
    if fisher_type == "type-2":
        ref = ggn(net, summed(loss_fn), X, y)["full"]
    else:
        G = per_sample_grads(model, summed(loss_fn), X, y)
        ref = torch.cat([G[n].reshape(G[n].shape[0], -1) for n in used], 1)
        ref = ref.T @ ref
    torch.testing.assert_close(H[:P, :P], ref)
    assert H[P:].abs().max() == 0 and H[:, P:].abs().max() == 0
    assert dense_from_rows(model, summed(loss_fn), data, names, "mc") is None


def test_functional_variance_fallback_equals_engine_jacobians(monkeypatch):
    """Where the engine's per-sample Jacobians are unavailable (samples coupled), the
    vector-Jacobian products of ``bg.linops.Jacobian`` give the same variance."""
    import beyondgrad.laplace.laplace as module

    model, loss_fn, _X, y, data = problem("mse")
    la = Laplace(model, loss_fn, data, structure="kfac", prior_precision=0.8)
    Xt = torch.randn(5, 3, dtype=torch.float64)
    J = ggn(model, summed(loss_fn), Xt, y[:5])["J"]  # [N, K, P]
    var = torch.einsum("nkp,pq,nlq->nkl", J, la.posterior_covariance(), J)
    torch.testing.assert_close(la.functional_variance(Xt, max_vectors=4), var)
    monkeypatch.setattr(module, "output_jacobians", lambda *args: None)
    torch.testing.assert_close(la.functional_variance(Xt, max_vectors=4), var)


def _block(model, H: torch.Tensor, names: list[str]) -> torch.Tensor:
    """The principal block of ``H`` (over every parameter) for ``names``."""
    index, start = [], 0
    for n, p in model.named_parameters():
        if n in names:
            index += range(start, start + p.numel())
        start += p.numel()
    return H[index][:, index]


@pytest.mark.parametrize("fisher_type", ["type-2", "empirical"])
@pytest.mark.parametrize("loss", ["ce", "mse", "bce"])
def test_last_layer_closed_form_matches_oracle(loss, fisher_type, monkeypatch):
    """A last ``nn.Linear``: ``sum_n Lambda_n kron u_n u_n^T`` from one forward's features
    (no engine pass: ``build_curvature`` must not run) equals the oracle's GGN / empirical
    Fisher block, for the weight and bias, the weight alone and the bias alone, dense and
    diagonal; KFAC over the whole layer equals the ``bg.linops.KFAC`` block."""
    from beyondgrad.laplace import laplace as laplace_module
    from oracles.first_order import per_sample_grads

    model, loss_fn, X, y, data = problem(loss)
    if fisher_type == "type-2":
        H = ggn(model, summed(loss_fn), X, y)["full"]
    else:
        G = per_sample_grads(model, summed(loss_fn), X, y)
        G = torch.cat([g.reshape(g.shape[0], -1) for g in G.values()], 1)
        H = G.T @ G

    def engine(*args, **kwargs):
        raise AssertionError("the engine path ran")

    monkeypatch.setattr(laplace_module, "build_curvature", engine)
    for subset in ("last_layer", ["2.weight"], ["2.bias"]):
        for structure in ("full", "diag"):
            la = Laplace(model, loss_fn, data, structure, subset, fisher_type=fisher_type)
            ref = _block(model, H, la.names)
            if structure == "diag":
                ref = torch.diag(torch.diagonal(ref))
            torch.testing.assert_close(la.curvature.to_dense(), ref)
    # KFAC over the whole layer: the operator's block (B = sum_n Lambda_n, A = mean u u^T)
    la = Laplace(model, loss_fn, data, "kfac", "last_layer", fisher_type=fisher_type)
    op = bg.linops.KFAC(model, summed(loss_fn), data, fisher_type, params=la.names)
    torch.testing.assert_close(la.curvature.to_dense(), op.to_dense())


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_last_layer_functional_variance_in_closed_form(loss, monkeypatch):
    """A last ``nn.Linear``'s output Jacobians ``I_K kron [phi, 1]^T`` come from one forward's
    features (the engine's Jacobians must not run): the GLM variance equals the dense Jacobian
    formula for the weight and bias, each alone, every structure, chunked; a model whose
    output is not the layer's (scaled) goes through the engine and still matches."""
    from beyondgrad.laplace import laplace as laplace_module

    model, loss_fn, _X, y, data = problem(loss)
    Xt = torch.randn(5, 3, dtype=torch.float64)
    J_all = ggn(model, summed(loss_fn), Xt, y[:5])["J"]  # [N, K, P] over every parameter
    names = [n for n, _ in model.named_parameters()]

    def columns(selected):
        index, start = [], 0
        for n, p in model.named_parameters():
            if n in selected:
                index += range(start, start + p.numel())
            start += p.numel()
        return J_all[:, :, index]

    def engine(*args, **kwargs):
        raise AssertionError("the engine's Jacobians ran")

    fitted = []
    for subset in ("last_layer", ["2.weight"], ["2.bias"]):
        for structure in ("full", "diag", "kfac", "ekfac"):
            if structure in ("kfac", "ekfac") and subset != "last_layer":
                continue
            la = Laplace(model, loss_fn, data, structure, subset, prior_precision=0.8)
            fitted.append(la)
    monkeypatch.setattr(laplace_module, "output_jacobians", engine)
    for la in fitted:
        J = columns(la.names)
        var = torch.einsum("nkp,pq,nlq->nkl", J, la.posterior_covariance(), J)
        with monkeypatch.context() as m:
            if la.structure != "full":  # diag, kfac: from the structure, no Jacobians formed
                m.setattr(laplace_module, "last_layer_jacobians", engine)
            torch.testing.assert_close(la.functional_variance(Xt), var, atol=1e-12, rtol=1e-10)
            chunked = la.functional_variance(Xt, max_vectors=4)
            torch.testing.assert_close(chunked, var, atol=1e-12, rtol=1e-10)
    # a last layer without bias: the Kronecker block of the weight alone
    torch.manual_seed(1)
    K = J_all.shape[1]
    free = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, K, bias=False)).double()
    for structure in ("diag", "kfac"):
        la = Laplace(free, loss_fn, data, structure, "last_layer", prior_precision=0.8)
        J = ggn(free, summed(loss_fn), Xt, y[:5])["J"][:, :, -4 * K :]
        var = torch.einsum("nkp,pq,nlq->nkl", J, la.posterior_covariance(), J)
        with monkeypatch.context() as m:
            m.setattr(laplace_module, "last_layer_jacobians", engine)
            torch.testing.assert_close(la.functional_variance(Xt), var, atol=1e-12, rtol=1e-10)
    monkeypatch.undo()

    class Scaled(nn.Module):
        def __init__(self, net: nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2.0 * self.net(x)

    scaled = Scaled(model)
    la = Laplace(scaled, loss_fn, data, "full", "last_layer", prior_precision=0.8)
    J = 2.0 * columns([n for n in names if n.startswith("2.")])
    var = torch.einsum("nkp,pq,nlq->nkl", J, la.posterior_covariance(), J)
    torch.testing.assert_close(la.functional_variance(Xt), var, atol=1e-12, rtol=1e-10)


def test_last_layer_without_closed_form_uses_the_engine():
    """The closed form needs the layer's own output as the model output, one call, and no
    tied parameter: a scaled output, a layer called twice and probability targets for CE go
    through the engine and still equal the oracle."""

    class Scaled(nn.Module):
        def __init__(self, net: nn.Module, twice: bool) -> None:
            super().__init__()
            self.net, self.twice = net, twice

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.twice:  # the last layer runs twice: the output is not linear in it
                h = torch.tanh(self.net[0](x))
                return self.net[2](torch.tanh(self.net[2](h)[:, :1].expand(-1, 4)))
            return 2.0 * self.net(x)

    net, loss_fn, X, y, data = problem("ce")
    for twice in (False, True):
        model = Scaled(net, twice)
        la = Laplace(model, loss_fn, data, "full", "last_layer")
        H = ggn(model, summed(loss_fn), X, y)["full"]
        torch.testing.assert_close(la.curvature.to_dense(), _block(model, H, la.names))
    soft = [(x, torch.softmax(torch.randn(len(x), 3, dtype=torch.float64), 1)) for x, _ in data]
    la = Laplace(net, loss_fn, soft, "diag", "last_layer")
    Xs, ys = torch.cat([x for x, _ in soft]), torch.cat([t for _, t in soft])
    H = ggn(net, summed(loss_fn), Xs, ys)["full"]
    torch.testing.assert_close(la.curvature.to_dense(), torch.diag(torch.diagonal(H)[-15:]))
