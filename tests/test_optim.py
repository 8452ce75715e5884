"""beyondgrad.optim against dense reference implementations written here (float64)."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import beyondgrad as bg
from beyondgrad.optim import KFAC, SINGD, STRUCTURES, SIRFShampoo, structure

torch.set_default_dtype(torch.float64)

# the plain update rules of the papers (the defaults add grafting, warm-up and warm starts)
SINGD_PAPER = dict(grafting=None, normalize_lr_cov=False, warm_start=False, warmup=0)
SIRF_PAPER = dict(grafting=None, warm_start=False, warmup=0, refresh_every=1)


def _data(N: int = 16, D: int = 5, C: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, D, generator=g), torch.randint(0, C, (N,), generator=g)


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.LayerNorm(6), nn.Linear(6, 3))


def _train(opt, model, loss_fn, batches, scaler=None):
    losses = []
    for X, y in batches:
        opt.zero_grad()
        with opt.capture():
            loss = loss_fn(model(X), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _flat_grads(model, names):
    params = dict(model.named_parameters())
    return torch.cat([params[n].grad.reshape(-1) for n in names])


# -- structures ------------------------------------------------------------------------------


def _random_member(s, n, gen):
    return s.project(torch.randn(n, n, generator=gen)) + s.eye(n, torch.float64)


@pytest.mark.parametrize("name", STRUCTURES)
@pytest.mark.parametrize("n", [1, 5, 7])
def test_structure_algebra_matches_dense(name, n):
    s, gen = structure(name), torch.Generator().manual_seed(n)
    assert torch.equal(s.to_dense(s.eye(n, torch.float64), n), torch.eye(n))
    a, b = _random_member(s, n, gen), _random_member(s, n, gen)
    A, B = s.to_dense(a, n), s.to_dense(b, n)
    pattern = s.to_dense(s.project(torch.ones(n, n)), n) != 0
    # the product stays in the pattern: closure, so mul is exact
    assert not (A @ B)[~pattern].abs().gt(1e-12).any()
    torch.testing.assert_close(s.to_dense(s.mul(a, b, n), n), A @ B)
    X = torch.randn(n, 4, generator=gen)
    torch.testing.assert_close(s.matmul(a, X), A @ X)
    torch.testing.assert_close(s.matmul(a, X, transpose=True), A.T @ X)
    S = torch.randn(n, n, generator=gen)
    S = S @ S.T
    P = s.to_dense(s.inner(a, n, S), n)
    torch.testing.assert_close(P, s.to_dense(s.project(A.T @ S @ A), n))
    torch.testing.assert_close(s.to_dense(s.gram(X), n), s.to_dense(s.project(X @ X.T), n))
    torch.testing.assert_close(s.trace(a, n), torch.trace(A))
    # the projection is idempotent and orthogonal (residual orthogonal to the pattern)
    M = torch.randn(n, n, generator=gen)
    proj = s.to_dense(s.project(M), n)
    torch.testing.assert_close(s.to_dense(s.project(proj), n), proj)
    torch.testing.assert_close(((M - proj) * A).sum(), torch.zeros(()), atol=1e-10, rtol=0)


def test_structure_storage_and_names():
    assert structure("diagonal").numel(100) == 100
    assert structure("triltoeplitz").numel(100) == 100
    assert structure("block10diagonal").numel(100) == 1000
    with pytest.raises(ValueError, match="unknown structure"):
        structure("banded")


# -- KFAC ------------------------------------------------------------------------------------


class _Embed(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        return self.out(self.emb(x).mean(1))


def _kfac_cases():
    torch.manual_seed(1)
    conv = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(48, 3))
    convt = nn.Sequential(
        nn.ConvTranspose2d(2, 4, 2, stride=2, groups=2), nn.Flatten(), nn.Linear(64, 3)
    )
    g = torch.Generator().manual_seed(2)
    return {
        "mlp": (_mlp(), *_data()),
        "conv": (
            conv,
            torch.randn(6, 2, 4, 4, generator=g),
            torch.randint(0, 3, (6,), generator=g),
        ),
        "convT": (
            convt,
            torch.randn(5, 2, 2, 2, generator=g),
            torch.randint(0, 3, (5,), generator=g),
        ),
        "embedding": (
            _Embed(),
            torch.randint(0, 7, (6, 5), generator=g),
            torch.randint(0, 3, (6,), generator=g),
        ),
    }


@pytest.mark.parametrize("case", ["mlp", "conv", "convT", "embedding"])
@pytest.mark.parametrize("mode", ["eigen", "pi"])
@pytest.mark.parametrize("fisher", ["type-2", "empirical"])
def test_kfac_step_is_damped_natural_gradient(case, mode, fisher):
    """The empirical Fisher's statistics come from the ordinary backward (no pass of their
    own); the reference factors from ``bg.compute``'s own backward."""
    model, X, y = _kfac_cases()[case]
    loss_fn, lr, damping = nn.CrossEntropyLoss(), 0.3, 0.05
    res = bg.compute(model, loss_fn, X, y, bg.Grad(), bg.KFAC(fisher_type=fisher))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = KFAC(
        model,
        loss_fn,
        lr=lr,
        momentum=0.0,
        damping=damping,
        fisher_type=fisher,
        kl_clip=None,
        damping_mode=mode,
    )
    _train(opt, model, loss_fn, [(X, y)])
    blocks = {
        n: b
        for n, b in res[bg.KFAC(fisher_type=fisher)].items()
        if isinstance(b, bg.KroneckerFactors)
    }
    assert blocks and set(blocks) == set(opt.layers)
    for _name, block in blocks.items():
        names = block.params
        g = torch.cat(
            [_grad_in_block(res.grad[n], block, i) for i, n in enumerate(names)], -1
        ).reshape(-1)
        if mode == "eigen":
            F = block.to_dense() + damping * torch.eye(g.numel())
        else:
            A, B = (
                (block.A if block.A.ndim == 3 else block.A[None]),
                (block.B if block.B.ndim == 3 else block.B[None]),
            )
            pi = (
                (torch.diagonal(A, dim1=1, dim2=2).mean(-1))
                / torch.diagonal(B, dim1=1, dim2=2).mean(-1)
            ).sqrt()
            A = A + (pi * damping**0.5)[:, None, None] * torch.eye(A.shape[-1])
            B = B + (damping**0.5 / pi)[:, None, None] * torch.eye(B.shape[-1])
            first, second = (A, B) if block.order == "A kron B" else (B, A)
            F = torch.block_diag(*(torch.kron(f, s) for f, s in zip(first, second)))
        expected = -lr * torch.linalg.solve(F, g)
        params = dict(model.named_parameters())
        got = torch.cat(
            [_grad_in_block(params[n].detach() - before[n], block, i) for i, n in enumerate(names)],
            -1,
        ).reshape(-1)
        torch.testing.assert_close(got, expected)
    for name, p in model.named_parameters():  # nothing left untrained
        assert not torch.equal(p, before[name]), name


def _grad_in_block(t, block, i):
    """A weight/bias tensor in the block's ``[G, left, right]`` layout (bias: one column)."""
    from beyondgrad.factors import to_block_layout

    G = block.groups
    if i == 1:
        return t.reshape(G, -1, 1)
    return to_block_layout(t[None], None, block.order, block.weight_perm, G)[0]


def test_kfac_ema_refresh_and_kl_clip():
    model, (X, y) = _mlp(), _data(32)
    loss_fn = nn.CrossEntropyLoss()
    opt = KFAC(model, loss_fn, fisher_type="type-2", ema=0.8, refresh_every=2, kl_clip=1e-6)
    batches = [(X[:16], y[:16]), (X[16:], y[16:])]
    stats = []
    for Xb, yb in batches:
        res = bg.compute(model, loss_fn, Xb, yb, bg.KFAC(fisher_type="type-2"))
        stats.append(res[bg.KFAC(fisher_type="type-2")]["3"])
        _train(opt, model, loss_fn, [(Xb, yb)])
        if len(stats) == 1:
            eig_first = opt.layers["3"]["eig"][0].clone()
    A = 0.8 * stats[0].A + 0.2 * stats[1].A
    torch.testing.assert_close(opt.layers["3"]["A"], A)
    torch.testing.assert_close(opt.layers["3"]["B"], 0.8 * stats[0].B + 0.2 * stats[1].B)
    # refresh_every=2: the second step reused the first step's eigendecomposition
    torch.testing.assert_close(opt.layers["3"]["eig"][0], eig_first)
    # the KL clip bounds lr^2 d.g
    p = dict(model.named_parameters())["3.weight"]
    assert opt.state[p]["momentum_buffer"].abs().max() < 1.0


