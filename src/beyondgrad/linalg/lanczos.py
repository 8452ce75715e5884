"""The Lanczos process with partial reorthogonalization (Simon 1984), shared by ``eigsh`` and
the spectral densities.

Full reorthogonalization reads the whole basis twice per step: on large models that pass is
memory-bound and costs as much as a Hessian-vector product. Simon's recurrence instead
tracks estimates ``omega_k ~ q_{j+1}^T q_k`` of the loss of orthogonality from the
tridiagonal coefficients alone (O(j) scalar work per step) and reorthogonalizes against the
whole basis only when an estimate exceeds ``sqrt(eps)`` (then also at the next step, as the
semi-orthogonality argument requires). Semi-orthogonality (``|q_i^T q_k| <= sqrt(eps)``)
keeps the tridiagonal's Ritz values accurate to working precision, without ghost copies.
``reorthogonalize="full"`` reorthogonalizes every step (twice where the first pass removed
most of the vector).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class Lanczos:
    """Runs Lanczos on the symmetric ``A`` from the unit vector ``q`` (``[n]``).

    After ``m`` calls of :meth:`step`, ``alpha[:m]``/``beta[:m]`` hold the tridiagonal
    (``beta[m-1]``: the norm of the next residual) and ``basis(m)`` the ``[m, n]`` Lanczos
    vectors. ``reorthogonalizations`` counts the full passes over the basis. ``threshold``
    (default ``sqrt(eps)``): the estimated loss of orthogonality that triggers a full pass."""

    def __init__(
        self,
        A: Any,
        q: Tensor,
        max_steps: int,
        reorthogonalize: str = "partial",
        threshold: float | None = None,
    ):
        if reorthogonalize not in ("partial", "full"):
            raise ValueError(
                f"reorthogonalize must be 'partial' or 'full', got {reorthogonalize!r}"
            )
        self.A, self.full = A, reorthogonalize == "full"
        self.max_steps = max_steps
        n, dtype, device = q.shape[0], q.dtype, q.device
        # rows: basis vectors, grown by doubling (a [max_steps + 1, n] buffer up front costs
        # more than the products on large models)
        self.Q = torch.empty(min(max_steps + 1, 24), n, dtype=dtype, device=device)
        self.Q[0] = q
        self.alpha = torch.zeros(max_steps, dtype=dtype, device=device)
        self.beta = torch.zeros(max_steps, dtype=dtype, device=device)
        self.m = 0
        self.eps = torch.finfo(dtype).eps
        # semi-orthogonality keeps Ritz values at working precision, Ritz vectors at about
        # the threshold: callers wanting more accurate vectors pass a smaller one
        self.threshold = self.eps**0.5 if threshold is None else max(threshold, self.eps)
        self.reorthogonalizations = 0
        self._alpha: list[float] = []  # host copies for the omega recurrence
        self._beta: list[float] = []
        self._omega_prev: list[float] = []
        self._omega = [1.0]
        self._norm = 0.0  # running estimate of |A|
        self._force = False

    def basis(self, m: int | None = None) -> Tensor:
        return self.Q[: self.m if m is None else m]

    def _reorthogonalize(self, w: Tensor, upto: int) -> Tensor:
        basis = self.Q[:upto]
        before = w.norm()
        w.addmv_(basis.T, basis @ w, alpha=-1)
        if w.norm() < 0.7 * before:  # "twice is enough" (Kahan-Parlett)
            w.addmv_(basis.T, basis @ w, alpha=-1)
        self.reorthogonalizations += 1
        return w

    def step(self) -> bool:
        """One product and one new basis vector; False at an invariant subspace (``beta``
        zero relative to ``|A|``) or when ``max_steps`` is reached."""
        j = self.m
        if j >= self.max_steps:
            return False
        q = self.Q[j]
        w = (self.A @ q).detach()
        # updated in place (on large operators every temporary is a fresh allocation), so the
        # product must be ours to modify: beyondgrad operators return new tensors
        fresh = getattr(self.A, "returns_new_tensors", False) and w.data_ptr() != q.data_ptr()
        if not fresh or not w.is_contiguous():
            w = w.clone()
        if j > 0:
            w.add_(self.Q[j - 1], alpha=-self._beta[-1])
        a = float(q @ w)
        w.add_(q, alpha=-a)
        w.add_(q, alpha=-float(q @ w))  # local reorthogonalization: q_{j+1}^T q_j at round-off
        self.alpha[j] = a
        reorth = self.full or self._force
        if not reorth and j > 0:
            omega = self._next_omega(j, a, float(w.norm()))
            reorth = max(abs(x) for x in omega[: j + 1]) > self.threshold
        if reorth:
            w = self._reorthogonalize(w, j + 1)
        b = float(w.norm())
        self.beta[j] = b
        self.m = j + 1
        self._alpha.append(a)
        self._beta.append(b)
        self._norm = max(self._norm, abs(a) + b + (self._beta[-2] if j else 0.0))
        if reorth:
            # semi-orthogonal again; the next vector is reorthogonalized too
            self._force = not self._force and not self.full
            self._omega_prev, self._omega = self._omega, [self.eps] * (j + 1) + [1.0]
        elif j == 0:
            self._omega_prev, self._omega = self._omega, [self.eps, 1.0]
        else:
            self._omega_prev, self._omega = self._omega, self._pending
        if b <= self.eps * max(self._norm, self.eps):
            return False
        if j + 1 == self.Q.shape[0]:
            grow = min(self.Q.shape[0], self.max_steps + 1 - self.Q.shape[0])
            self.Q = torch.cat([self.Q, torch.empty_like(self.Q[:grow])])
        torch.div(w, b, out=self.Q[j + 1])
        return True

    def _next_omega(self, j: int, a: float, b: float) -> list[float]:
        """Simon's recurrence: estimates of ``q_{j+1}^T q_k`` (k <= j) from the coefficients;
        ``b``: the norm of the new residual before normalization."""
        alpha, beta = [*self._alpha, a], self._beta
        om, om_prev = self._omega, self._omega_prev  # omega_{j, .}, omega_{j-1, .}
        b = max(b, self.eps * max(self._norm, torch.finfo(torch.float64).tiny))
        noise = self.eps * max(self._norm, abs(a))
        out = []
        for k in range(j):
            t = beta[k] * om[k + 1] + (alpha[k] - a) * om[k] - beta[j - 1] * om_prev[k]
            if k > 0:
                t += beta[k - 1] * om[k - 1]
            t = (t + (noise if t >= 0 else -noise)) / b
            out.append(t)
        out.append(self.eps)  # against q_j: reorthogonalized locally
        self._pending = [*out, 1.0]
        return out


def tridiagonal(alpha: Tensor, beta: Tensor) -> Tensor:
    """The symmetric tridiagonal matrix with diagonal ``alpha`` and off-diagonal ``beta``."""
    T = torch.diag(alpha)
    if beta.numel():
        T = T + torch.diag(beta, 1) + torch.diag(beta, -1)
    return T
