"""Structured building blocks against dense float64 matrices, uniform inverses, and the
streaming data-set plumbing."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import beyondgrad as bg
from beyondgrad.linalg import normal_range
from beyondgrad.linops import (
    BlockDiagonal,
    Diagonal,
    Kronecker,
    KroneckerEigen,
    LinearOperator,
    LowRank,
    StructuredOperator,
)
from models import CASES
from oracles.curvature import ggn


def _spd(shape, g, shift=0.1):
    X = torch.randn(*shape[:-1], shape[-1] + 1, generator=g, dtype=torch.float64)
    eye = torch.eye(shape[-1], dtype=torch.float64)
    return X @ X.mT / shape[-1] + shift * eye


def _check_closed_forms(op: StructuredOperator, dense: torch.Tensor, k: int = 3):
    damping = 0.3
    n = dense.shape[0]
    eye = torch.eye(n, dtype=dense.dtype)
    torch.testing.assert_close(op.to_dense(), dense)
    v = torch.linspace(-1.0, 2.0, n, dtype=dense.dtype)  # one vector (its own product path)
    torch.testing.assert_close(op @ v, dense @ v)
    inv = op.inverse(damping)
    assert isinstance(inv, StructuredOperator)
    torch.testing.assert_close(inv.to_dense(), torch.linalg.inv(dense + damping * eye))
    torch.testing.assert_close(op.logdet(damping), torch.logdet(dense + damping * eye))
    torch.testing.assert_close(op.trace(), torch.trace(dense))
    lam = torch.linalg.eigvalsh(dense)
    torch.testing.assert_close(op.eigvalsh(), lam)
    vals, U = op.eigh(k)
    torch.testing.assert_close(vals, lam.flip(0)[:k])
    torch.testing.assert_close(dense @ U, U * vals)


def test_building_blocks_match_dense_matrices():
    g = torch.Generator().manual_seed(0)
    L, R = _spd((2, 3, 3), g), _spd((2, 4, 4), g)
    K = Kronecker(L, R)
    dense_k = torch.block_diag(*(torch.kron(a, b) for a, b in zip(L, R)))
    _check_closed_forms(K, dense_k)
    E = K.eigen()
    assert isinstance(E, KroneckerEigen)
    s = torch.rand(2, 3, 4, generator=g, dtype=torch.float64) + 0.1
    Q = torch.block_diag(*(torch.kron(a, b) for a, b in zip(E.q_left, E.q_right)))
    _check_closed_forms(KroneckerEigen(E.q_left, s, E.q_right), Q @ torch.diag(s.reshape(-1)) @ Q.T)
    d = torch.rand(5, generator=g, dtype=torch.float64) + 0.5
    _check_closed_forms(Diagonal(d), torch.diag(d))
    U, _ = torch.linalg.qr(torch.randn(6, 2, generator=g, dtype=torch.float64))
    lam = torch.tensor([3.0, 1.5], dtype=torch.float64)
    low = LowRank(lam, U, shift=0.2)
    dense_low = U @ torch.diag(lam) @ U.T + 0.2 * torch.eye(6, dtype=torch.float64)
    _check_closed_forms(low, dense_low, k=2)  # eigh: the stored pairs
    torch.testing.assert_close(
        low.eigenvectors(torch.arange(6)).T @ dense_low @ low.eigenvectors(torch.arange(6)),
        torch.diag(low.spectrum()),
    )
    # a block-diagonal composition over a permutation of the entries
    perm = torch.randperm(24 + 5, generator=g)
    B = BlockDiagonal([(perm[:24], K), (perm[24:], Diagonal(d))], 29)
    dense = torch.zeros(29, 29, dtype=torch.float64)
    dense[perm[:24, None], perm[None, :24]] = dense_k
    dense[perm[24:, None], perm[None, 24:]] = torch.diag(d)
    _check_closed_forms(B, dense)
    with pytest.raises(ValueError, match="exactly once"):
        BlockDiagonal([(perm[:24], K), (perm[:5], Diagonal(d))], 29)


def test_block_with_a_weight_and_its_bias_column_is_read_through_views():
    """A Kronecker block laid out ``[rows, cols + 1]`` over a weight range and a bias range
    (KFAC's joint bias) is gathered and scattered by views, for row- and column-major blocks
    of vectors, equal to the dense matrix; other orders keep the index."""
    g = torch.Generator().manual_seed(1)
    L, R = _spd((1, 3, 3), g), _spd((1, 5, 5), g)  # rows 3, cols 4 + the bias column
    K = Kronecker(L, R)
    weight = 2 + torch.arange(12).view(3, 4)  # entries 2..13 of a 20-vector; bias 16..18
    index = torch.cat([weight, (16 + torch.arange(3))[:, None]], 1).reshape(-1)
    rest = torch.tensor([0, 1, 14, 15, 19])
    d = torch.rand(5, generator=g, dtype=torch.float64) + 0.5
    B = BlockDiagonal([(index, K), (rest, Diagonal(d))], 20)
    assert type(B._where[0]).__name__ == "_RowsWithLastColumn"
    dense = torch.zeros(20, 20, dtype=torch.float64)
    dense[index[:, None], index[None, :]] = torch.kron(L[0], R[0])
    dense[rest, rest] = d
    _check_closed_forms(B, dense)
    M = torch.randn(20, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(B @ M, dense @ M)
    torch.testing.assert_close(B @ M.T.contiguous().T, dense @ M)  # column-major
    shuffled = index.clone()
    shuffled[[0, 1]] = shuffled[[1, 0]]
    other = BlockDiagonal([(shuffled, K), (rest, Diagonal(d))], 20)
    assert isinstance(other._where[0], torch.Tensor)


def test_every_inverse_is_a_linear_operator():
    model, X, y, loss_fn = CASES["mlp"]()
    data = [(X, y)]
    G = bg.linops.GGN(model, loss_fn, data)
    dense = G.to_dense()
    eye = torch.eye(dense.shape[0], dtype=dense.dtype)
    inv = G.inverse(0.5)  # a solver behind an operator
    assert isinstance(inv, LinearOperator)
    torch.testing.assert_close(inv.to_dense(), torch.linalg.inv(dense + 0.5 * eye))
    for op in (
        bg.linops.KFAC(model, loss_fn, data, fisher_type="type-2"),
        bg.linops.EKFAC(model, loss_fn, data, fisher_type="type-2"),
        Diagonal.from_engine(model, loss_fn, data, bg.DiagGGN()),
        LowRank.from_eigen(
            bg.compute(model, loss_fn, X, y, bg.GGNEigen())[bg.GGNEigen]["model"],
            [n for n, _ in model.named_parameters()],
        ),
    ):
        inv = op.inverse(0.5)
        assert isinstance(inv, StructuredOperator), type(op)
        ref = torch.linalg.inv(op.to_dense() + 0.5 * eye)
        torch.testing.assert_close(inv.to_dense(), ref, rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(inv.inverse(0.0).to_dense(), op.to_dense() + 0.5 * eye)
    # factors keep their documented callable
    block = bg.compute(model, loss_fn, X, y, bg.KFAC(fisher_type="type-2"))[bg.KFAC]["0"]
    v = torch.randn(block.A.shape[-1] * block.B.shape[-1], dtype=torch.float64)
    eye_b = torch.eye(v.numel(), dtype=v.dtype)
    torch.testing.assert_close(
        block.inverse(0.5)(v), torch.linalg.solve(block.to_dense() + 0.5 * eye_b, v)
    )


def _stream(batches):
    yield from batches


def test_kfac_and_diagonal_stream_a_one_shot_iterator_with_num_data():
    model, X, y, loss_fn = CASES["mlp"]()
    data = [(X[:3], y[:3]), (X[3:], y[3:])]
    ref = bg.linops.KFAC(model, loss_fn, data, fisher_type="type-2")
    K = bg.linops.KFAC(model, loss_fn, _stream(data), fisher_type="type-2", num_data=5)
    torch.testing.assert_close(K.to_dense(), ref.to_dense())
    # an endless stream is read until num_data samples
    endless = itertools.cycle(data)
    K = bg.linops.KFAC(model, loss_fn, endless, fisher_type="type-2", num_data=5)
    torch.testing.assert_close(K.to_dense(), ref.to_dense())
    D = Diagonal.from_engine(model, loss_fn, _stream(data), bg.DiagGGN(), num_data=5)
    torch.testing.assert_close(D.values, torch.diagonal(ggn(model, loss_fn, X, y)["full"]))
    with pytest.raises(ValueError, match="num_data"):
        bg.linops.KFAC(model, loss_fn, _stream(data))


class _Endless(torch.utils.data.IterableDataset):
    """A stream that never ends (it stops the test instead of hanging after many batches)."""

    def __init__(self, X, y):
        self.X, self.y = X, y

    def __iter__(self):
        for i in range(10_000):
            yield self.X[i % len(self.X)], self.y[i % len(self.y)]
        raise AssertionError("an operator kept reading an endless stream")


def test_endless_data_raises_instead_of_hanging():
    model, X, y, loss_fn = CASES["mlp"]()
    data = [(X[:3], y[:3]), (X[3:], y[3:])]
    with pytest.raises(TypeError, match="one-shot"):
        bg.linops.GGN(model, loss_fn, itertools.cycle(data))
    with pytest.raises(TypeError, match="one-shot"):
        bg.linops.Jacobian(model, itertools.cycle(data))
    with pytest.raises(TypeError, match="one-shot"):
        bg.linops.EKFAC(model, loss_fn, _stream(data), num_data=5)
    loader = torch.utils.data.DataLoader(_Endless(X, y), batch_size=2)
    with pytest.raises(ValueError, match="num_data"):
        bg.linops.Hessian(model, loss_fn, loader)
    G = bg.linops.GGN(model, loss_fn, loader, num_data=4)
    with pytest.raises(RuntimeError, match="more than num_data"):
        G @ torch.ones(G.shape[0], dtype=torch.float64)


class _CountingPasses:
    """A re-iterable data set without len() that counts the passes over it."""

    def __init__(self, batches):
        self.batches, self.passes = batches, 0

    def __iter__(self):
        self.passes += 1
        return iter(self.batches)


def test_structured_constructors_stream_the_data_without_extra_passes():
    model, X, y, loss_fn = CASES["mlp"]()
    batches = [(X[:3], y[:3]), (X[3:], y[3:])]
    for cls, passes in ((bg.linops.KFAC, 1), (bg.linops.EKFAC, 2)):
        data = _CountingPasses(batches)
        op = cls(model, loss_fn, data, fisher_type="type-2")
        assert data.passes == passes and op.num_data == 5
        torch.testing.assert_close(
            op.to_dense(), cls(model, loss_fn, batches, fisher_type="type-2").to_dense()
        )
    data = _CountingPasses(batches)
    Diagonal.from_engine(model, loss_fn, data, bg.DiagGGN())
    assert data.passes == 1


def _subnormals(t: torch.Tensor) -> int:
    a = t.abs()
    return int(((a > 0) & (a < torch.finfo(t.dtype).tiny)).sum())


class _MatmulOperands(TorchDispatchMode):
    """Counts the subnormal entries of every matrix product's operands and result."""

    def __init__(self):
        super().__init__()
        self.subnormal, self.products = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func._overloadpacket in (torch.ops.aten.mm, torch.ops.aten.bmm):
            self.products += 1
            self.subnormal += sum(_subnormals(t) for t in (*args[:2], out))
        return out


def _tiny_factors(n: int, g: torch.Generator, scales: list[float]) -> torch.Tensor:
    """SPD float32 factors ``[G, n, n]`` of largest entry ~``scales[g]``, with rows and
    columns a further ``1e-18`` smaller (a confident classifier's output-gradient factor:
    rare classes)."""
    F = _spd((len(scales), n, n), g) * torch.tensor(scales, dtype=torch.float64)[:, None, None]
    rare = torch.ones(n, dtype=torch.float64)
    rare[n // 2 :] = 1e-18
    return (F * rare[:, None] * rare[None, :]).float()


def test_products_with_tiny_kronecker_factors_stay_out_of_the_subnormal_range():
    """float32 factors whose products reach below 1.2e-38 (three groups of different
    scales, entries down to the subnormal range): every matrix product runs on normal numbers
    (copies scaled to unit maximum, the float64 scale applied once) and agrees with float64
    dense products to float32 rounding; Kronecker and KroneckerEigen, one vector and a block."""
    g = torch.Generator().manual_seed(3)
    L, R = _tiny_factors(6, g, [1e-23, 1.0, 1e-10]), _tiny_factors(5, g, [1e-5, 1e-20, 1.0])
    assert _subnormals(L) > 0 and normal_range.needs_scaling(L, R)
    K = Kronecker(L, R)
    left, right, scale = K.product_factors()
    assert scale.dtype == torch.float32 and _subnormals(left) == _subnormals(right) == 0
    torch.testing.assert_close(scale, L.abs().amax((1, 2)) * R.abs().amax((1, 2)))
    dense = torch.block_diag(*(torch.kron(a.double(), b.double()) for a, b in zip(L, R)))
    q_left, q_right = torch.linalg.qr(_spd((3, 6, 6), g))[0], torch.linalg.qr(_spd((3, 5, 5), g))[0]
    values = torch.logspace(-25, -42, 90, dtype=torch.float64).reshape(3, 6, 5)
    E = KroneckerEigen(q_left.float(), values.float(), q_right.float())
    assert _subnormals(E.values) > 0 and E.product_values()[1] is not None
    Q = torch.block_diag(
        *(torch.kron(a, b) for a, b in zip(q_left.float().double(), q_right.float().double()))
    )
    dense_e = Q @ torch.diag(values.float().double().reshape(-1)) @ Q.T
    V = torch.randn(90, 4, generator=g, dtype=torch.float64)
    for op, ref_op, tol in ((K, dense, 1e-6), (E, dense_e, 1e-5)):
        for M in (V[:, :1], V):
            with _MatmulOperands() as seen:
                got = (op @ M.float()).double()
            assert seen.products > 0 and seen.subnormal == 0
            for b in range(3):  # each group to its own float32 rounding
                rows = slice(30 * b, 30 * (b + 1))
                ref = ref_op[rows] @ M
                assert (got[rows] - ref).norm() <= tol * ref.norm()


def test_scaling_keeps_results_that_the_plain_products_get_right():
    """No copies where products cannot come near the subnormal range (ordinary float32
    factors, float64 whatever their size, float16, where scaling cannot help); combined
    scales that float32 could not hold (1e40, 1.4e-45) kept in float64; a factor with an inf
    entry multiplied as it is (scaling would spread NaN); a factor changed in place after a
    product gives a new scaled copy."""
    g = torch.Generator().manual_seed(4)
    L, R = _spd((1, 4, 4), g).float(), _spd((1, 3, 3), g).float()
    left, right, scale = Kronecker(L, R).product_factors()
    assert scale is None and left is L and right is R
    for dtype, size in ((torch.float64, 1e-200), (torch.float16, 1e-3)):
        F = (_spd((1, 3, 3), g) * size).to(dtype)
        assert Kronecker(F, F).product_factors()[2] is None
    F16 = (300 * torch.eye(3) + 0.1).half()[None]
    x = torch.full((9, 1), 1e-3, dtype=torch.float16)
    assert torch.isfinite(Kronecker(F16, F16) @ x).all()
    for s_left, s_right, x_size in ((1e20, 1e20, 1e-10), (1e-23, 1e-22, 1e12)):
        eye = torch.eye(3, dtype=torch.float64)
        Lx, Rx = eye * s_left + 1e-60 * s_left, eye * s_right + 1e-60 * s_right
        K = Kronecker(Lx.float(), Rx.float())
        M = torch.full((9, 2), x_size, dtype=torch.float64)
        ref = torch.kron(Lx.float().double(), Rx.float().double()) @ M
        got = (K @ M.float()).double()
        assert K.product_factors()[2].dtype == torch.float64 and torch.isfinite(got).all()
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=0)
    Linf = _tiny_factors(3, g, [1e-23])
    Linf[0, 0, 0] = float("inf")
    assert not normal_range.needs_scaling(Linf, Linf)
    K = Kronecker(L.clone() * 1e-30, R.clone() * 1e-12)
    v = torch.ones(12, 1, dtype=torch.float32)
    before = K @ v
    K.left.mul_(2.0)
    torch.testing.assert_close(K @ v, 2 * before)
    assert (
        normal_range.scaled_to_unit_max(torch.zeros(1, 3, 3, dtype=torch.float32))[1].item() == 1.0
    )
