"""Edges a careful user reaches: non-finite values, unconverged solvers, KPM at the bounds,
non-square operators, layers without double derivatives, and clear error messages."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import beyondgrad as bg
from beyondgrad import linalg
from beyondgrad.linops import DenseOperator
from beyondgrad.linops.curvature import _check_all_finite
from models import CASES
from oracles.curvature import ggn


def _spd(n: int, seed: int = 0, cond: float = 1e3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (Q * torch.logspace(0, torch.log10(torch.tensor(cond)).item(), n).double()) @ Q.T


@pytest.mark.parametrize("kind", ["Hessian", "GGN", "EmpiricalFisher"])
def test_curvature_operators_raise_on_non_finite_values(kind):
    model, X, y, loss_fn = CASES["mlp"]()
    Xbad = X.clone()
    Xbad[1, 0] = float("inf")
    op = getattr(bg.linops, kind)(model, loss_fn, [(Xbad, y)])
    with pytest.raises(FloatingPointError):
        op @ torch.ones(op.shape[0], dtype=torch.float64)
    J = bg.linops.Jacobian(model, [(Xbad, y)])
    with pytest.raises(FloatingPointError):
        J @ torch.ones(J.shape[1], dtype=torch.float64)
    G = bg.linops.GGN(model, loss_fn, [(X, y)])
    v = torch.ones(G.shape[0], dtype=torch.float64)
    v[0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite product"):
        G @ v


def test_parameter_layout_products_check_finiteness_without_false_alarms():
    """Products in the parameter layout raise on a non-finite entry, and not where every
    entry is finite but the products' norms overflow (float32, entries ~1e30)."""
    model, X, y, loss_fn = CASES["mlp"]()
    H = bg.linops.Hessian(model, loss_fn, [(X, y)])
    vs = [torch.ones_like(p) for p in H.params]
    vs[-1][0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite product"):
        H @ vs
    torch.manual_seed(0)
    small = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).float()
    Xs, ys = torch.randn(5, 3, dtype=torch.float32), torch.randint(0, 2, (5,))
    Hs = bg.linops.Hessian(small, nn.CrossEntropyLoss(), [(Xs, ys)])
    unit = [torch.ones_like(p) for p in Hs.params]
    big = [v * 1e30 for v in unit]
    out_big, out_unit = Hs @ big, Hs @ unit
    assert all(torch.isfinite(t).all() for t in out_big)
    for b, u in zip(out_big, out_unit):
        torch.testing.assert_close(b, u * 1e30, rtol=1e-4, atol=0)
    # the one cheap reduction over all entries overflows: the entry-wise check decides
    huge = [torch.full((4,), 3e38, dtype=torch.float32), torch.ones(2, dtype=torch.float32)]
    assert not torch.isfinite(torch.stack([t.sum() for t in huge]).sum())
    _check_all_finite(Hs, huge, "product")  # no false alarm
    with pytest.raises(FloatingPointError, match="non-finite product"):
        _check_all_finite(
            Hs, [*huge, torch.tensor([1.0, float("inf")], dtype=torch.float32)], "product"
        )


def _warns(fn, match):
    with pytest.warns(RuntimeWarning, match=match):
        return fn()


def test_solvers_report_convergence_and_warn():
    A = DenseOperator(_spd(40), symmetric=True)
    b = torch.ones(40, dtype=torch.float64)
    x, info = _warns(lambda: linalg.solve(A, b, "cg", max_iter=3, return_info=True), "cg")
    assert info["converged"] is False and info["iterations"] == 3
    assert info["residual"] == pytest.approx(float((b - A @ x).norm() / b.norm()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a converged solve is silent
        x, info = linalg.solve(A, b, "cg", return_info=True)
    assert info["converged"] and info["residual"] < 1e-7
    # a singular, inconsistent system: MINRES's recursive residual goes wrong, the true one not
    S = DenseOperator(torch.diag(torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64)))
    rhs = torch.ones(3, dtype=torch.float64)
    _, info = _warns(lambda: linalg.solve(S, rhs, "minres", return_info=True), "minres")
    assert info["converged"] is False and info["residual"] >= 1 / 3**0.5 - 1e-9
    # a divergent Neumann series (scale * lambda_max > 2)
    x = _warns(lambda: linalg.neumann(A, b, scale=1.0, terms=5), "diverges")
    assert torch.isfinite(x).all()
    with pytest.raises(FloatingPointError, match="diverged"):
        linalg.neumann(A, b, scale=1.0, terms=400)


def test_kpm_density_is_finite_at_the_bounds():
    A = DenseOperator(_spd(30, cond=10.0).float(), symmetric=True)
    grid, density = linalg.spectral_density(
        A, num_probes=5, lanczos_steps=30, method="kpm", generator=torch.Generator().manual_seed(0)
    )
    assert torch.isfinite(density).all()
    dx = grid[1] - grid[0]
    assert abs(float((density * dx).sum()) - 1) < 0.05
    edges = torch.tensor([0.0, 0.5, 11.0, 12.0])
    _, density = linalg.spectral_density(
        A, num_probes=5, lanczos_steps=30, method="kpm", bounds=(0.0, 12.0), grid=edges,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert torch.isfinite(density).all() and float(density[0]) == 0 == float(density[-1])


def test_algorithms_refuse_non_square_operators():
    model, X, y, _ = CASES["mlp"]()
    J = bg.linops.Jacobian(model, [(X, y)])
    for call in (
        lambda: linalg.eigsh(J, 1),
        lambda: linalg.trace(J, 6),
        lambda: linalg.spectral_density(J),
        lambda: linalg.solve(J, torch.ones(J.shape[0], dtype=torch.float64)),
    ):
        with pytest.raises(ValueError, match="square"):
            call()
    with pytest.raises(ValueError, match="symmetric"):
        J.inverse(1.0)


def test_ggn_products_through_layers_without_double_derivatives():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Hardsigmoid(), nn.Linear(4, 2)).double()
    X, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,))
    loss_fn = nn.CrossEntropyLoss()
    G = bg.linops.GGN(model, loss_fn, [(X[:3], y[:3]), (X[3:], y[3:])])
    ref = ggn(model, loss_fn, X, y)
    torch.testing.assert_close(G.to_dense(), ref["full"])
    J = bg.linops.Jacobian(model, [(X, y)])
    torch.testing.assert_close(J.to_dense(), ref["J"].reshape(-1, ref["J"].shape[-1]))
    H = bg.linops.Hessian(model, loss_fn, [(X, y)])  # needs second derivatives: a clear error
    with pytest.raises(RuntimeError, match=r"use bg\.linops\.GGN"):
        H @ torch.ones(H.shape[0], dtype=torch.float64)


