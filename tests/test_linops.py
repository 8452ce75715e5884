"""Data-set curvature operators against dense float64 matrices (torch.func Hessians, J^T H J,
per-sample gradients), normalization over uneven batches, composition, SciPy export, and the
matrix-free algorithms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import beyondgrad as bg
from beyondgrad import linalg
from beyondgrad.linops import GGN, Diagonal, EmpiricalFisher, Fisher, Hessian
from models import CASES
from oracles.curvature import ggn
from oracles.first_order import call, per_sample_grads


def dense_hessian(model, loss_fn, X, y):
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    flat = torch.cat([p.detach().reshape(-1) for _, p in named])

    def f(theta):
        params, start = {}, 0
        for n, p in named:
            params[n] = theta[start : start + p.numel()].view(p.shape)
            start += p.numel()
        return loss_fn(call(model, params, X), y)

    # reverse-over-reverse: torch.func.hessian (forward-over-reverse) is wrong for LayerNorm
    # weights in current torch; fused attention has no double backward (math kernel instead)
    with sdpa_kernel([SDPBackend.MATH]):
        try:
            return torch.autograd.functional.hessian(f, flat, vectorize=True)
        except RuntimeError:  # an op without vmap support: one backward per row
            return torch.autograd.functional.hessian(f, flat)


def batches(X, y, sizes):
    out, start = [], 0
    for s in sizes:
        sl = slice(start, start + s)
        Xb = (
            {k: {kk: vv[sl] for kk, vv in v.items()} for k, v in X.items()}
            if isinstance(X, dict)
            else (tuple(t[sl] for t in X) if isinstance(X, tuple) else X[sl])
        )
        out.append((Xb, y[sl]))
        start += s
    return out


@pytest.mark.parametrize("case", ["mlp", "gpt", "resnet", "two_inputs"])
def test_hessian_and_ggn_operators_match_dense(case):
    model, X, y, loss_fn = CASES[case]()
    data = batches(X, y, [3, 2])  # uneven batches: the full-batch matrices
    H = Hessian(model, loss_fn, data)
    torch.testing.assert_close(
        H.to_dense(), dense_hessian(model, loss_fn, X, y), rtol=1e-8, atol=1e-10
    )
    G = GGN(model, loss_fn, data)
    torch.testing.assert_close(
        G.to_dense(), ggn(model, loss_fn, X, y)["full"], rtol=1e-8, atol=1e-10
    )
    v = torch.randn(H.shape[0], dtype=torch.float64)
    torch.testing.assert_close(H @ v, H @ v.unsqueeze(1).squeeze(1))


def test_layernorm_hessian_products_are_right():
    """jvp(jacrev) is wrong for LayerNorm weights in current torch; double backward is not."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)).double()
    X, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    H = Hessian(model, nn.MSELoss(), [(X, y)])
    torch.testing.assert_close(H.to_dense(), dense_hessian(model, nn.MSELoss(), X, y))


def test_empirical_fisher_fisher_and_sum_reduction():
    model, X, y, loss_fn = CASES["mlp"]()
    data = batches(X, y, [2, 2, 1])
    EF = EmpiricalFisher(model, loss_fn, data)
    g = per_sample_grads(model, loss_fn, X, y)
    G = torch.cat([g[n].reshape(g[n].shape[0], -1) for n, _ in model.named_parameters()], 1)
    N = X.shape[0]
    torch.testing.assert_close(EF.to_dense(), G.T @ G * N)  # R_D sum grad l grad l^T, grad l = N g
    ref = ggn(model, loss_fn, X, y)["full"]
    F = Fisher(
        model, loss_fn, [(X, y)], mc_samples=3000, generator=torch.Generator().manual_seed(0)
    )
    err = (F.to_dense() - ref).norm() / ref.norm()
    assert err < 0.1, err
    sum_loss = nn.CrossEntropyLoss(reduction="sum")
    torch.testing.assert_close(
        GGN(model, sum_loss, data).to_dense(), ggn(model, sum_loss, X, y)["full"]
    )


class _SplitWeight(nn.Module):
    """``W = base + delta``: autograd gives both parameters one and the same gradient tensor."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(4)
        self.base = nn.Parameter(torch.randn(3, 4, generator=g, dtype=torch.float64))
        self.delta = nn.Parameter(0.1 * torch.randn(3, 4, generator=g, dtype=torch.float64))

    def forward(self, x):
        return nn.functional.linear(torch.tanh(x), self.base + self.delta)


def test_parameter_layout_products_of_parameters_sharing_one_gradient():
    """Two parameters whose products are one tensor are summed over batches separately."""
    model = _SplitWeight().eval()
    X = torch.randn(5, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    y = torch.tensor([0, 2, 1, 1, 0])
    data = batches(X, y, [3, 2])
    for cls in (Hessian, GGN, EmpiricalFisher):
        A = cls(model, nn.CrossEntropyLoss(), data)
        V = torch.randn(A.shape[1], 2, dtype=torch.float64)
        got = A @ [t.contiguous() for t in A.split(V)]
        torch.testing.assert_close(got, [t.contiguous() for t in A.split(A.to_dense() @ V)])
        assert got[0].data_ptr() != got[1].data_ptr()


class _SummedShift(nn.Module):
    """``x + p.sum()``: autograd's gradient of ``p`` is an expanded (stride-0) tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.linspace(0.1, 0.4, 4, dtype=torch.float64))

    def forward(self, x):
        return x + self.p.sum()


