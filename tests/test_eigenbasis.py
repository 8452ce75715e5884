"""The shared Kronecker eigenbasis solver (``beyondgrad.linalg.eigenbasis``): closed forms
against dense float64 Kronecker products, and robustness of the eigendecomposition."""

from __future__ import annotations

import pytest
import torch

import beyondgrad as bg
from beyondgrad.linalg import eigenbasis as eb


def _spd(n: int, g: torch.Generator, groups: int = 2) -> torch.Tensor:
    X = torch.randn(groups, n, n + 2, generator=g, dtype=torch.float64)
    return X @ X.mT / n


def _zero_rows_factor() -> torch.Tensor:
    """A float32 input factor of a layer whose inputs are mostly zero: a rank-2 block on 28 of
    128 rows, 1e14 large, and subnormal round-off everywhere else. LAPACK's float32 ``syevd``
    does not converge on it."""
    g = torch.Generator().manual_seed(0)
    n, live = 128, 28
    X = torch.randn(2, live, generator=g, dtype=torch.float32)
    A = 1e-40 * torch.randn(n, n, generator=g, dtype=torch.float32)
    A[:live, :live] += 1e14 * (X.T @ X)
    return (A + A.T) / 2


def test_closed_forms_match_dense_kronecker_products():
    g = torch.Generator().manual_seed(0)
    L, R = _spd(3, g), _spd(4, g)
    ll, ql = eb.symmetric_eigh(L)
    lr, qr = eb.symmetric_eigh(R)
    values = eb.kronecker_eigenvalues(ll, lr)  # [G, 3, 4]
    dense = torch.block_diag(*(torch.kron(a, b) for a, b in zip(L, R)))
    M = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)
    flat = M.reshape(-1, 5)
    torch.testing.assert_close(eb.eigenbasis_apply(ql, values, qr, M).reshape(-1, 5), dense @ flat)
    inv = eb.eigenbasis_apply(ql, eb.damped_inverse(values, 0.3), qr, M).reshape(-1, 5)
    eye = torch.eye(dense.shape[0], dtype=dense.dtype)
    torch.testing.assert_close(inv, torch.linalg.solve(dense + 0.3 * eye, flat))
    torch.testing.assert_close(eb.logdet(values, 0.3), torch.logdet(dense + 0.3 * eye))
    torch.testing.assert_close(eb.unrotate(ql, eb.rotate(ql, M, qr), qr), M)
    with pytest.raises(ValueError, match="increase damping"):
        eb.damped_inverse(values - values.max(), 0.0)
    with pytest.raises(ValueError, match="increase damping"):
        eb.logdet(-values)


def test_rank_deficient_float32_factor_is_decomposed():
    A = _zero_rows_factor()
    plain_fails = False
    try:
        torch.linalg.eigh(A)
    except RuntimeError:
        plain_fails = True
    lam, Q = eb.symmetric_eigh(A)
    assert lam.dtype == Q.dtype == torch.float32
    ref = torch.linalg.eigvalsh(A.double())
    scale = float(ref.abs().max())
    assert float((lam.double() - ref).abs().max()) < 1e-6 * scale
    assert float(((Q * lam) @ Q.T - A).abs().max()) < 1e-6 * scale
    torch.testing.assert_close(Q.T @ Q, torch.eye(128, dtype=Q.dtype), atol=1e-5, rtol=0)
    if not plain_fails:  # the LAPACK build decomposes it: the fallback is tested below
        pytest.skip("torch.linalg.eigh converged on this LAPACK build")


def test_kronecker_factors_and_the_kfac_optimizer_survive_the_failing_factor():
    A = _zero_rows_factor()[None]
    B = _spd(3, torch.Generator().manual_seed(1), groups=1).float()
    block = bg.KroneckerFactors(A, B, "B kron A", ("w",), None, "mc", "expand", 1.0, 1)
    V = torch.randn(3 * 128, 2, dtype=torch.float32)
    damping = 1e10  # float32: a well-conditioned damped system next to eigenvalues ~1e16
    dense = torch.kron(B[0].double(), A[0].double())
    eye = torch.eye(dense.shape[0], dtype=torch.float64)
    ref = torch.linalg.solve(dense + damping * eye, V.double())
    torch.testing.assert_close(block.inverse(damping)(V).double(), ref, rtol=1e-4, atol=1e-16)
    opt = bg.optim.KFAC(torch.nn.Linear(128, 3, bias=False).float(), torch.nn.MSELoss())
    state = {"A": A, "B": B, "order": "B kron A"}
    *_, l_right, q_right = opt._decompose(state, damping)
    torch.testing.assert_close(
        (q_right * l_right.unsqueeze(1)) @ q_right.mT, A.float(), rtol=0, atol=1e-6 * 1e16
    )


def _failing_eigh(fail: set[torch.dtype], shifted_ok: bool, real=torch.linalg.eigh):
    def eigh(M):
        # the shift makes the diagonal nonzero where the input had zeros
        shifted = bool((torch.diagonal(M, dim1=-2, dim2=-1) != 0).all())
        if M.dtype in fail and not (shifted_ok and shifted):
            raise torch.linalg.LinAlgError("injected: failed to converge")
        return real(M)

    return eigh


@pytest.mark.parametrize(
    ("fail", "shifted_ok"),
    [({torch.float32}, False), ({torch.float32, torch.float64}, True)],
)
def test_fallbacks_are_taken_when_the_solver_fails(monkeypatch, fail, shifted_ok):
    g = torch.Generator().manual_seed(2)
    X = torch.randn(5, 3, generator=g, dtype=torch.float64)
    A = torch.zeros(8, 8, dtype=torch.float64)
    A[:5, :5] = X @ X.T  # three zero rows
    monkeypatch.setattr(torch.linalg, "eigh", _failing_eigh(fail, shifted_ok))
    lam, Q = eb.symmetric_eigh(A.float())
    assert lam.dtype == torch.float32
    torch.testing.assert_close((Q * lam) @ Q.T, A.float(), atol=1e-5, rtol=0)
    monkeypatch.undo()
    torch.testing.assert_close(lam.double(), torch.linalg.eigvalsh(A), atol=1e-5, rtol=0)


def test_a_hopeless_matrix_raises_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.linalg, "eigh", _failing_eigh({torch.float32, torch.float64}, False))
    with pytest.raises(eb.EighError, match="add damping"):
        eb.symmetric_eigh(torch.eye(3, dtype=torch.float32))
    monkeypatch.undo()
    with pytest.raises(ValueError, match="non-finite"):
        eb.symmetric_eigh(torch.full((3, 3), float("nan")))
    with pytest.raises(ValueError, match="square"):
        eb.symmetric_eigh(torch.ones(2, 3))