def test_kfac_ema_is_per_step_with_sparse_statistics():
    """With statistics every 2 steps the average decays by ``ema ** 2`` per update (``ema`` is
    the decay per step): ``A = ema^2 A_0 + (1 - ema^2) A_2``."""
    model, loss_fn = _mlp(), nn.CrossEntropyLoss()
    opt = KFAC(model, loss_fn, fisher_type="type-2", ema=0.8, stats_every=2, refresh_every=2)
    quantity = bg.KFAC(fisher_type="type-2")
    stats = []
    for step, (X, y) in enumerate([_data(16, seed=s) for s in range(3)]):
        if step % 2 == 0:
            stats.append(bg.compute(model, loss_fn, X, y, quantity)[quantity]["3"])
        _train(opt, model, loss_fn, [(X, y)])
    decay = 0.8**2
    torch.testing.assert_close(opt.layers["3"]["A"], decay * stats[0].A + (1 - decay) * stats[1].A)
    torch.testing.assert_close(opt.layers["3"]["B"], decay * stats[0].B + (1 - decay) * stats[1].B)


def test_kfac_routes_tied_and_unsupported_to_adamw():
    from beyondgrad.app.tasks import make_problem

    model = make_problem("transformer").model
    opt = KFAC(model, nn.CrossEntropyLoss())
    routes = opt.routes
    tied = [n for n, (t, why) in routes.items() if "tied" in why]
    assert tied and all(routes[n][0] == "adamw" for n in tied)
    assert any(t == "kfac" for t, _ in routes.values())
    assert "adamw" in opt.routing() and "LayerNorm" in opt.routing()


def test_kronecker_sums_are_formed_only_for_the_preconditioned_layers(monkeypatch):
    """The tied output layer goes to the fallback: its Kronecker sums (an output factor
    ``[V, V]``, the costliest of a language model) are not formed at all."""
    from beyondgrad.app.tasks import make_problem
    from beyondgrad.optim import _engine

    formed: list[str] = []
    real = _engine._sample_sums

    def spy(stats, module, quantity, dtype):
        formed.append(module)
        return real(stats, module, quantity, dtype)

    monkeypatch.setattr(_engine, "_sample_sums", spy)
    p, loss_fn = make_problem("transformer"), nn.CrossEntropyLoss()
    opt = KFAC(p.model, loss_fn)
    tied_modules = {n.rsplit(".", 1)[0] for n, (_, why) in opt.routes.items() if "tied" in why}
    _train(opt, p.model, loss_fn, [(p.X, p.y)])
    assert tied_modules and formed
    assert set(formed) == set(opt.layers) and not tied_modules & set(formed)


def test_adamw_fallback_matches_torch_adamw():
    model, (X, y) = _mlp(), _data()
    twin = _mlp()
    loss_fn = nn.CrossEntropyLoss()
    ln = [model[2].weight, model[2].bias]
    opt = KFAC(model, loss_fn, adam_lr=0.01, weight_decay=0.1, adam_betas=(0.8, 0.9))
    ref = torch.optim.AdamW(
        [twin[2].weight, twin[2].bias], lr=0.01, weight_decay=0.1, betas=(0.8, 0.9)
    )
    for step in range(3):
        _train(opt, model, loss_fn, [(X, y)])
        ref.zero_grad()
        loss_fn(twin(X), y).backward()
        ref.step()
        if step == 0:  # identical models, so identical first gradients of the LayerNorm
            torch.testing.assert_close(ln[0], twin[2].weight)
            torch.testing.assert_close(ln[1], twin[2].bias)
    assert not torch.equal(ln[0], torch.ones(6))  # trained


def test_param_group_routed_to_adamw_is_trained():
    model, (X, y) = _mlp(), _data()
    loss_fn = nn.CrossEntropyLoss()
    groups = [
        {"params": list(model[0].parameters()), "precondition": False},
        {"params": list(model[2].parameters()) + list(model[3].parameters())},
    ]
    opt = SINGD(model, loss_fn, groups)
    assert opt.routes["0.weight"] == ("adamw", "its param group has precondition=False")
    assert opt.routes["3.weight"][0] == "singd"
    before = model[0].weight.detach().clone()
    _train(opt, model, loss_fn, [(X, y)] * 2)
    assert not torch.equal(model[0].weight, before)


# -- SINGD -----------------------------------------------------------------------------------


def _singd_dense_reference(
    A, B, G, K, C, mK, mC, damping, alpha1, lr_cov, kfac_like, mask_K=1.0, mask_C=1.0
):
    """One SINGD factor update and direction with dense matrices, written from the paper
    (``mask_K``, ``mask_C``: the structures' patterns, projections by masking)."""
    dk, dc = K.shape[0], C.shape[0]
    HK, HC = mask_K * (K.T @ A @ K), mask_C * (C.T @ B @ C)
    if kfac_like:
        cC = cK = dC = dK = 1.0
    else:
        cC, cK = torch.trace(HC) / dc, torch.trace(HK) / dk
        dC, dK = torch.trace(C.T @ C) / dc, torch.trace(K.T @ K) / dk
    mK = alpha1 * mK + 0.5 * (cC * HK + damping * dC * mask_K * (K.T @ K) - torch.eye(dk))
    mC = alpha1 * mC + 0.5 * (cK * HC + damping * dK * mask_C * (C.T @ C) - torch.eye(dc))
    K, C = K @ (torch.eye(dk) - lr_cov * mK), C @ (torch.eye(dc) - lr_cov * mC)
    return K, C, mK, mC, C @ C.T @ G @ K @ K.T


@pytest.mark.parametrize("kfac_like", [False, True])
def test_singd_dense_matches_reference(kfac_like):
    model = nn.Sequential(nn.Linear(5, 4))
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    X, y = _data(8, 5, 4)
    kw = dict(damping=0.1, alpha1=0.5, lr_cov=0.05, kfac_like=kfac_like)
    opt = SINGD(model, loss_fn, lr=0.1, momentum=0.0, refresh_every=1, fisher_type="type-2", **kw,
                **SINGD_PAPER)  # fmt: skip
    K, C, mK, mC = torch.eye(6), torch.eye(4), torch.zeros(6, 6), torch.zeros(4, 4)
    for _ in range(3):
        res = bg.compute(model, loss_fn, X, y, bg.Grad(), bg.KFAC(fisher_type="type-2"))
        block = res[bg.KFAC(fisher_type="type-2")]["0"]
        G = torch.cat([res.grad["0.weight"], res.grad["0.bias"][:, None]], 1)
        K, C, mK, mC, D = _singd_dense_reference(block.A, block.B, G, K, C, mK, mC, **kw)
        w_before = model[0].weight.detach().clone()
        _train(opt, model, loss_fn, [(X, y)])
        torch.testing.assert_close(opt.layers["0"]["K"], K)
        torch.testing.assert_close(opt.layers["0"]["C"], C)
        torch.testing.assert_close(model[0].weight - w_before, -0.1 * D[:, :-1])


@pytest.mark.parametrize("kfac_like", [False, True])
def test_singd_max_block_matches_block_diagonal_reference(kfac_like):
    """``max_block=4``: the 10-wide K (9 inputs and the bias) becomes three blocks of 4 (the
    last padded), the 6-wide C two blocks of 3, a 3-wide side stays dense; factors and steps
    equal the paper's update with the factors projected onto those block-diagonal patterns."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(9, 6), nn.Tanh(), nn.Linear(6, 3))
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    X, y = _data(16, 9, 3)
    kw = dict(damping=0.1, alpha1=0.5, lr_cov=0.05, kfac_like=kfac_like)
    opt = SINGD(model, loss_fn, lr=0.1, momentum=0.0, refresh_every=1, fisher_type="type-2",
                max_block=4, **kw, **SINGD_PAPER)  # fmt: skip
    assert opt.layers["0"]["structures"] == ("block4diagonal", "block3diagonal")
    assert opt.layers["2"]["structures"] == ("block4diagonal", "dense")  # 7 -> 4 + 3
    masks = {
        "0": (torch.block_diag(*[torch.ones(b, b) for b in (4, 4, 2)]),
              torch.block_diag(torch.ones(3, 3), torch.ones(3, 3))),
        "2": (torch.block_diag(torch.ones(4, 4), torch.ones(3, 3)), torch.ones(3, 3)),
    }  # fmt: skip
    ref = {n: [torch.eye(k), torch.eye(c), torch.zeros(k, k), torch.zeros(c, c)]
           for n, (k, c) in (("0", (10, 6)), ("2", (7, 3)))}  # fmt: skip
    q = bg.KFAC(fisher_type="type-2")
    for _ in range(3):
        res = bg.compute(model, loss_fn, X, y, bg.Grad(), q)
        before = [model[i].weight.detach().clone() for i in (0, 2)]
        steps = {}
        for n in ("0", "2"):
            G = torch.cat([res.grad[f"{n}.weight"], res.grad[f"{n}.bias"][:, None]], 1)
            *ref[n], D = _singd_dense_reference(
                res[q][n].A, res[q][n].B, G, *ref[n], **kw, mask_K=masks[n][0], mask_C=masks[n][1]
            )
            steps[n] = D
        _train(opt, model, loss_fn, [(X, y)])
        for i, n in ((0, "0"), (1, "2")):
            state, (K, C) = opt.layers[n], ref[n][:2]
            sk, sc = (structure(s) for s in state["structures"])
            torch.testing.assert_close(sk.to_dense(state["K"], K.shape[0]), K)
            torch.testing.assert_close(sc.to_dense(state["C"], C.shape[0]), C)
            torch.testing.assert_close(model[2 * i].weight - before[i], -0.1 * steps[n][:, :-1])
    with pytest.raises(ValueError, match="max_block"):
        SINGD(model, loss_fn, max_block=0)


def test_ikfac_fixed_point_is_damped_inverse():
    """With fixed statistics, IKFAC's K K^T converges to (A + damping I)^{-1}."""
    model = nn.Sequential(nn.Linear(3, 2))
    opt = SINGD(
        model, nn.MSELoss(), kfac_like=True, alpha1=0.0, lr_cov=0.2, damping=0.1, **SINGD_PAPER
    )
    state, group = opt.layers["0"], opt.param_groups[0]
    g = torch.Generator().manual_seed(0)
    a = torch.randn(20, 4, generator=g)
    A, B = a.T @ a / 20, torch.tensor([[1.5, 0.2], [0.2, 0.7]])
    s = structure("dense")
    for _ in range(400):
        opt._update_factors(state, group, s, s, A, B)
    K, C = state["K"], state["C"]
    torch.testing.assert_close(
        K @ K.T, torch.linalg.inv(A + 0.1 * torch.eye(4)), atol=1e-6, rtol=1e-6
    )
    torch.testing.assert_close(
        C @ C.T, torch.linalg.inv(B + 0.1 * torch.eye(2)), atol=1e-6, rtol=1e-6
    )