@pytest.mark.parametrize("case", ["mlp", "gpt", "resnet"])
def test_products_in_the_parameters_layout_equal_the_dense_matrix(case):
    """Lists, tuples and dicts of ``[*shape]`` / ``[k, *shape]`` tensors give the dense
    matrix's products in the same layout (uneven batches: weights != 1, sums in place)."""
    model, X, y, loss_fn = CASES[case]()
    if case == "mlp":
        model = nn.Sequential(model, _SummedShift())
    data = batches(X, y, [3, 2])
    g = torch.Generator().manual_seed(1)
    for cls in (Hessian, GGN, EmpiricalFisher):
        A = cls(model, loss_fn, data)
        dense = A.to_dense()
        V = torch.randn(A.shape[1], 3, generator=g, dtype=torch.float64)
        want = [t.contiguous() for t in A.split(dense @ V)]
        parts = [t.contiguous() for t in A.split(V)]
        got = A @ parts
        assert isinstance(got, list) and len(got) == len(parts)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)
        got = A @ dict(zip(A.names, parts))
        assert list(got) == A.names
        torch.testing.assert_close(list(got.values()), want, rtol=1e-9, atol=1e-11)
        single = A @ tuple(t[1] for t in parts)  # one vector: parameter-shaped tensors
        assert isinstance(single, tuple)
        torch.testing.assert_close(list(single), [t[1] for t in want], rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(
            torch.cat([t.reshape(-1) for t in single]), dense @ V[:, 1], rtol=1e-9, atol=1e-11
        )


def test_fisher_products_in_the_parameters_layout_and_bad_vectors():
    model, X, y, loss_fn = CASES["mlp"]()
    data = batches(X, y, [3, 2])
    F = Fisher(model, loss_fn, data, generator=torch.Generator().manual_seed(0))
    V = torch.randn(F.shape[1], 2, dtype=torch.float64)
    torch.testing.assert_close(
        F @ [t.contiguous() for t in F.split(V)], [t.contiguous() for t in F.split(F @ V)]
    )
    parts = [t.contiguous() for t in F.split(V)]
    with pytest.raises(ValueError, match=f"expected {len(parts)} tensors"):
        F @ parts[:-1]
    with pytest.raises(ValueError, match=r"0.weight: expected a tensor of shape \(2, "):
        F @ [parts[0][:, :1], *parts[1:]]
    with pytest.raises(TypeError, match="tensors only"):
        F @ [p.tolist() for p in parts]
    with pytest.raises(KeyError, match=rf"missing \['{F.names[-1]}'\], unknown \['x'\]"):
        F @ {**dict(zip(F.names[:-1], parts)), "x": parts[-1]}
    shuffled = [data[1], data[0]]
    data[:] = shuffled  # the MC labels were fixed for the first order
    with pytest.raises(RuntimeError, match="fixed order"):
        F @ parts


def test_kfac_operators_and_composites_with_the_parameters_layout():
    """KFAC/EKFAC take the parameters' layout too (packed and split); operators that know no
    parameters refuse it with a TypeError naming the ones that do."""
    model, X, y, loss_fn = CASES["mlp"]()
    data = batches(X, y, [3, 2])
    g = torch.Generator().manual_seed(3)
    for cls in (bg.linops.KFAC, bg.linops.EKFAC):
        A = cls(model, loss_fn, data, fisher_type="type-2")
        shapes = dict(model.named_parameters())
        V = torch.randn(A.shape[1], 2, generator=g, dtype=torch.float64)
        sizes = [shapes[n].numel() for n in A.names]
        parts = [b.T.reshape(2, *shapes[n].shape) for b, n in zip(torch.split(V, sizes), A.names)]
        want = [
            b.T.reshape(2, *shapes[n].shape)
            for b, n in zip(torch.split(A.to_dense() @ V, sizes), A.names)
        ]
        got = A @ {n: t for n, t in zip(A.names, parts)}
        torch.testing.assert_close(list(got.values()), want)
        single = A @ tuple(t[0] for t in parts)
        torch.testing.assert_close(list(single), [t[0] for t in want])
    with pytest.raises(TypeError, match="acts on flat vectors"):
        (2.0 * A) @ parts


def test_parameter_subsets_composition_and_scipy():
    model, X, y, loss_fn = CASES["mlp"]()
    data = [(X, y)]
    H = Hessian(model, loss_fn, data, params=["2.weight", "2.bias"])
    full = dense_hessian(model, loss_fn, X, y)
    names = [n for n, _ in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    start = sum(sizes[: names.index("2.weight")])
    block = full[start : start + sizes[2] + sizes[3], start : start + sizes[2] + sizes[3]]
    torch.testing.assert_close(H.to_dense(), block)
    G = GGN(model, loss_fn, data, params=["2.weight", "2.bias"])
    combo = 2.0 * H - G + H @ G
    Hd, Gd = H.to_dense(), G.to_dense()
    torch.testing.assert_close(combo.to_dense(), 2 * Hd - Gd + Hd @ Gd)
    torch.testing.assert_close((H @ G).T.to_dense(), (Hd @ Gd).T)
    sp = H.to_scipy()
    v = np.random.default_rng(0).standard_normal(H.shape[0])
    np.testing.assert_allclose(sp @ v, (Hd @ torch.from_numpy(v)).numpy(), rtol=1e-10)
    with pytest.raises(KeyError, match="unknown"):
        Hessian(model, loss_fn, data, params=["nope"])


def test_diagonal_operator_from_engine():
    model, X, y, loss_fn = CASES["mlp"]()
    D = Diagonal.from_engine(model, loss_fn, batches(X, y, [3, 2]), bg.DiagGGN())
    ref = torch.diagonal(ggn(model, loss_fn, X, y)["full"])
    torch.testing.assert_close(D.values, ref)
    torch.testing.assert_close(D.trace(), ref.sum())
    torch.testing.assert_close(D.inverse(0.5) @ ref, ref / (ref + 0.5))
    torch.testing.assert_close(D.logdet(0.5), (ref + 0.5).log().sum())


def test_algorithms_on_curvature_operators():
    model, X, y, loss_fn = CASES["mlp"]()
    H = Hessian(model, loss_fn, [(X, y)])
    dense = H.to_dense()
    lam = torch.linalg.eigvalsh(dense)
    top, vec = linalg.eigsh(H, 2, tol=1e-10, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(top, lam.flip(0)[:2], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(dense @ vec, vec * top, rtol=1e-5, atol=1e-7)
    low, _ = linalg.eigsh(
        H, 1, which="smallest", tol=1e-10, generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(low, lam[:1], rtol=1e-6, atol=1e-9)
    b = torch.randn(H.shape[0], dtype=torch.float64)
    x = linalg.solve(H, b, method="minres", damping=0.1)
    torch.testing.assert_close(dense @ x + 0.1 * x, b, rtol=1e-6, atol=1e-8)
    G = GGN(model, loss_fn, [(X, y)])
    x = linalg.solve(G, b, method="cg", damping=0.1)
    torch.testing.assert_close(G.to_dense() @ x + 0.1 * x, b, rtol=1e-6, atol=1e-8)
    exact = torch.trace(G.to_dense())
    errors = []
    for m in (6, 60):
        est, _ = linalg.trace(G, m, method="hutch++", generator=torch.Generator().manual_seed(2))
        errors.append(float((est - exact).abs() / exact))
    assert errors[1] < errors[0] and errors[1] < 0.05, errors
    d = linalg.diagonal(G, 2000, generator=torch.Generator().manual_seed(3))
    ref = torch.diagonal(G.to_dense())
    assert (d - ref).norm() / ref.norm() < 0.2
    # the GGN of N samples with C outputs has rank <= N C: XTrace / XDiag are exact beyond
    rank = int(torch.linalg.matrix_rank(G.to_dense()))
    budget = 2 * (rank + 1)
    est, err = linalg.trace(G, budget, method="xtrace", generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(est, exact)
    assert float(err) < 1e-8 * float(exact)
    dx = linalg.diagonal(G, budget, method="xdiag", generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(dx, ref)


def _decaying(n: int = 50, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return U @ torch.diag(torch.logspace(0, -3, n, dtype=torch.float64)) @ U.T


def test_xtrace_and_xdiag_converge_with_the_budget():
    A = _decaying()
    exact_t, exact_d = torch.trace(A), torch.diagonal(A)
    trace_err, diag_err, reported = [], [], []
    for m in (8, 24, 60):
        t_errs, d_errs, r = [], [], []
        for seed in range(10):
            est, err = linalg.trace(
                A, m, method="xtrace", generator=torch.Generator().manual_seed(seed)
            )
            d = linalg.diagonal(A, m, method="xdiag", generator=torch.Generator().manual_seed(seed))
            t_errs.append(float((est - exact_t).abs() / exact_t))
            d_errs.append(float((d - exact_d).norm() / exact_d.norm()))
            r.append(float(err / exact_t))
        trace_err.append(sum(t_errs) / 10)
        diag_err.append(sum(d_errs) / 10)
        reported.append(sum(r) / 10)
    assert trace_err[0] > trace_err[1] > trace_err[2], trace_err
    assert diag_err[0] > diag_err[1] > diag_err[2], diag_err
    assert trace_err[2] < 0.01 and diag_err[2] < 0.05
    # the reported standard error is of the right order (within 10x of the actual error)
    for actual, rep in zip(trace_err, reported):
        assert rep / 10 < actual + 1e-12 < 10 * rep + 1e-12, (actual, rep)
    with pytest.raises(ValueError, match="xdiag"):
        linalg.diagonal(A, 10, method="xtrace")
    with pytest.raises(ValueError, match="at least 4"):
        linalg.trace(A, 3, method="xtrace")


@pytest.mark.parametrize("case", ["mlp", "gpt_seq_first", "resnet"])
def test_kfac_operator(case):
    model, X, y, loss_fn = CASES[case]()
    if case == "gpt_seq_first":  # untie: a tied weight has two KFAC blocks
        model.head.weight = nn.Parameter(model.tok.weight.detach().clone())
    K = bg.linops.KFAC(model, loss_fn, batches(X, y, [3, 2]), fisher_type="type-2")
    whole = bg.compute(model, loss_fn, X, y, bg.KFAC(fisher_type="type-2"))[bg.KFAC]
    dense = K.to_dense()
    # uneven batches give the full-batch factors
    for name, block in whole.items():
        if isinstance(block, bg.KroneckerFactors):
            torch.testing.assert_close(K.blocks[name].A, block.A)
            torch.testing.assert_close(K.blocks[name].B, block.B)
    P = dense.shape[0]
    torch.testing.assert_close(dense, dense.T)
    damping = 0.3
    eye = torch.eye(P, dtype=dense.dtype)
    torch.testing.assert_close(
        K.inverse(damping).to_dense(), torch.linalg.inv(dense + damping * eye), rtol=1e-6, atol=1e-8
    )
    torch.testing.assert_close(K.logdet(damping), torch.logdet(dense + damping * eye))
    torch.testing.assert_close(K.trace(), torch.trace(dense))
    if case == "mlp":  # N = 1 per block structure check: a Linear block equals B kron A
        block = K.blocks["2"]
        names = [n for n, _ in model.named_parameters()]
        start = sum(
            p.numel()
            for n, p in model.named_parameters()
            if names.index(n) < names.index("2.weight")
        )
        O, I = model[2].weight.shape
        sub = dense[start : start + O * I + O, start : start + O * I + O]
        # reorder [W | b] (flat) into the block's [O, I + 1] layout
        idx = torch.tensor(
            [o * I + i if i < I else O * I + o for o in range(O) for i in range(I + 1)]
        )
        torch.testing.assert_close(sub[idx][:, idx], block.to_dense())


def test_spectral_density_matches_the_spectrum():
    torch.manual_seed(0)
    n = 60
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    lam = torch.cat([torch.full((40,), 1.0), torch.full((20,), 5.0)]).double()
    A = bg.linops.DenseOperator(Q @ torch.diag(lam) @ Q.T)
    grid, density = linalg.spectral_density(
        A, num_probes=20, lanczos_steps=20, sigma=0.1, generator=torch.Generator().manual_seed(0)
    )
    dx = grid[1] - grid[0]
    torch.testing.assert_close(
        (density * dx).sum(), torch.tensor(1.0, dtype=torch.float64), rtol=1e-3, atol=1e-3
    )
    near = lambda c: float((density * dx)[(grid - c).abs() < 0.5].sum())  # noqa: E731
    assert abs(near(1.0) - 40 / 60) < 0.1 and abs(near(5.0) - 20 / 60) < 0.1


def test_jacobian_and_transpose():
    model, X, y, loss_fn = CASES["mlp"]()
    J = bg.linops.Jacobian(model, batches(X, y, [3, 2]), cache_batches=None)
    ref = ggn(model, loss_fn, X, y)["J"]  # [N, K, P]
    dense = ref.reshape(-1, ref.shape[-1])
    torch.testing.assert_close(J.to_dense(), dense)
    u = torch.randn(J.shape[0], 3, dtype=torch.float64)
    torch.testing.assert_close(J.T @ u, dense.T @ u)
    V = torch.randn(J.shape[1], 2, dtype=torch.float64)
    calls, handle = _forward_counter(model)
    try:
        with J.repeated_products():  # one forward per batch for all the products
            for _ in range(2):
                torch.testing.assert_close(J @ V, dense @ V)
                torch.testing.assert_close(J.T @ u, dense.T @ u)
        assert calls[0] == 2
    finally:
        handle.remove()
    data = batches(X, y, [3, 2])
    J2 = bg.linops.Jacobian(model, data)
    data.append(data[0])  # one more batch than when the operator was built
    with pytest.raises(RuntimeError, match="data changed"):
        J2 @ V


@pytest.mark.parametrize("fisher_type", ["type-2", "empirical"])
def test_ekfac_corrected_eigenvalues_are_the_exact_diagonal_in_the_kronecker_basis(fisher_type):
    model, X, y, loss_fn = CASES["mlp"]()
    data = batches(X, y, [3, 2])
    E = bg.linops.EKFAC(model, loss_fn, data, fisher_type=fisher_type)
    if fisher_type == "type-2":
        full = ggn(model, loss_fn, X, y)["full"]
    else:
        full = EmpiricalFisher(model, loss_fn, data).to_dense()
    names = [n for n, _ in model.named_parameters()]
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    for layer in ("0", "2", "4"):
        W = dict(model.named_parameters())[f"{layer}.weight"]
        O, I = W.shape
        start = sum(sizes[n] for n in names[: names.index(f"{layer}.weight")])
        idx = torch.tensor(
            [
                start + o * I + i if i < I else start + O * I + o
                for o in range(O)
                for i in range(I + 1)
            ]
        )
        block = full[idx][:, idx]  # [W | b] in the [O, I + 1] layout
        QA, QB = E.bases[layer]
        Q = torch.kron(QB[0], QA[0])
        torch.testing.assert_close(
            torch.diagonal(Q.T @ block @ Q), E.eigenvalues[layer].reshape(-1)
        )
    dense = E.to_dense()
    P = dense.shape[0]
    eye = torch.eye(P, dtype=dense.dtype)
    torch.testing.assert_close(
        E.inverse(0.2).to_dense(), torch.linalg.inv(dense + 0.2 * eye), rtol=1e-6, atol=1e-8
    )
    torch.testing.assert_close(E.logdet(0.2), torch.logdet(dense + 0.2 * eye))
    torch.testing.assert_close(E.trace(), torch.trace(dense))


def test_ekfac_conv_and_embedding_blocks_use_the_generic_rotation():
    model, X, y, loss_fn = CASES["resnet"]()
    E = bg.linops.EKFAC(model, loss_fn, [(X, y)], fisher_type="type-2")
    full = ggn(model, loss_fn, X, y)["full"]
    names = [n for n, _ in model.named_parameters()]
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    W = model.block.conv1.weight  # no bias: the block is [O, C*K]
    start = sum(sizes[n] for n in names[: names.index("block.conv1.weight")])
    block = full[start : start + W.numel(), start : start + W.numel()]
    QA, QB = E.bases["block.conv1"]
    Q = torch.kron(QB[0], QA[0])
    torch.testing.assert_close(
        torch.diagonal(Q.T @ block @ Q), E.eigenvalues["block.conv1"].reshape(-1)
    )


def test_train_mode_shuffled_loader_and_helpers():
    model, X, y, loss_fn = CASES["resnet"]()
    model.train()
    with pytest.raises(RuntimeError, match=r"model\.eval"):
        GGN(model, loss_fn, [(X, y)])
    GGN(model, loss_fn, [(X, y)], allow_train_mode=True)  # the documented switch
    model.eval()
    model, X, y, loss_fn = CASES["mlp"]()

    class Shuffled:
        def __init__(self):
            self.calls = 0

        def __iter__(self):
            self.calls += 1
            order = [(X[:3], y[:3]), (X[3:], y[3:])]
            return iter(order if self.calls % 2 else order[::-1])

    F = Fisher(model, loss_fn, Shuffled(), generator=torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match="fixed order"):
        F @ torch.ones(F.shape[0], dtype=torch.float64)
    # a shuffled loader is fine for order-independent operators
    G = GGN(model, loss_fn, Shuffled())
    torch.testing.assert_close(G.to_dense(), ggn(model, loss_fn, X, y)["full"])
    dense = G.to_dense()
    est, _ = linalg.frobenius_norm_squared(G, 3000, generator=torch.Generator().manual_seed(0))
    assert abs(float(est) / float(dense.pow(2).sum()) - 1) < 0.1
    b = torch.randn(G.shape[0], dtype=torch.float64)
    lam_max = float(torch.linalg.eigvalsh(dense)[-1]) + 1.0
    x = linalg.neumann(G, b, damping=1.0, scale=1.0 / lam_max, terms=400)
    torch.testing.assert_close(dense @ x + x, b, rtol=1e-6, atol=1e-8)
    inv = linalg.InverseOperator(G, damping=1.0)
    torch.testing.assert_close(
        inv @ b,
        torch.linalg.solve(dense + torch.eye(dense.shape[0], dtype=dense.dtype), b),
        rtol=1e-6,
        atol=1e-8,
    )
    B = torch.randn(G.shape[0], 3, dtype=torch.float64)
    series = linalg.InverseOperator(
        G, damping=1.0, method="neumann", scale=1.0 / lam_max, terms=400
    )
    torch.testing.assert_close(
        series @ B,
        torch.linalg.solve(dense + torch.eye(dense.shape[0], dtype=dense.dtype), B),
        rtol=1e-6,
        atol=1e-8,
    )


def test_kpm_spectral_density():
    torch.manual_seed(0)
    n = 60
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    lam = torch.cat([torch.full((40,), 1.0), torch.full((20,), 5.0)]).double()
    A = bg.linops.DenseOperator(Q @ torch.diag(lam) @ Q.T)
    grid, density = linalg.spectral_density(
        A,
        num_probes=30,
        lanczos_steps=80,
        method="kpm",
        bounds=(0.0, 6.0),
        generator=torch.Generator().manual_seed(0),
    )
    dx = grid[1] - grid[0]
    mass = float((density * dx).sum())
    assert abs(mass - 1) < 0.05, mass
    near = lambda c: float((density * dx)[(grid - c).abs() < 0.6].sum())  # noqa: E731
    assert abs(near(1.0) - 40 / 60) < 0.1 and abs(near(5.0) - 20 / 60) < 0.1


def test_low_rank_operator_from_vivit():
    model, X, y, loss_fn = CASES["mlp"]()
    eig = bg.compute(model, loss_fn, X, y, bg.GGNEigen())[bg.GGNEigen]["model"]
    names = [n for n, _ in model.named_parameters()]
    L = bg.linops.LowRank.from_eigen(eig, names)
    dense = ggn(model, loss_fn, X, y)["full"]
    torch.testing.assert_close(L.to_dense(), dense, rtol=1e-7, atol=1e-9)
    eye = torch.eye(dense.shape[0], dtype=dense.dtype)
    torch.testing.assert_close(
        L.inverse(0.5).to_dense(), torch.linalg.inv(dense + 0.5 * eye), rtol=1e-6, atol=1e-8
    )
    torch.testing.assert_close(L.logdet(0.5), torch.logdet(dense + 0.5 * eye))
    torch.testing.assert_close(L.trace(), torch.trace(dense))


def test_dataloader_with_drop_last_and_dict_inputs():
    from torch.utils.data import DataLoader, TensorDataset

    model, X, y, loss_fn = CASES["mlp"]()
    loader = DataLoader(TensorDataset(X, y), batch_size=2, drop_last=True)  # uses 4 of 5
    G = GGN(model, loss_fn, loader)
    assert G.num_data == 4
    torch.testing.assert_close(G.to_dense(), ggn(model, loss_fn, X[:4], y[:4])["full"])
    model, X, y, loss_fn = CASES["dict_inputs"]()
    data = batches(X, y, [2, 3])
    G = GGN(model, loss_fn, data, batch_size_fn=lambda inputs: inputs["inputs"]["x"].shape[0])
    torch.testing.assert_close(G.to_dense(), ggn(model, loss_fn, X, y)["full"])


@pytest.mark.parametrize("case", ["gpt", "resnet", "two_inputs"])
def test_empirical_fisher_matrix_free_on_every_form(case):
    """EF products contract per-row gradients with the vectors (project, combine) without
    forming them; checked against the dense EF from per-sample gradients."""
    model, X, y, loss_fn = CASES[case]()
    EF = EmpiricalFisher(model, loss_fn, [(X, y)])
    g = per_sample_grads(model, loss_fn, X, y)
    G = torch.cat([g[n].reshape(g[n].shape[0], -1) for n in EF.names], 1)
    from beyondgrad.engine.losses import reduction_factor

    out = model(*X) if isinstance(X, tuple) else model(X)
    R = reduction_factor(loss_fn, out, y)
    torch.testing.assert_close(EF.to_dense(), G.T @ G / R)


def test_hessian_reuse_graph():
    model, X, y, loss_fn = CASES["mlp"]()
    data = batches(X, y, [3, 2])
    H = Hessian(model, loss_fn, data, reuse_graph=True)
    dense = dense_hessian(model, loss_fn, X, y)
    v = torch.randn(H.shape[0], dtype=torch.float64)
    for _ in range(2):  # the second product runs on the kept graphs
        torch.testing.assert_close(H @ v, dense @ v)
    top, _ = linalg.eigsh(H, 1, tol=1e-10, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(top, torch.linalg.eigvalsh(dense)[-1:], rtol=1e-6, atol=1e-9)
    with torch.no_grad():
        model[0].weight.add_(0.1)
    with pytest.raises(RuntimeError, match="changed while"):
        H @ v


@pytest.mark.parametrize("which", ["largest", "smallest"])
def test_lobpcg_agrees_with_dense_eigh(which):
    model, X, y, loss_fn = CASES["mlp"]()
    H = Hessian(model, loss_fn, [(X, y)])
    dense = H.to_dense()
    lam = torch.linalg.eigvalsh(dense)
    ref = lam.flip(0)[:2] if which == "largest" else lam[:2]
    vals, V = linalg.eigsh(
        H, 2, which=which, method="lobpcg", tol=1e-9, max_iter=500,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    torch.testing.assert_close(vals, ref, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(dense @ V, V * vals, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="lobpcg"):
        linalg.eigsh(H, 1, method="arnoldi")


@pytest.mark.parametrize("case", ["mlp", "resnet"])
def test_kfac_operator_on_a_parameter_subset_is_the_principal_sub_block(case):
    model, X, y, loss_fn = CASES[case]()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    full = bg.linops.KFAC(model, loss_fn, [(X, y)], fisher_type="type-2")
    weights_first = [n for n in names if n.endswith("weight")][:2]
    subset = weights_first + [n for n in names if n.endswith("bias")][-1:]
    if f"{subset[-1].rsplit('.', 1)[0]}.weight" not in subset:  # keep the bias's weight
        subset.append(f"{subset[-1].rsplit('.', 1)[0]}.weight")
    K = bg.linops.KFAC(model, loss_fn, [(X, y)], fisher_type="type-2", params=subset)
    sizes = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    offsets, start = {}, 0
    for n in names:
        offsets[n] = start
        start += sizes[n]
    idx = torch.cat([torch.arange(offsets[n], offsets[n] + sizes[n]) for n in K.names])
    assert K.names == [n for n in names if n in subset]
    torch.testing.assert_close(K.to_dense(), full.to_dense()[idx][:, idx])
    torch.testing.assert_close(
        K.inverse(0.2).to_dense(), torch.linalg.inv(K.to_dense() + 0.2 * torch.eye(len(idx)))
    )
    bias_only = [n for n in names if n.endswith("bias")][:1]
    if bias_only and f"{bias_only[0].rsplit('.', 1)[0]}.weight" in names:
        with pytest.raises(ValueError, match="add the weight"):
            bg.linops.KFAC(model, loss_fn, [(X, y)], fisher_type="type-2", params=bias_only)
    with pytest.raises(ValueError, match="unknown"):
        bg.linops.KFAC(model, loss_fn, [(X, y)], params=["nope"])


def test_kfac_operator_grouped_transposed_conv_layout():
    """Each group's slice of the ConvTranspose weight [C_in, C_out/G, K] is permuted on its own
    (the layout of the engine's block); checked against explicit parameter indices."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.ConvTranspose1d(4, 4, 3, stride=2, padding=1, groups=2))
    X, y = torch.randn(3, 4, 4), torch.randn(3, 4, 7)
    K = bg.linops.KFAC(model, nn.MSELoss(), [(X, y)], fisher_type="type-2")
    block = K.blocks["0"]
    W = model[0].weight
    C_in, Fg, _ = W.shape
    Cg = C_in // 2
    index = torch.arange(W.numel()).view(W.shape)
    expected = torch.zeros(K.shape, dtype=block.A.dtype)
    for g in range(2):
        w_idx = index[g * Cg : (g + 1) * Cg].permute(1, 0, 2).reshape(Fg, -1)
        b_idx = W.numel() + g * Fg + torch.arange(Fg)
        idx = torch.cat([w_idx, b_idx.unsqueeze(1)], 1).reshape(-1)
        expected[idx[:, None], idx[None, :]] = torch.kron(block.B[g], block.A[g])
    torch.testing.assert_close(K.to_dense(), expected)


def _forward_counter(model):
    """Counts the forward passes that build a graph (the per-batch state kept between
    products), not the forward-mode passes of ``J V`` (inside a torch.func transform)."""
    calls = [0]

    def hook(*_):
        if torch._C._functorch.peek_interpreter_stack() is None:
            calls[0] += 1

    return calls, model.register_forward_pre_hook(hook)


def _operator(kind, model, loss_fn, data, **kwargs):
    if kind == "fisher":
        return Fisher(
            model, loss_fn, data, mc_samples=2, generator=torch.Generator().manual_seed(3), **kwargs
        )
    return {"hessian": Hessian, "ggn": GGN, "ef": EmpiricalFisher}[kind](
        model, loss_fn, data, **kwargs
    )


@pytest.mark.parametrize("kind", ["hessian", "ggn", "ef", "fisher"])
def test_repeated_products_keep_the_per_batch_state(kind):
    model, X, y, loss_fn = CASES["mlp"]()
    data = batches(X, y, [3, 2])
    A = _operator(kind, model, loss_fn, data, cache_batches=2)
    dense = A.to_dense()
    if kind != "fisher":  # the other operators are checked against oracles above
        ref = dense_hessian(model, loss_fn, X, y) if kind == "hessian" else None
        if ref is not None:
            torch.testing.assert_close(dense, ref)
    V1 = torch.randn(A.shape[0], 3, dtype=torch.float64)
    V2 = torch.randn(A.shape[0], 2, dtype=torch.float64)
    calls, handle = _forward_counter(model)
    A @ V1  # the engine probes a model again once a hook is added (here the counter's)
    calls[0] = 0
    try:
        with A.repeated_products():
            torch.testing.assert_close(A @ V1, dense @ V1)
            after_first = calls[0]
            assert after_first > 0
            torch.testing.assert_close(A @ V2, dense @ V2)  # on the kept state
            torch.testing.assert_close(A @ V1[:, 0], dense @ V1[:, 0])
            assert calls[0] == after_first, "a repeated product ran the model again"
        assert A._cache is None  # released on exit
        A @ V1
        assert calls[0] == 2 * after_first
        # only the first batch kept: the second one runs its forward every time
        B = _operator(kind, model, loss_fn, data, cache_batches=1)
        with B.repeated_products():
            B @ V1
            before = calls[0]
            torch.testing.assert_close(B @ V2, dense @ V2)
            assert 0 < calls[0] - before < after_first
    finally:
        handle.remove()
    with A.repeated_products():
        A @ V1
        with torch.no_grad():
            model[0].weight.mul_(1.01)
        with pytest.raises(RuntimeError, match="changed while"):
            A @ V1


def test_repeated_products_with_a_loader_that_yields_new_tensors():
    """Batches are recognized by identity: fresh tensors every pass are never mistaken for kept
    ones (ids of freed tensors get reused)."""
    model, X, y, loss_fn = CASES["mlp"]()

    class Fresh:
        def __iter__(self):
            for Xb, yb in batches(X, y, [3, 2]):
                yield Xb.clone(), yb.clone()

    H = Hessian(model, loss_fn, Fresh())
    dense = dense_hessian(model, loss_fn, X, y)
    top, _ = linalg.eigsh(H, 1, tol=1e-10, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(top, torch.linalg.eigvalsh(dense)[-1:], rtol=1e-6, atol=1e-9)
    v = torch.randn(H.shape[0], dtype=torch.float64)
    calls, handle = _forward_counter(model)
    try:
        with H.repeated_products():
            for _ in range(3):
                torch.testing.assert_close(H @ v, dense @ v)
    finally:
        handle.remove()
    assert calls[0] == 6  # every pass runs both batches: nothing stale is reused


def test_repeated_products_notice_changed_batches_and_parameters():
    model, X, y, loss_fn = CASES["mlp"]()
    Xb, yb = X.clone(), y.clone()
    H = Hessian(model, loss_fn, [(Xb, yb)])
    v = torch.randn(H.shape[0], dtype=torch.float64)
    with H.repeated_products():
        H @ v
        Xb.mul_(2.0)  # a prefetcher refilling the same tensor
        with pytest.raises(RuntimeError, match="changed while"):
            H @ v
    Xb.copy_(X)
    with H.repeated_products():
        H @ v
        model[0].weight.data = model[0].weight.data * 1.5  # no version bump: new storage
        with pytest.raises(RuntimeError, match="changed while"):
            H @ v
    with H.repeated_products():
        H @ v
        model.train()
        with pytest.raises(RuntimeError, match="changed while"):
            H @ v
    model.eval()
    torch.testing.assert_close(H @ v, dense_hessian(model, loss_fn, X, y) @ v)


def test_algorithms_enter_the_repeated_products_context():
    model, X, y, loss_fn = CASES["mlp"]()
    data = batches(X, y, [3, 2])
    G = GGN(model, loss_fn, data, cache_batches=None)
    dense = G.to_dense()
    calls, handle = _forward_counter(model)
    try:
        vals, _ = linalg.eigsh(G, 2, tol=1e-10, generator=torch.Generator().manual_seed(0))
        assert calls[0] == 2  # one forward per batch for the whole Lanczos run
        torch.testing.assert_close(vals, torch.linalg.eigvalsh(dense).flip(0)[:2])
        b = torch.randn(G.shape[0], dtype=torch.float64)
        x = linalg.solve(G, b, damping=0.1)
        assert calls[0] == 4
        torch.testing.assert_close(dense @ x + 0.1 * x, b)
        composite = 2.0 * G + G  # composites forward the context to their parts
        linalg.trace(composite, 6, method="hutchinson", generator=torch.Generator())
        assert calls[0] == 6  # two operators (same object) -> one cache, entered once
    finally:
        handle.remove()


def test_mc_fisher_is_one_matrix_across_passes():
    """Every pass over the data draws the same labels: products with single columns, blocks and
    the dense matrix built in several passes agree (and it is symmetric)."""
    model, X, y, loss_fn = CASES["mlp"]()
    F = _operator("fisher", model, loss_fn, batches(X, y, [3, 2]))
    one_pass = F.to_dense()
    several = F.to_dense(chunk=5)
    torch.testing.assert_close(several, one_pass)
    torch.testing.assert_close(one_pass, one_pass.T)
    v = torch.randn(F.shape[0], dtype=torch.float64)
    torch.testing.assert_close(F @ v, one_pass @ v)
    torch.testing.assert_close(F.diagonal(), torch.diagonal(one_pass))
    G = Fisher(model, loss_fn, batches(X, y, [3, 2]), mc_samples=2, generator=torch.Generator())
    assert not torch.allclose(G.to_dense(), one_pass)  # another seed, another sample


@pytest.mark.parametrize("case", ["mlp", "resnet"])
def test_exact_diagonal_and_trace_of_the_curvature_operators(case):
    model, X, y, loss_fn = CASES[case]()
    data = batches(X, y, [3, 2])
    references = {
        "hessian": dense_hessian(model, loss_fn, X, y),
        "ggn": ggn(model, loss_fn, X, y)["full"],
        "ef": EmpiricalFisher(model, loss_fn, data).to_dense(),
    }
    for kind, ref in references.items():
        A = _operator(kind, model, loss_fn, data)
        torch.testing.assert_close(A.diagonal(), torch.diagonal(ref), rtol=1e-8, atol=1e-11)
        torch.testing.assert_close(A.trace(), torch.trace(ref))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    subset = names[-2:]
    G = GGN(model, loss_fn, data, params=subset)
    torch.testing.assert_close(G.diagonal(), torch.diagonal(G.to_dense()))


def test_hessian_diagonal_refuses_models_outside_diag_hessian():
    model, X, y, loss_fn = CASES["gpt"]()
    H = Hessian(model, loss_fn, [(X, y)])
    with pytest.raises(RuntimeError, match="xdiag"):
        H.diagonal()


def test_ekfac_operator_on_a_parameter_subset():
    import copy

    model, X, y, loss_fn = CASES["mlp"]()
    data = batches(X, y, [3, 2])
    names = [n for n, _ in model.named_parameters()]
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    offsets = {n: sum(sizes[m] for m in names[: names.index(n)]) for n in names}

    def index(ns):
        return torch.cat([torch.arange(offsets[n], offsets[n] + sizes[n]) for n in ns])

    full = bg.linops.EKFAC(model, loss_fn, data, fisher_type="type-2")
    whole = ["2.weight", "2.bias", "4.weight", "4.bias"]
    E = bg.linops.EKFAC(model, loss_fn, data, fisher_type="type-2", params=whole)
    idx = index(whole)
    torch.testing.assert_close(E.to_dense(), full.to_dense()[idx][:, idx])
    torch.testing.assert_close(E.trace(), torch.trace(full.to_dense()[idx][:, idx]))
    # a weight without its bias: the EKFAC of the model with that bias frozen
    E0 = bg.linops.EKFAC(model, loss_fn, data, fisher_type="type-2", params=["0.weight"])
    frozen = copy.deepcopy(model)
    frozen[0].bias.requires_grad_(False)
    F0 = bg.linops.EKFAC(frozen, loss_fn, data, fisher_type="type-2")
    n0 = sizes["0.weight"]
    torch.testing.assert_close(E0.to_dense(), F0.to_dense()[:n0, :n0])
    # its corrected eigenvalues: the exact GGN diagonal in its own Kronecker basis
    block = ggn(model, loss_fn, X, y)["full"][:n0, :n0]
    QA, QB = E0.bases["0"]
    Q = torch.kron(QB[0], QA[0])
    torch.testing.assert_close(torch.diagonal(Q.T @ block @ Q), E0.eigenvalues["0"].reshape(-1))
    with pytest.raises(ValueError, match="add the weight"):
        bg.linops.EKFAC(model, loss_fn, data, params=["0.bias"])


def _check_eigh(op, dense):
    lam = torch.linalg.eigvalsh(dense)
    torch.testing.assert_close(op.eigvalsh(), lam, rtol=1e-8, atol=1e-10)
    for which, ref in (("largest", lam.flip(0)[:4]), ("smallest", lam[:4])):
        vals, U = op.eigh(4, which=which)
        torch.testing.assert_close(vals, ref, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(dense @ U, U * vals, rtol=1e-7, atol=1e-9)
        torch.testing.assert_close(U.T @ U, torch.eye(4, dtype=U.dtype), rtol=0, atol=1e-10)
    vals, U = op.eigh()  # all pairs: the full decomposition
    torch.testing.assert_close(U @ torch.diag(vals) @ U.T, dense, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("case", ["mlp", "resnet", "gpt"])
@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_structured_operators_eigh_in_closed_form(case, kind):
    model, X, y, loss_fn = CASES[case]()
    data = [(X, y)]
    if kind == "kfac":
        kwargs = {"fisher_type": "type-2"} if case != "gpt" else {"fisher_type": "mc"}
        try:
            op = bg.linops.KFAC(model, loss_fn, data, **kwargs)
        except RuntimeError as err:  # tied embedding/head: the operator is undefined
            assert "exactly once" in str(err)
            names = [n for n, _ in model.named_parameters() if n != "tok.weight"]
            op = bg.linops.KFAC(model, loss_fn, data, params=names, **kwargs)
    else:
        fisher = "type-2" if case != "gpt" else "empirical"
        try:
            op = bg.linops.EKFAC(model, loss_fn, data, fisher_type=fisher)
        except RuntimeError as err:
            assert "exactly once" in str(err)
            names = [n for n, _ in model.named_parameters() if n != "tok.weight"]
            op = bg.linops.EKFAC(model, loss_fn, data, fisher_type=fisher, params=names)
    if case == "gpt":  # the position embedding: an "A kron B" block
        assert any(b.order == "A kron B" for b in op.blocks.values() if hasattr(b, "order"))
    _check_eigh(op, op.to_dense())


@pytest.mark.parametrize("kind", ["KFAC", "EKFAC"])
def test_eigh_of_grouped_transposed_conv_blocks(kind):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.ConvTranspose1d(4, 4, 3, stride=2, padding=1, groups=2), nn.Flatten(), nn.Linear(36, 3)
    ).double()
    X, y = torch.randn(6, 4, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    op = getattr(bg.linops, kind)(model, nn.CrossEntropyLoss(), [(X, y)], fisher_type="type-2")
    _check_eigh(op, op.to_dense())


def test_diagonal_and_low_rank_eigh():
    values = torch.tensor([3.0, -1.0, 2.0, 0.5, 4.0, 1.5], dtype=torch.float64)
    _check_eigh(Diagonal(values), torch.diag(values))
    Q, _ = torch.linalg.qr(torch.randn(6, 3, dtype=torch.float64))
    lr = bg.linops.LowRank(torch.tensor([5.0, 1.0, 3.0], dtype=torch.float64), Q)
    dense = lr.to_dense()
    torch.testing.assert_close(lr.eigvalsh(), torch.linalg.eigvalsh(dense), atol=1e-10, rtol=0)
    vals, U = lr.eigh(2)
    torch.testing.assert_close(vals, torch.tensor([5.0, 3.0], dtype=torch.float64))
    torch.testing.assert_close(dense @ U, U * vals)
    with pytest.raises(ValueError, match="k must be"):
        lr.eigh(4)


@pytest.mark.parametrize("rank", [30, 5])
def test_xtrace_xdiag_leave_one_out_estimates_follow_the_definition(rank):
    """Every leave-one-out estimate from its definition with dense n x n projectors (the
    full-rank sketch takes the O(m^3) downdate, the rank-deficient one the per-probe QRs)."""
    n, m = 30, 8
    g = torch.Generator().manual_seed(5)
    B = torch.randn(n, rank, dtype=torch.float64, generator=g)
    A = B @ torch.diag(torch.linspace(-1, 3, rank, dtype=torch.float64)) @ B.T
    op = bg.linops.DenseOperator(A, symmetric=True)
    est, err = linalg.trace(op, 2 * m, method="xtrace", generator=torch.Generator().manual_seed(1))
    diag = linalg.diagonal(op, 2 * m, method="xdiag", generator=torch.Generator().manual_seed(1))
    Om = (2 * torch.randint(0, 2, (n, m), generator=torch.Generator().manual_seed(1)) - 1).double()
    Y = A @ Om
    traces, diags = [], []
    for i in range(m):
        others = [j for j in range(m) if j != i]
        Qi, _ = torch.linalg.qr(Y[:, others])
        Qi = Qi[:, : min(m - 1, torch.linalg.matrix_rank(Y[:, others]))]
        P = Qi @ Qi.T
        w = Om[:, i] - P @ Om[:, i]
        traces.append(torch.trace(P @ A @ P) + w @ A @ w)
        diags.append(torch.diagonal(P @ A) + Om[:, i] * ((torch.eye(n) - P) @ A @ Om[:, i]))
    traces = torch.stack(traces)
    torch.testing.assert_close(est, traces.mean())
    torch.testing.assert_close(err, traces.std() / m**0.5)
    torch.testing.assert_close(diag, torch.stack(diags).mean(0))
    if rank < m:  # exact once the sketch captures the range
        torch.testing.assert_close(est, torch.trace(A))


@pytest.mark.parametrize("scale", [1.0, 1e-9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_partial_reorthogonalization_keeps_the_basis_semi_orthogonal(dtype, scale):
    """Simon's recurrence: far fewer full passes than steps, yet |Q Q^T - I| stays near
    sqrt(eps) and no ghost copies of converged eigenvalues appear (plain Lanczos without
    reorthogonalization duplicates the well-separated top eigenvalues here)."""
    from beyondgrad.linalg.lanczos import Lanczos, tridiagonal

    n = 2000
    g = torch.Generator().manual_seed(0)
    top = torch.tensor([100.0, 90.0, 80.0, 70.0, 60.0], dtype=torch.float64) * scale
    lam = torch.cat([top, scale * torch.rand(n - 5, dtype=torch.float64, generator=g)])
    Q0, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=g))
    A = ((Q0 * lam) @ Q0.T).to(dtype)
    q = torch.randn(n, dtype=dtype, generator=g)
    runs = {}
    for mode in ("partial", "full"):
        lz = Lanczos(bg.linops.DenseOperator(A, symmetric=True), q / q.norm(), 120, mode)
        while lz.step():
            pass
        runs[mode] = lz
        Q = lz.basis()
        loss = (Q @ Q.T - torch.eye(lz.m, dtype=dtype)).abs().max()
        assert loss < 50 * torch.finfo(dtype).eps ** 0.5, (mode, float(loss))
        ritz = torch.linalg.eigvalsh(tridiagonal(lz.alpha[: lz.m], lz.beta[: lz.m - 1]).double())
        # the five top Ritz values are the eigenvalues, each once (a ghost would repeat 100)
        torch.testing.assert_close(ritz.flip(0)[:5], top, rtol=1e-5, atol=0)
        assert float(ritz.flip(0)[5]) < scale * (1.0 + 1e-3)
    assert runs["full"].reorthogonalizations == 120
    assert runs["partial"].reorthogonalizations < 120 * 0.75
    vals, vecs = linalg.eigsh(
        bg.linops.DenseOperator(A, symmetric=True), 5, tol=1e-5, generator=torch.Generator()
    )
    torch.testing.assert_close(vals.double(), top, rtol=1e-5, atol=0)
    torch.testing.assert_close(
        vecs.T @ vecs,
        torch.eye(5, dtype=dtype),
        atol=1e-4 if dtype == torch.float32 else 1e-8,
        rtol=0,
    )


def test_bad_arguments_of_the_new_options_raise():
    model, X, y, loss_fn = CASES["mlp"]()
    with pytest.raises(ValueError, match="cache_batches"):
        GGN(model, loss_fn, [(X, y)], cache_batches=-1)
    with pytest.raises(ValueError, match="cache_batches"):
        bg.linops.Jacobian(model, [(X, y)], cache_batches=-2)
    H = Hessian(model, loss_fn, [(X, y)])
    with pytest.raises(ValueError, match="max_iter"):
        linalg.eigsh(H, 3, max_iter=2)
    with pytest.raises(ValueError, match="reorthogonalize"):
        linalg.eigsh(H, 1, reorthogonalize="sometimes")
    K = bg.linops.KFAC(model, loss_fn, [(X, y)], fisher_type="type-2")
    with pytest.raises(ValueError, match="which"):
        K.eigh(2, which="middle")
    with pytest.raises(ValueError, match="k must be"):
        K.eigh(K.shape[0] + 1)
    with pytest.raises(ValueError, match="neumann"):
        linalg.InverseOperator(H, method="jacobi")