def test_hessian_diagonal_error_keeps_the_whole_reason():
    model, X, y, loss_fn = CASES["gpt"]()
    H = bg.linops.Hessian(model, loss_fn, [(X, y)])
    with pytest.raises(RuntimeError, match="xdiag") as err:
        H.diagonal()
    reason = str(err.value.__cause__)
    assert reason and reason.strip() in str(err.value)


def test_exact_diagonals_refuse_coupled_samples():
    """BatchNorm in training mode couples the samples: the engine's per-sample diagonals would
    be wrong (the products stay exact), so diagonal() and trace() refuse."""
    model, X, y, loss_fn = CASES["resnet"]()
    model.train()
    for kind in ("GGN", "Hessian"):
        op = getattr(bg.linops, kind)(model, loss_fn, [(X, y)], allow_train_mode=True)
        with pytest.raises(RuntimeError, match="coupled"):
            op.diagonal()
        with pytest.raises(RuntimeError, match="xdiag"):
            op.trace()


@pytest.mark.parametrize("shape", [(37, 3), (64, 8), (5, 1), (1, 4)])
def test_blocked_transpose_equals_the_plain_one(monkeypatch, shape):
    """``columns_first`` (the cache-blocked transposing copy of the ``[P, k]`` block) equals
    ``B.T.contiguous()`` with several ragged blocks, and is a view where no copy is needed."""
    from beyondgrad.linops import base

    monkeypatch.setattr(base, "TRANSPOSE_CHUNK_BYTES", 40)  # 10 float32 entries a block
    B = torch.randn(shape)
    T = base.columns_first(B)
    assert T.is_contiguous()
    assert torch.equal(T, B.T.contiguous())
    C = torch.randn(shape[1], shape[0]).T  # already column-major: no copy
    assert base.columns_first(C).data_ptr() == C.data_ptr()
    strided = torch.randn(shape[0], 2 * shape[1])[:, ::2]  # a strided slice of a wider block
    assert torch.equal(base.columns_first(strided), strided.T.contiguous())


@pytest.mark.parametrize("kind", ["Hessian", "GGN"])
def test_products_of_row_major_blocks_use_the_blocked_transpose(monkeypatch, kind):
    """A row-major ``[P, k]`` block, transposed in many small blocks, gives the dense
    product (float64)."""
    from beyondgrad.linops import base

    monkeypatch.setattr(base, "TRANSPOSE_CHUNK_BYTES", 64)
    model, X, y, loss_fn = CASES["mlp"]()
    from test_linops import dense_hessian

    if kind == "Hessian":
        dense = dense_hessian(model, loss_fn, X, y)
    else:
        dense = ggn(model, loss_fn, X, y)["full"]
    op = getattr(bg.linops, kind)(model, loss_fn, [(X, y)])
    M = torch.randn(op.shape[1], 5, dtype=torch.float64)
    torch.testing.assert_close(op @ M, dense @ M, rtol=1e-10, atol=1e-12)


def test_block_diagonal_of_ranges_assembles_column_major_blocks(monkeypatch):
    """A KFAC-like ``BlockDiagonal`` over consecutive ranges (a Kronecker block, a large
    diagonal) multiplies row- and column-major blocks of vectors like its dense matrix, with the
    row-block copies (``copy_rows_``) forced into many small steps (float64)."""
    from beyondgrad.linops import base
    from beyondgrad.linops.structures import BlockDiagonal, Diagonal, Kronecker

    monkeypatch.setattr(base, "TRANSPOSE_CHUNK_BYTES", 48)  # 6 float64 entries a step
    g = torch.Generator().manual_seed(3)
    L = torch.randn(3, 3, generator=g, dtype=torch.float64)
    R = torch.randn(4, 4, generator=g, dtype=torch.float64)
    d = torch.rand(17, generator=g, dtype=torch.float64)
    B = BlockDiagonal(
        [(torch.arange(12), Kronecker(L @ L.T, R @ R.T)), (12 + torch.arange(17), Diagonal(d))], 29
    )
    assert all(isinstance(w, slice) for w in B._where)
    dense = torch.block_diag(torch.kron(L @ L.T, R @ R.T), torch.diag(d))
    M = torch.randn(29, 5, generator=g, dtype=torch.float64)
    torch.testing.assert_close(B @ M, dense @ M, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(B @ M.T.contiguous().T, dense @ M, rtol=1e-12, atol=1e-12)
    dst = torch.empty(5, 29, dtype=torch.float64).T  # column-major
    assert torch.equal(base.copy_rows_(dst, M), M)