@pytest.mark.parametrize("name", STRUCTURES)
def test_singd_structures_keep_their_pattern_and_train(name):
    model, (X, y) = _mlp(), _data(32)
    loss_fn = nn.CrossEntropyLoss()
    opt = SINGD(model, loss_fn, lr=0.05, refresh_every=1, structures=name, lr_cov=0.1)
    losses = _train(opt, model, loss_fn, [(X, y)] * 15)
    assert losses[-1] < losses[0]
    s = structure(name)
    for state in opt.layers.values():
        for key, dim in (("K", state["dims"][0]), ("C", state["dims"][1])):
            dense = s.to_dense(state[key], dim)
            pattern = s.to_dense(s.project(torch.ones(dim, dim)), dim) != 0
            assert not dense[~pattern].any()
            assert not torch.allclose(dense, torch.eye(dim))  # it was updated


def test_singd_diagonal_uses_less_memory_than_adamw():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    X, y = torch.randn(16, 64), torch.randint(0, 10, (16,))
    loss_fn = nn.CrossEntropyLoss()
    # Adam grafting (the default) keeps a second moment per weight: without it
    singd = SINGD(model, loss_fn, structures="diagonal", momentum=0.9, grafting=None)
    _train(singd, model, loss_fn, [(X, y)])
    adamw = torch.optim.AdamW(model.parameters())
    loss_fn(model(X), y).backward()
    adamw.step()
    adam_bytes = sum(
        t.numel() * t.element_size()
        for s in adamw.state.values()
        for t in s.values()
        if torch.is_tensor(t) and t.ndim
    )
    assert singd.optimizer_state_bytes() < adam_bytes


# -- SIRFShampoo -----------------------------------------------------------------------------


def test_sirfshampoo_matches_dense_reference():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    X, y = _data(10, 4, 3)
    loss_fn = nn.CrossEntropyLoss()
    kw = dict(damping=0.1, alpha2=0.3, lr_cov=0.2)
    opt = SIRFShampoo(model, lr=0.1, momentum=0.0, **kw, **SIRF_PAPER)
    Ks = {"0.weight": [torch.eye(3), torch.eye(4)], "0.bias": [torch.eye(3)]}
    ms = {k: [torch.zeros_like(K) for K in v] for k, v in Ks.items()}
    for _ in range(3):
        model.zero_grad()
        with opt.capture():  # the forward pre-hook counts the batch
            loss = loss_fn(model(X), y)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        expected = {}
        for name, G in grads.items():
            K, m = Ks[name], ms[name]
            Ghat = G * 10**0.5
            for n, Kn in enumerate(K):
                Ghat = torch.movedim(torch.tensordot(Kn.T, Ghat.movedim(n, 0), 1), 0, n)
            dims = G.shape
            total = G.numel()
            newK = []
            for n, Kn in enumerate(K):
                others = 1.0
                for j, Kj in enumerate(K):
                    if j != n:
                        others *= torch.trace(Kj.T @ Kj) / dims[j]
                U = Ghat.movedim(n, 0).reshape(dims[n], -1)
                step = 0.5 * (
                    0.1 * others * Kn.T @ Kn + U @ U.T / (total // dims[n]) - torch.eye(dims[n])
                )
                m[n] = 0.3 * m[n] + 0.7 * step
                newK.append(Kn - 0.2 / max(1.0, float(torch.linalg.matrix_norm(m[n]))) * Kn @ m[n])
            Ks[name] = newK
            D = G
            for n, Kn in enumerate(newK):
                D = torch.movedim(torch.tensordot(Kn @ Kn.T, D.movedim(n, 0), 1), 0, n)
            expected[name] = D
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.step()
        for name, p in model.named_parameters():
            torch.testing.assert_close(p - before[name], -0.1 * expected[name])


def test_sirfshampoo_any_shape_and_big_dims_diagonal():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(12, 3))
    opt = SIRFShampoo(
        model,
        structures={4: ("dense", "diagonal", "dense", "dense"), 2: "triltoeplitz", 1: "dense"},
        max_dense=3,
    )
    assert opt.layers["0.weight"]["structures"] == ("dense", "diagonal", "dense", "dense")
    assert opt.layers["2.weight"]["structures"] == ("triltoeplitz", "diagonal")
    X, y = torch.randn(8, 2, 4, 4), torch.randint(0, 3, (8,))
    losses = _train(opt, model, nn.CrossEntropyLoss(), [(X, y)] * 10)
    assert losses[-1] < losses[0]
    with pytest.raises(ValueError, match="order 4"):
        SIRFShampoo(model, structures={2: "dense"})


# -- the torch shell: resume, accumulation, precision, errors --------------------------------


def _make(kind, model, loss_fn, **kw):
    if kind == "kfac":
        return KFAC(model, loss_fn, fisher_type="mc", refresh_every=2, **kw)
    if kind == "singd":
        return SINGD(
            model,
            loss_fn,
            refresh_every=2,
            structures=("diagonal", "dense"),
            fisher_type="mc",
            **kw,
        )
    if kind == "singd-blocks":  # dense factors wider than 4 block-diagonal (6 -> 3 + 3)
        return SINGD(model, loss_fn, refresh_every=2, fisher_type="mc", max_block=4, **kw)
    return SIRFShampoo(model, refresh_every=2, **kw)


def _scheduled_run(kind, batches, model=None, opt_state=None, sched_state=None):
    """Train on ``batches`` with a StepLR stepped after every step; optionally start from a
    checkpoint (model parameters, optimizer and scheduler states) loaded into fresh objects."""
    loss_fn = nn.CrossEntropyLoss()
    fresh = _mlp(seed=9 if model is not None else 0)
    if model is not None:
        fresh.load_state_dict(model)
    opt = _make(kind, fresh, loss_fn, seed=3)
    sched = torch.optim.lr_scheduler.StepLR(opt, 2, 0.5)
    if opt_state is not None:
        opt.load_state_dict(opt_state)
        sched.load_state_dict(sched_state)
    for X, y in batches:
        _train(opt, fresh, loss_fn, [(X, y)])
        sched.step()
    return fresh, opt, sched


@pytest.mark.parametrize("kind", ["kfac", "singd", "singd-blocks", "sirf"])
def test_resume_with_lr_scheduler_is_bit_identical(kind):
    """Stop after 3 steps, save model, optimizer and scheduler, build everything afresh, load,
    continue: exactly the parameters of the uninterrupted run (the preconditioned layers
    follow the loaded param groups and the scheduler; the fallback too)."""
    batches = [_data(16, seed=s) for s in range(7)]
    straight, _, _ = _scheduled_run(kind, batches)
    model, opt, sched = _scheduled_run(kind, batches[:3])
    buf = io.BytesIO()
    torch.save(
        {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buf
    )
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    resumed, opt2, _ = _scheduled_run(kind, batches[3:], ckpt["model"], ckpt["opt"], ckpt["sched"])
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"] / 4  # the schedule went on
    for (name, p), q in zip(resumed.named_parameters(), straight.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("kind", ["kfac", "singd", "sirf"])
def test_loaded_param_group_settings_reach_preconditioned_layers(kind):
    """After load_state_dict, a changed group setting (here lr = 0) acts on every layer."""
    loss_fn = nn.CrossEntropyLoss()
    X, y = _data()
    model = _mlp()
    opt = _make(kind, model, loss_fn)
    _train(opt, model, loss_fn, [(X, y)])
    fresh = _make(kind, model, loss_fn)
    fresh.load_state_dict(opt.state_dict())
    fresh.param_groups[0]["lr"] = 0.0
    fresh.param_groups[0]["adam_lr"] = 0.0
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train(fresh, model, loss_fn, [(X, y)])
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name


@pytest.mark.parametrize("kind", ["kfac", "singd"])
def test_gradient_accumulation_equals_full_batch(kind):
    loss_fn = nn.CrossEntropyLoss()
    X, y = _data(16)
    model_a, model_b = _mlp(), _mlp()
    opt_a = (
        _make(kind, model_a, loss_fn)
        if kind != "kfac"
        else KFAC(model_a, loss_fn, fisher_type="type-2")
    )
    opt_b = (
        _make(kind, model_b, loss_fn)
        if kind != "kfac"
        else KFAC(model_b, loss_fn, fisher_type="type-2")
    )
    if kind == "singd":
        opt_a = SINGD(model_a, loss_fn, refresh_every=1, fisher_type="type-2")
        opt_b = SINGD(model_b, loss_fn, refresh_every=1, fisher_type="type-2")
    _train(opt_a, model_a, loss_fn, [(X, y)])
    opt_b.zero_grad()
    for half in (slice(0, 8), slice(8, 16)):
        with opt_b.capture():
            loss = loss_fn(model_b(X[half]), y[half]) / 2
        loss.backward()
    opt_b.step()
    for (n, p), q in zip(model_a.named_parameters(), model_b.parameters()):
        torch.testing.assert_close(p, q, msg=n)


@pytest.mark.parametrize("kind", ["singd", "sirf"])
def test_bfloat16_factors_and_autocast_stay_finite(kind):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3)).float()
    X, y = _data(32)
    X = X.float()
    loss_fn = nn.CrossEntropyLoss()
    if kind == "singd":
        opt = SINGD(model, loss_fn, refresh_every=1, lr=0.01, preconditioner_dtype=torch.bfloat16)
    else:
        opt = SIRFShampoo(model, lr=0.01, preconditioner_dtype=torch.bfloat16)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16), opt.capture():
            loss = loss_fn(model(X), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    state = next(iter(opt.layers.values()))
    factor = state["K"][0] if kind == "sirf" else state["K"]
    assert factor.dtype == torch.bfloat16
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


def test_grad_scaler_steps_and_skips_inf():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)).float()
    X, y = _data(8)
    X = X.float()
    loss_fn = nn.CrossEntropyLoss()
    opt = SINGD(model, loss_fn, refresh_every=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    before = model[0].weight.detach().clone()
    for _ in range(2):
        opt.zero_grad()
        with opt.capture():
            loss = loss_fn(model(X), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    assert not torch.equal(model[0].weight, before)
    # an overflowing step is skipped by the scaler, the weights stay
    opt.zero_grad()
    with opt.capture():
        loss = loss_fn(model(X), y)
    scaler.scale(loss * float("inf")).backward()
    w = model[0].weight.detach().clone()
    scaler.step(opt)
    assert torch.equal(model[0].weight, w)


def test_non_finite_gradients_raise_and_keep_state():
    model, (X, y) = _mlp(), _data()
    loss_fn = nn.CrossEntropyLoss()
    opt = KFAC(model, loss_fn)
    _train(opt, model, loss_fn, [(X, y)])
    A = opt.layers["3"]["A"].clone()
    opt.zero_grad()
    with opt.capture():
        loss = loss_fn(model(X), y)
    loss.backward()
    model[3].weight.grad[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"3\.weight"):
        opt.step()
    assert torch.equal(opt.layers["3"]["A"], A)


def test_sirfshampoo_refuses_a_factor_step_that_cannot_shrink():
    """``lr_cov`` in (0, 2): the normalized step ``K (I - lr_cov m / ||m||_F)`` scales a
    factor's dominant direction by ``|1 - lr_cov|`` (kron-lsq at 2.0: the factors grew to 5e15
    and the loss turned NaN after 16k steps)."""
    model = _mlp()
    for bad in (0.0, -0.1, 2.0, 3.0):
        with pytest.raises(ValueError, match=r"lr_cov must be in \(0, 2\)"):
            SIRFShampoo(model, lr_cov=bad)
    opt = SIRFShampoo(model, lr_cov=1.9)
    assert opt.param_groups[0]["lr_cov"] == 1.9
    m = torch.tensor([[1.0, 0.0], [0.0, 0.0]])  # rank-1, unit Frobenius norm
    K = torch.diag(torch.tensor([1e3, 1.0]))
    for lr_cov, shrinks in ((1.9, True), (2.0, False), (2.5, False)):
        scale = float((K @ (torch.eye(2) - lr_cov * m))[0, 0].abs() / K[0, 0])
        assert (scale < 1) == shrinks


def test_errors_are_clear():
    model = _mlp()
    loss_fn = nn.CrossEntropyLoss()
    with pytest.raises(ValueError, match="damping_mode"):
        KFAC(model, loss_fn, damping_mode="tikhonov")
    with pytest.raises(ValueError, match="structure"):
        SINGD(model, loss_fn, structures="banded")
    with pytest.raises(ValueError, match="momentum"):
        SIRFShampoo(model, momentum=1.5)
    with pytest.raises(ValueError, match=r"belong to `model`"):
        KFAC(model, loss_fn, params=[nn.Parameter(torch.zeros(2))])
    opt = KFAC(model, loss_fn)
    X, y = _data()
    loss_fn(model(X), y).backward()  # no capture(): no statistics
    with pytest.raises(RuntimeError, match="capture"):
        opt.step()
    with pytest.raises(ValueError, match="KFAC state_dict"):
        opt.load_state_dict(SINGD(model, loss_fn).state_dict())
    with pytest.raises(RuntimeError, match="loss_fn was not called"), opt.capture():
        model(X)


# -- checkpoints: what load_state_dict keeps and what it refuses -----------------------------


def test_fallback_step_counter_is_not_cast_to_bfloat16():
    """The AdamW counter stays exact after loading into a bfloat16 model (a bf16 counter
    stops at 256: 300 + 1 rounds to 300)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Linear(4, 3)).to(torch.bfloat16)
    X, y = _data(8)
    X = X.to(torch.bfloat16)
    loss_fn = nn.CrossEntropyLoss()
    opt = SINGD(model, loss_fn, refresh_every=1)
    _train(opt, model, loss_fn, [(X, y)])
    sd = opt.state_dict()
    index = [id(p) for g in opt.param_groups for p in g["params"]].index(id(model[1].weight))
    sd["state"][index]["adam_step"] = torch.tensor(300.0, dtype=torch.float64)  # a long run
    fresh = SINGD(model, loss_fn, refresh_every=1)
    fresh.load_state_dict(sd)
    _train(fresh, model, loss_fn, [(X, y)])
    counter = fresh.state[model[1].weight]["adam_step"]
    assert not (torch.is_tensor(counter) and counter.dtype == torch.bfloat16)
    assert int(counter) == 301


@pytest.mark.parametrize("kind", ["kfac", "singd", "sirf"])
def test_load_refuses_a_model_of_other_widths(kind):
    loss_fn = nn.CrossEntropyLoss()
    X, y = _data()
    model = _mlp()
    opt = _make(kind, model, loss_fn)
    _train(opt, model, loss_fn, [(X, y)])
    torch.manual_seed(0)
    wider = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.LayerNorm(7), nn.Linear(7, 3))
    other = _make(kind, wider, loss_fn)
    before = other.state_dict()
    with pytest.raises(ValueError, match=r"another model.*'0\.weight' has shape \[7, 5\]"):
        other.load_state_dict(opt.state_dict())
    assert other.state_dict()["param_groups"] == before["param_groups"]  # nothing loaded
    assert other.steps == 0 and not other.state


@pytest.mark.parametrize("kind", ["kfac", "singd", "sirf"])
def test_routing_is_saved_and_checked_on_load(kind):
    loss_fn = nn.CrossEntropyLoss()
    X, y = _data()
    model = _mlp()
    opt = _make(kind, model, loss_fn)
    _train(opt, model, loss_fn, [(X, y)])
    saved = opt.state_dict()["beyondgrad"]["params"]
    assert [(n, t) for n, _, t, _ in saved] == [(n, opt.routes[n][0]) for n in opt.routes]
    everything_adamw = [{"params": list(model.parameters()), "precondition": False}]
    other = _make(kind, model, loss_fn, params=everything_adamw)
    with pytest.raises(ValueError, match=r"'0\.weight' goes to adamw, in the state_dict to"):
        other.load_state_dict(opt.state_dict())
    with pytest.raises(ValueError, match=r"goes to (kfac|singd|sirfshampoo), in the state_dict"):
        _make(kind, model, loss_fn).load_state_dict(other.state_dict())


class _Unused(nn.Module):
    """``lin`` is never called: no Kronecker statistics, moved to AdamW at step 1."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(5, 3)
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize("kind", ["kfac", "singd"])
def test_layer_moved_to_fallback_in_the_first_step_resumes(kind):
    loss_fn = nn.CrossEntropyLoss()
    batches = [_data(8, seed=s) for s in range(4)]

    def fresh():
        torch.manual_seed(0)
        model = _Unused()
        return model, _make(kind, model, loss_fn)

    model, opt = fresh()
    assert opt.routes["lin.weight"][0] == kind
    _train(opt, model, loss_fn, batches)
    straight = [p.detach().clone() for p in model.parameters()]
    model, opt = fresh()
    _train(opt, model, loss_fn, batches[:2])
    assert opt.routes["lin.weight"] == ("adamw", "no Kronecker statistics in the first step")
    ckpt = {"model": model.state_dict(), "opt": opt.state_dict()}
    model, opt = fresh()
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    assert opt.routes["lin.weight"][0] == "adamw" and "lin" not in opt.layers
    _train(opt, model, loss_fn, batches[2:])
    for p, q in zip(model.parameters(), straight):
        assert torch.equal(p, q)


def _hooks(model):
    return [
        (name, kind)
        for name, m in model.named_modules()
        for kind in ("_forward_pre_hooks", "_forward_hooks", "_backward_hooks")
        if getattr(m, kind)
    ]


@pytest.mark.parametrize("kind", ["kfac", "singd", "sirf"])
def test_no_hook_is_left_on_the_model(kind):
    loss_fn = nn.CrossEntropyLoss()
    X, y = _data()
    model = _mlp()
    opt = _make(kind, model, loss_fn)
    assert _hooks(model) == []
    _train(opt, model, loss_fn, [(X, y)] * 2)
    assert _hooks(model) == []
    with pytest.raises(ZeroDivisionError), opt.capture():
        assert _hooks(model)  # hooks exist while recording
        raise ZeroDivisionError
    assert _hooks(model) == []


@pytest.mark.parametrize("kind", ["kfac", "singd"])
def test_empirical_statistics_come_from_the_ordinary_backward(kind, monkeypatch):
    """No backward pass of their own: gradient accumulation over two blocks, a scaled
    backward (GradScaler-like) and a block without a backward (dropped; a step with no
    backward at all raises) give the factors of the plain engine computation."""
    from beyondgrad.engine.session import Session

    loss_fn, (X, y) = nn.CrossEntropyLoss(), _data(16)
    ref = bg.compute(_mlp(), loss_fn, X, y, bg.KFAC(fisher_type="empirical"))
    ref = ref[bg.KFAC(fisher_type="empirical")]

    def no_own_pass(*args, **kwargs):
        raise AssertionError("the empirical statistics ran a backward pass of their own")

    monkeypatch.setattr(Session, "_first_order_backward", no_own_pass)
    Opt = KFAC if kind == "kfac" else SINGD
    model = _mlp()
    opt = Opt(model, loss_fn, fisher_type="empirical", refresh_every=1)
    opt.zero_grad()
    with opt.capture():  # no backward for this block: its statistics are dropped
        loss_fn(model(X), y)
    for half, scale in ((slice(0, 8), 1.0), (slice(8, 16), 1024.0)):
        with opt.capture():
            loss = loss_fn(model(X[half]), y[half]) / 2
        (scale * loss).backward()
    stats = opt._collect_statistics()
    assert set(stats) == {"0", "3"}
    for name, (A, B) in stats.items():
        torch.testing.assert_close(A, ref[name].A, msg=name)
        torch.testing.assert_close(B, ref[name].B, msg=name)  # per-sample averages
    assert _hooks(model) == []
    opt.zero_grad()
    with opt.capture():
        loss = loss_fn(model(X), y)
    with pytest.raises(RuntimeError, match=r"no loss\.backward"):
        opt.step()


def test_empirical_statistics_edges():
    """A non-finite (skipped) iteration adds no statistics; a finished block lets its graph
    go before the step; ``statistics_from_backward=False`` keeps ``loss_fn``'s
    own gradients when an auxiliary loss is added; ``loss_fn`` twice in a block is refused."""
    import gc
    import weakref

    loss_fn, (X, y) = nn.CrossEntropyLoss(), _data(16)
    q = bg.KFAC(fisher_type="empirical")
    ref = bg.compute(_mlp(), loss_fn, X[8:], y[8:], q)[q]
    model = _mlp()
    opt = KFAC(model, loss_fn, fisher_type="empirical", refresh_every=1)
    with opt.capture():  # an overflowing iteration: its step is skipped (GradScaler)
        loss = loss_fn(model(X[:8]), y[:8])
    (loss * float("inf")).backward()
    assert opt._pending[0].backpropagated and opt._accumulator.calls == 0  # nothing added
    opt.zero_grad()
    with opt.capture():
        loss = loss_fn(model(X[8:]), y[8:])
    loss.backward()
    held = weakref.ref(loss)
    del loss
    gc.collect()
    assert held() is None  # nothing held until the step (gradient accumulation's memory)
    stats = opt._collect_statistics()
    for name, (A, B) in stats.items():
        torch.testing.assert_close(A, ref[name].A)
        torch.testing.assert_close(B, ref[name].B)
    for own, close in ((False, True), (True, False)):
        model = _mlp()
        opt = KFAC(model, loss_fn, fisher_type="empirical", statistics_from_backward=own)
        with opt.capture():
            out = model(X[8:])
            loss = loss_fn(out, y[8:])
        (loss + 10 * out.pow(2).mean()).backward()  # an auxiliary loss
        B = opt._collect_statistics()["3"][1]
        assert torch.allclose(B, ref["3"].B) == close
    with pytest.raises(RuntimeError, match="more than once"), opt.capture():
        loss_fn(model(X), y)
        loss_fn(model(X), y)


@pytest.mark.parametrize("case", ["mlp", "conv", "embedding"])
def test_bfloat16_statistics_approximate_the_exact_factors(case):
    """``statistics_dtype=torch.bfloat16``: the sums from bf16 copies, kept in the gradients'
    dtype, within bf16's rounding of the exact factors (integer embedding inputs stay)."""
    model, X, y = _kfac_cases()[case]
    loss_fn = nn.CrossEntropyLoss()
    ref = bg.compute(model, loss_fn, X, y, bg.KFAC(fisher_type="type-2"))
    ref = ref[bg.KFAC(fisher_type="type-2")]
    opt = KFAC(model, loss_fn, fisher_type="type-2", statistics_dtype=torch.bfloat16)
    with opt.capture():
        loss = loss_fn(model(X), y)
    loss.backward()
    stats = opt._collect_statistics()
    assert stats and set(stats) == set(opt.layers)
    for name, (A, B) in stats.items():
        for got, want in ((A, ref[name].A), (B, ref[name].B)):
            want = want.reshape(got.shape)
            assert got.dtype == want.dtype == next(model.parameters()).dtype
            err = (got - want).abs().max() / want.abs().max()
            assert 0 < err < 2e-2, (name, err)  # rounded, not exact, and close
    with pytest.raises(ValueError, match="statistics_dtype"):
        KFAC(model, loss_fn, statistics_dtype=torch.int32)


def test_statistics_dtype_never_narrows_under_autocast():
    """Under bf16 autocast, ``statistics_dtype=torch.float32`` keeps float32 sums."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3)).float()
    X, y = _data(32)
    loss_fn = nn.CrossEntropyLoss()
    for dtype, want in ((torch.float32, {torch.float32}), (None, {torch.float32, torch.bfloat16})):
        opt = KFAC(model, loss_fn, fisher_type="empirical", statistics_dtype=dtype)
        with torch.autocast("cpu", dtype=torch.bfloat16), opt.capture():
            loss = loss_fn(model(X.float()), y)
        loss.backward()
        got = {t.dtype for pair in opt._collect_statistics().values() for t in pair}
        assert got == want, (dtype, got)


def test_sirfshampoo_factor_update_needs_a_counted_batch():
    model, (X, y) = _mlp(), _data()
    loss_fn = nn.CrossEntropyLoss()
    opt = SIRFShampoo(model)
    loss_fn(model(X), y).backward()  # no capture(): the batch size is unknown
    with pytest.raises(RuntimeError, match="capture"):
        opt.step()


# -- the shared components -------------------------------------------------------------------


def test_moving_averages():
    from beyondgrad.optim.averages import decayed_sum, decayed_sum_, ema_

    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -1.0])
    first = ema_(None, a, 0.9)
    assert torch.equal(first, a) and first is not a  # the first value initializes
    out = ema_(first, b, 0.9)
    assert out is first  # in place
    torch.testing.assert_close(out, 0.9 * a + 0.1 * b)
    torch.testing.assert_close(decayed_sum(a, b, 0.5), 0.5 * a + b)
    torch.testing.assert_close(decayed_sum(a, b, 0.3, 0.7), 0.3 * a + 0.7 * b)
    buf = decayed_sum_(None, a, 0.9)
    assert torch.equal(buf, a)
    assert decayed_sum_(buf, b, 0.9) is buf
    torch.testing.assert_close(buf, 0.9 * a + b)


def test_refresh_schedule_and_deprecated_spellings():
    from beyondgrad.optim.schedule import check_every, is_due

    assert [s for s in range(7) if is_due(s, 3)] == [0, 3, 6]
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="refresh_every"):
            check_every("refresh_every", bad)
    model, loss_fn = _mlp(), nn.CrossEntropyLoss()
    with pytest.warns(DeprecationWarning, match=r"SINGD\(T=...\) is deprecated"):
        opt = SINGD(model, loss_fn, T=3)
    assert opt.param_groups[0]["refresh_every"] == 3
    with pytest.warns(DeprecationWarning, match="SINGD.T is deprecated"):
        assert opt.T == 3
    with pytest.warns(DeprecationWarning, match="SINGD.T is deprecated"):
        opt.T = 6
    assert opt.param_groups[0]["refresh_every"] == 6
    with pytest.warns(DeprecationWarning, match=r"SIRFShampoo\(T=...\)"):
        assert SIRFShampoo(model, T=4).param_groups[0]["refresh_every"] == 4
    with pytest.warns(DeprecationWarning, match="param-group key 'T'"):
        opt = SIRFShampoo(model, [{"params": list(model.parameters()), "T": 5}])
    assert opt.param_groups[0]["refresh_every"] == 5 and "T" not in opt.param_groups[0]
    with (
        pytest.raises(ValueError, match="give refresh_every only"),
        pytest.warns(DeprecationWarning),
    ):
        SINGD(model, loss_fn, T=3, refresh_every=4)
    with pytest.raises(ValueError, match="refresh_every must be a positive int"):
        KFAC(model, loss_fn, refresh_every=0)
    with pytest.warns(DeprecationWarning, match="Structure.apply is deprecated"):
        X = torch.randn(3, 2)
        torch.testing.assert_close(structure("dense").apply(torch.eye(3), X), X)


def test_refresh_every_is_a_param_group_setting():
    """KFAC recomputes each layer's eigenbasis on its own group's schedule."""
    model, loss_fn = _mlp(), nn.CrossEntropyLoss()
    groups = [
        {"params": list(model[0].parameters()), "refresh_every": 1},
        {"params": list(model[2].parameters()) + list(model[3].parameters()), "refresh_every": 3},
    ]
    opt = KFAC(model, loss_fn, groups, fisher_type="type-2")
    eigs = []
    for X, y in [_data(16, seed=s) for s in range(3)]:
        _train(opt, model, loss_fn, [(X, y)])
        eigs.append({n: opt.layers[n]["eig"][0].clone() for n in ("0", "3")})
    assert not torch.equal(eigs[0]["0"], eigs[1]["0"])  # refreshed every step
    assert torch.equal(eigs[0]["3"], eigs[1]["3"]) and torch.equal(eigs[1]["3"], eigs[2]["3"])


def test_kfac_refresh_without_new_statistics_keeps_the_eigenpairs():
    """A refresh due at a step without statistics (refresh_every < stats_every) reuses the
    eigendecomposition (the factors did not change); the next statistics trigger one."""
    model, loss_fn = _mlp(), nn.CrossEntropyLoss()
    opt = KFAC(model, loss_fn, fisher_type="type-2", stats_every=3, refresh_every=1)
    eigs = []
    for X, y in [_data(16, seed=s) for s in range(4)]:
        _train(opt, model, loss_fn, [(X, y)])
        eigs.append(opt.layers["3"]["eig"][1])
    assert eigs[1] is eigs[0] and eigs[2] is eigs[0]  # steps 1, 2: no statistics
    assert eigs[3] is not eigs[0] and not torch.equal(eigs[3], eigs[0])  # step 3: new ones
    A = opt.layers["3"]["A"].double()
    l_a = torch.linalg.eigvalsh(A)
    own = opt.layers["3"]["eig"]  # (B side, A side) for a Linear ("B kron A")
    torch.testing.assert_close(own[2][0].double(), l_a.clamp(min=0), atol=1e-5, rtol=1e-4)


def test_add_param_group_after_construction_is_refused():
    model, loss_fn = _mlp(), nn.CrossEntropyLoss()
    opt = KFAC(model, loss_fn, params=list(model[0].parameters()))
    with pytest.raises(RuntimeError, match="constructor"):
        opt.add_param_group({"params": list(model[3].parameters())})


def test_damping_components_match_dense():
    from beyondgrad.optim.damping import eigen_damped_solve, trace_coupled

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(7, 3, generator=g), torch.randn(7, 2, generator=g)
    A, B = a.T @ a, b.T @ b
    M = torch.randn(2, 3, generator=g)
    la, qa = torch.linalg.eigh(A)
    lb, qb = torch.linalg.eigh(B)
    got = eigen_damped_solve((lb[None], qb[None], la[None], qa[None]), M[None], 0.1)[0]
    F = torch.kron(B, A) + 0.1 * torch.eye(6)  # row-major vec(M): B kron A
    torch.testing.assert_close(got.reshape(-1), torch.linalg.solve(F, M.reshape(-1)))
    assert trace_coupled([2.0, 3.0, 5.0], 0.1) == pytest.approx([1.5, 1.0, 0.6])
    assert trace_coupled([2.0, 3.0], 1.0) == [3.0, 2.0]


def test_clip_scale_matches_definition():
    from beyondgrad.optim.clipping import clip_scale

    g = torch.Generator().manual_seed(0)
    d = [torch.randn(3, generator=g), torch.randn(2, 2, generator=g)]
    gr = [torch.randn(3, generator=g), torch.randn(2, 2, generator=g)]
    lrs = [0.1, 0.2]
    items = list(zip(d, gr, lrs))
    vg = sum(lr**2 * float((x * y).sum()) for x, y, lr in items)
    assert clip_scale(items, 1e-6, None) == pytest.approx(min(1.0, (1e-6 / abs(vg)) ** 0.5))
    assert clip_scale(items, None, None) == 1.0 and clip_scale([], 1e-6, 1e-6) == 1.0
    norm = sum(lr**2 * float(x.square().sum()) for x, _, lr in items) ** 0.5
    assert clip_scale(items, None, norm / 4) == pytest.approx(0.25)
    assert clip_scale(items, None, norm * 2) == 1.0


@pytest.mark.parametrize("kind", ["kfac", "singd", "sirf"])
def test_max_update_norm_caps_every_method(kind):
    model, (X, y) = _mlp(), _data()
    loss_fn = nn.CrossEntropyLoss()
    groups = [{"params": [p for n, p in model.named_parameters() if not n.startswith("2.")]}]
    groups.append({"params": list(model[2].parameters()), "precondition": False})
    opt = _make(kind, model, loss_fn, params=groups, max_update_norm=1e-5, momentum=0.0)
    before = [p.detach().clone() for p in groups[0]["params"]]
    _train(opt, model, loss_fn, [(X, y)])
    step = torch.cat([(p - q).reshape(-1) for p, q in zip(groups[0]["params"], before)])
    torch.testing.assert_close(step.norm(), torch.tensor(1e-5))


def _step_and_record(opt, model, loss_fn, X, y):
    """One step; returns the gradients and the direction ``(p_new - p_old) / -lr``."""
    opt.zero_grad()
    with opt.capture():
        loss = loss_fn(model(X), y)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    lr = opt.param_groups[0]["lr"]
    return grads, {n: (p.detach() - start[n]) / -lr for n, p in model.named_parameters()}


@pytest.mark.parametrize("kind", ["kfac", "singd", "sirf"])
@pytest.mark.parametrize("grafting", ["sgd", "adam"])
def test_grafting_takes_the_norm_of_the_grafted_method(kind, grafting):
    """In the second step every preconditioned parameter moves along the ungrafted direction
    (a twin loaded from the same state with ``grafting=None`` in its param groups) with the
    norm of the grafted method's direction (SGD: the gradient; Adam: bias-corrected RMSprop
    over both steps' gradients)."""
    loss_fn, (X, y) = nn.CrossEntropyLoss(), _data()
    kw = {"momentum": 0.0, "lr": 0.1, "grafting": grafting, "warmup": 0}
    kw |= {"kl_clip": None} if kind == "kfac" else {}
    model = _mlp()
    opt = _make(kind, model, loss_fn, **kw)
    first, _ = _step_and_record(opt, model, loss_fn, X, y)
    twin = _mlp(seed=5)
    twin.load_state_dict(model.state_dict())
    plain_opt = _make(kind, twin, loss_fn, **kw)
    plain_opt.load_state_dict(opt.state_dict())
    for group in plain_opt.param_groups:
        group["grafting"] = None
    grads, steps = _step_and_record(opt, model, loss_fn, X, y)
    _, plain = _step_and_record(plain_opt, twin, loss_fn, X, y)
    beta2, eps = opt.param_groups[0]["adam_betas"][1], opt.param_groups[0]["adam_eps"]
    preconditioned = [n for n, (target, _) in opt.routes.items() if target != "adamw"]
    assert preconditioned
    for name in preconditioned:
        g = grads[name]
        if grafting == "sgd":
            reference = g
        else:
            v = (1 - beta2) * (beta2 * first[name] ** 2 + g**2)
            reference = g / ((v / (1 - beta2**2)).sqrt() + eps)
        d = plain[name]
        assert not torch.allclose(d, reference)  # the preconditioner did something
        torch.testing.assert_close(steps[name], d * reference.norm() / d.norm())


def test_engine_adapter_gives_raw_kronecker_sums():
    """The optimizers read raw sums over samples (the adapter undoes the engine's average)."""
    from beyondgrad.optim._engine import kronecker_quantity, record_kronecker_sums

    model, (X, y) = _mlp(), _data(12)
    loss_fn = nn.CrossEntropyLoss()
    quantity = kronecker_quantity("type-2", "expand", 1)
    with record_kronecker_sums(model, loss_fn, quantity, torch.Generator(), "test") as rec:
        loss_fn(model(X), y)
    blocks = bg.compute(model, loss_fn, X, y, bg.KFAC(fisher_type="type-2"))[
        bg.KFAC(fisher_type="type-2")
    ]
    assert set(rec.sums) == {"0", "3"}
    for name, sums in rec.sums.items():
        assert sums.count == 12
        torch.testing.assert_close(sums.A, blocks[name].A * 12)
        torch.testing.assert_close(sums.B, blocks[name].B * 12)
    with pytest.raises(ValueError, match="forward-only"):
        kronecker_quantity("forward-only", "expand", 1)


def _as_older_format(sd, kind):
    """A state_dict as the previous version wrote it: no signature, tensor step counters,
    no refresh_every/grafting group keys (SIRFShampoo: a per-group T), fewer layer keys."""
    sd = {**sd, "beyondgrad": dict(sd["beyondgrad"])}
    extra = sd["beyondgrad"]
    del extra["params"]
    for state in extra["layers"].values():
        state.pop("structures" if kind == "singd" else "", None)
        if kind == "sirf":
            del state["params"]
    for group in sd["param_groups"]:
        every = group.pop("refresh_every")
        del group["grafting"]
        if kind == "sirf":
            group["T"] = every
    for state in sd["state"].values():
        if "adam_step" in state:
            state["adam_step"] = torch.tensor(float(state["adam_step"]), dtype=torch.float64)
    return sd


@pytest.mark.parametrize("kind", ["kfac", "singd", "sirf"])
def test_older_state_dicts_still_load_and_resume(kind):
    loss_fn = nn.CrossEntropyLoss()
    batches = [_data(16, seed=s) for s in range(4)]
    model = _mlp()
    _train(_make(kind, model, loss_fn), model, loss_fn, batches)
    model2 = _mlp()
    opt = _make(kind, model2, loss_fn)
    _train(opt, model2, loss_fn, batches[:2])
    fresh = _make(kind, model2, loss_fn)
    fresh.load_state_dict(_as_older_format(opt.state_dict(), kind))
    _train(fresh, model2, loss_fn, batches[2:])
    for p, q in zip(model2.parameters(), model.parameters()):
        assert torch.equal(p, q)
    wider = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.LayerNorm(7), nn.Linear(7, 3))
    with pytest.raises(ValueError, match="another model"):
        _make(kind, wider, loss_fn).load_state_dict(_as_older_format(opt.state_dict(), kind))


# -- Hugging Face Conv1D (a transposed Linear, weight [in, out]) -----------------------------


def _conv1d_twins():
    """A model with a Hugging Face ``Conv1D`` and its twin with the equivalent ``nn.Linear``."""
    conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D
    torch.manual_seed(0)
    linear = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    hf = nn.Sequential(conv1d(6, 5), nn.Tanh(), nn.Linear(6, 3))
    with torch.no_grad():
        hf[0].weight.copy_(linear[0].weight.T)
        hf[0].bias.copy_(linear[0].bias)
        hf[2].load_state_dict(linear[2].state_dict())
    return linear, hf


@pytest.mark.parametrize("kind", ["kfac", "singd", "sirf"])
def test_conv1d_is_preconditioned_like_its_linear_twin(kind):
    """Conv1D weights go to the method (not AdamW) and get exactly the transposed update of
    the equivalent Linear layer (whose update is checked against the dense references)."""
    linear, hf = _conv1d_twins()
    loss_fn = nn.CrossEntropyLoss()
    opts = [_make(kind, m, loss_fn) for m in (linear, hf)]
    assert opts[1].routes["0.weight"][0] == opts[1].method, opts[1].routing()
    for X, y in [_data(12, seed=s) for s in range(3)]:
        for opt, model in zip(opts, (linear, hf)):
            _train(opt, model, loss_fn, [(X, y)])
    torch.testing.assert_close(hf[0].weight, linear[0].weight.T)
    torch.testing.assert_close(hf[0].bias, linear[0].bias)
    torch.testing.assert_close(hf[2].weight, linear[2].weight)


def test_singd_conv1d_matches_dense_reference():
    """SINGD on a Conv1D: the paper's update with ``G`` the transposed weight gradient."""
    conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D
    torch.manual_seed(0)
    model = nn.Sequential(conv1d(4, 5))
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    X, y = _data(8, 5, 4)
    kw = dict(damping=0.1, alpha1=0.5, lr_cov=0.05, kfac_like=False)
    opt = SINGD(model, loss_fn, lr=0.1, momentum=0.0, refresh_every=1, fisher_type="type-2", **kw,
                **SINGD_PAPER)  # fmt: skip
    assert opt.routes["0.weight"][0] == "singd"
    K, C, mK, mC = torch.eye(6), torch.eye(4), torch.zeros(6, 6), torch.zeros(4, 4)
    for _ in range(2):
        res = bg.compute(model, loss_fn, X, y, bg.Grad(), bg.KFAC(fisher_type="type-2"))
        block = res[bg.KFAC(fisher_type="type-2")]["0"]
        G = torch.cat([res.grad["0.weight"].T, res.grad["0.bias"][:, None]], 1)
        K, C, mK, mC, D = _singd_dense_reference(block.A, block.B, G, K, C, mK, mC, **kw)
        w_before = model[0].weight.detach().clone()
        _train(opt, model, loss_fn, [(X, y)])
        torch.testing.assert_close(opt.layers["0"]["K"], K)
        torch.testing.assert_close(opt.layers["0"]["C"], C)
        torch.testing.assert_close(model[0].weight - w_before, -0.1 * D[:, :-1].T)


@pytest.mark.parametrize("groups", [2, 4])
def test_singd_grouped_conv_matches_dense_reference_per_group(groups):
    """SINGD on a grouped (``groups=4``: depthwise) convolution: each group's ``[W_g | b_g]``
    follows the paper's dense update with its own factors and its group's statistics."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=groups), nn.Flatten())
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    g = torch.Generator().manual_seed(3)
    X, y = torch.randn(8, 4, 3, 3, generator=g), torch.randint(0, 4, (8,), generator=g)
    kw = dict(damping=0.1, alpha1=0.5, lr_cov=0.05, kfac_like=False)
    opt = SINGD(model, loss_fn, lr=0.1, momentum=0.0, refresh_every=1, fisher_type="type-2", **kw,
                **SINGD_PAPER)  # fmt: skip
    assert opt.routes["0.weight"][0] == "singd"
    O, dk = 4 // groups, 4 // groups * 9 + 1
    refs = [[torch.eye(dk), torch.eye(O), torch.zeros(dk, dk), torch.zeros(O, O)]] * groups
    for _ in range(2):
        q = bg.KFAC(fisher_type="type-2")
        res = bg.compute(model, loss_fn, X, y, bg.Grad(), q)
        block = res[q]["0"]
        assert block.A.shape == (groups, dk, dk)
        Gw, Gb = res.grad["0.weight"].reshape(4, -1), res.grad["0.bias"]
        w_before = model[0].weight.detach().clone()
        _train(opt, model, loss_fn, [(X, y)])
        step = (model[0].weight - w_before).reshape(4, -1)
        for k in range(groups):
            rows = slice(k * O, (k + 1) * O)
            G = torch.cat([Gw[rows], Gb[rows, None]], 1)
            *refs[k], D = _singd_dense_reference(block.A[k], block.B[k], G, *refs[k], **kw)
            torch.testing.assert_close(opt.layers["0"]["K"][k], refs[k][0])
            torch.testing.assert_close(opt.layers["0"]["C"][k], refs[k][1])
            torch.testing.assert_close(step[rows], -0.1 * D[:, :-1])


# -- the defaults train every built-in task ---------------------------------------------------


@pytest.mark.parametrize("kind", ["kfac", "singd", "sirf"])
def test_library_defaults_train_every_builtin_task(kind):
    """At the library defaults (no argument but model and loss), a few steps of the README's
    loop lower the loss of the quick trainable tasks of ``beyondgrad.app.tasks`` (on a fixed
    batch) by at least 3% (KFAC on ``kron-lsq`` is the slow one: its ``kl_clip`` bounds the
    step in units of the loss, ~4e3 there), with finite parameters throughout."""
    tasks = pytest.importorskip("beyondgrad.app.tasks")
    pytest.importorskip("sklearn")
    torch.set_default_dtype(torch.float32)
    try:
        # the seconds-scale tasks and the deep autoencoder (cheap steps); char-gpt and
        # digits-resnet take ~0.2 s per step: the slow test_every_task_trains_at_the_defaults
        for name in (*tasks.SMALL_TASKS, "autoencoder"):
            task = tasks.make_task(name, 0)
            model, loss_fn = task.model, task.loss_fn
            opt = {"kfac": KFAC, "singd": SINGD}[kind](model, loss_fn) if kind != "sirf" else (
                SIRFShampoo(model)
            )  # fmt: skip
            fixed = task.problem(256)
            with torch.no_grad():
                before = float(loss_fn(model(fixed.X), fixed.y))
            for _, (X, y) in zip(range(16), task.batches(0)):
                _train(opt, model, loss_fn, [(X, y)])
                assert all(torch.isfinite(p).all() for p in model.parameters()), name
            with torch.no_grad():
                after = float(loss_fn(model(fixed.X), fixed.y))
            assert after < 0.97 * before, (name, before, after)
    finally:
        torch.set_default_dtype(torch.float64)


@pytest.mark.parametrize("mode", ["eigen", "pi"])
def test_kfac_batches_layers_of_one_shape_exactly(mode):
    """Three Linear layers of one shape share one batched eigh and one batched solve (their
    eigenpairs are views of one stack); each update is still the damped natural gradient."""
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Linear(4, 3)
    )
    X, y = _data(10, 4, 3)
    loss_fn, lr, damping = nn.CrossEntropyLoss(), 0.2, 0.03
    quantity = bg.KFAC(fisher_type="type-2")
    res = bg.compute(model, loss_fn, X, y, bg.Grad(), quantity)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = KFAC(model, loss_fn, lr=lr, momentum=0.0, damping=damping, fisher_type="type-2",
               kl_clip=None, damping_mode=mode)  # fmt: skip
    _train(opt, model, loss_fn, [(X, y)])
    bases = {opt.layers[n]["eig"][1]._base for n in ("0", "2", "4")}
    assert len(bases) == 1 and None not in bases  # one stack for the three
    for name in ("0", "2", "4", "5"):
        block = res[quantity][name]
        g = torch.cat([res.grad[f"{name}.weight"], res.grad[f"{name}.bias"][:, None]], 1)
        if mode == "eigen":
            F = torch.kron(block.B, block.A) + damping * torch.eye(g.numel())
        else:
            pi = ((torch.diagonal(block.A).mean()) / torch.diagonal(block.B).mean()).sqrt()
            F = torch.kron(
                block.B + damping**0.5 / pi * torch.eye(block.B.shape[0]),
                block.A + pi * damping**0.5 * torch.eye(block.A.shape[0]),
            )
        step = torch.linalg.solve(F, g.reshape(-1)).reshape(g.shape) * -lr
        params = dict(model.named_parameters())
        torch.testing.assert_close(
            params[f"{name}.weight"] - before[f"{name}.weight"], step[:, :-1]
        )
        torch.testing.assert_close(params[f"{name}.bias"] - before[f"{name}.bias"], step[:, -1])


@pytest.mark.parametrize("kind", ["kfac", "singd", "sirf"])
def test_compiled_update_equals_eager(kind):
    """``compile_update`` (here the ``eager`` backend: graph capture without code generation)
    gives the parameters of the uncompiled optimizer; off by default."""
    loss_fn, batches = nn.CrossEntropyLoss(), [_data(16, seed=s) for s in range(3)]
    models = [_mlp(), _mlp()]
    opts = [_make(kind, m, loss_fn, compile_update=c) for m, c in zip(models, (False, "eager"))]
    assert _make(kind, _mlp(), loss_fn).compile_update is False
    for opt, model in zip(opts, models):
        _train(opt, model, loss_fn, batches)
    for p, q in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(p, q)
    with pytest.raises(ValueError, match="compile_update"):
        _make(kind, _mlp(), loss_fn, compile_update=1)


@pytest.mark.parametrize("max_block", [None, 3])
def test_singd_batches_dense_layers_of_one_shape(max_block):
    """Three Linear layers of one shape keep their dense (or block-diagonal: ``max_block=3``)
    factors as views of one stack and are preconditioned in one batched product: the same
    parameters as one by one."""

    loss_fn = nn.CrossEntropyLoss()

    def model_and_opt(batched):
        torch.manual_seed(4)
        model = nn.Sequential(
            nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Linear(4, 3)
        )
        opt = SINGD(model, loss_fn, refresh_every=1, lr=0.05, max_block=max_block)
        if not batched:  # break the stacks: every layer alone
            for state in opt.layers.values():
                state["K"], state["C"] = state["K"].clone(), state["C"].clone()
        return model, opt

    (batched, opt), (alone, opt_alone) = model_and_opt(True), model_and_opt(False)
    assert len({opt.layers[n]["K"]._base for n in ("0", "2", "4")}) == 1
    blocked = ("block3diagonal", "block2diagonal")
    assert opt.layers["0"]["structures"] == (blocked if max_block else ("dense", "dense"))
    assert opt.layers["0"]["K"]._base is not None and opt.layers["5"]["K"]._base is None
    batches = [_data(16, 4, 3, seed=s) for s in range(4)]
    _train(opt, batched, loss_fn, batches)
    _train(opt_alone, alone, loss_fn, batches)
    assert opt.layers["2"]["K"]._base is not None  # the factor updates kept the views
    for p, q in zip(batched.parameters(), alone.parameters()):
        torch.testing.assert_close(p, q)


def test_kfac_pi_inverse_by_cholesky_and_its_eigen_fallback(monkeypatch):
    """Pi damping keeps each side's damped inverse from a Cholesky factorization (marked by
    the values EXPLICIT_INVERSE); where that fails the eigendecomposition gives the same steps."""
    import beyondgrad.optim.kfac as kfac_module

    X, y = _data(32)
    batches = [(X[:16], y[:16]), (X[16:], y[16:]), (X[:16], y[:16])]

    def run():
        model, loss_fn = _mlp().double(), nn.CrossEntropyLoss()
        opt = KFAC(model, loss_fn, lr=0.2, damping=0.03, damping_mode="pi", refresh_every=1,
                   kl_clip=None)  # fmt: skip
        _train(opt, model, loss_fn, [(a.double(), b) for a, b in batches])
        return model, opt

    model, opt = run()
    state = opt.layers["0"]  # gradient [6, 5 + bias] = B-side rows, A-side columns
    assert state["order"] == "B kron A"
    for values in state["eig"][0::2]:
        assert bool((values == kfac_module.EXPLICIT_INVERSE).all())
    A, B = state["A"], state["B"]
    pi = (torch.diagonal(A).mean() / torch.diagonal(B).mean()).sqrt()
    eye = torch.eye(6, dtype=torch.float64)
    torch.testing.assert_close(state["eig"][3][0], torch.linalg.inv(A + pi * 0.03**0.5 * eye))
    torch.testing.assert_close(state["eig"][1][0], torch.linalg.inv(B + 0.03**0.5 / pi * eye))

    real_cholesky = torch.linalg.cholesky_ex

    def failing(M):
        chol, info = real_cholesky(M)
        return chol, torch.ones_like(info)

    monkeypatch.setattr(kfac_module.torch.linalg, "cholesky_ex", failing)
    fallback_model, fallback_opt = run()
    assert bool((fallback_opt.layers["0"]["eig"][0] > 0).all())  # eigenvalues this time
    for p, q in zip(model.parameters(), fallback_model.parameters(), strict=True):
        torch.testing.assert_close(p, q)


def test_layers_with_too_wide_factors_go_to_the_fallback_and_train():
    from beyondgrad.optim import KFACAdam

    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 4), nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 40))
    loss_fn = nn.CrossEntropyLoss()
    X, y = torch.randint(0, 50, (8,)), torch.randint(0, 40, (8,))
    opt = KFAC(model, loss_fn, max_factor_dim=32)
    assert set(opt.layers) == {"1"}  # 50 (embedding rows) and 40 (outputs) are wider than 32
    for name in ("0.weight", "3.weight", "3.bias"):
        target, why = opt.routes[name]
        assert target == "adamw" and "max_factor_dim=32" in why
    assert "up to 50 x 50" in opt.routes["0.weight"][1]
    before = model[3].weight.detach().clone()
    _train(opt, model, loss_fn, [(X, y)])
    assert not torch.equal(before, model[3].weight)  # the fallback trains it
    assert set(KFAC(model, loss_fn, max_factor_dim=None).layers) == {"0", "1", "3"}
    assert set(KFACAdam(model, loss_fn, max_factor_dim=40).layers) == {"1", "3"}
    for bad in (0, -3, 2.5, True, "64"):
        with pytest.raises(ValueError, match="max_factor_dim"):
            KFAC(model, loss_fn, max_factor_dim=bad)
