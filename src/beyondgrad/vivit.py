"""ViViT: exact GGN eigenpairs, directional derivatives and damped Newton steps from the Gram
matrix of the GGN factor.

With ``GGN = V V^T`` (``V``: ``[P, R]``, one column per backpropagated vector and sample, the
rows of the forms) the nonzero eigenvalues of the GGN are those of the ``R x R`` Gram matrix
``V^T V = U diag(lambda) U^T``, accumulated parameter by parameter from the forms (Gram tricks,
``V`` never stored), and the eigenvectors are ``e_j = V u_j / sqrt(lambda_j)``. Along ``e_j``:

* first directional derivatives of the per-sample losses: ``gamma_nj = <g_n, e_j>`` (``g_n`` the
  per-sample gradients, reduction included, so ``sum_n gamma_nj = <grad, e_j>``);
* second: ``lambda_nj = e_j^T GGN_n e_j = lambda_j sum_k u_{(k,n),j}^2`` (sum over n: lambda_j);
* the damped Newton step in the subspace: ``-sum_j <grad, e_j> / (lambda_j + damping) e_j``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .forms import Form


@dataclass
class GGNEigenResult:
    """Eigenpairs of the GGN of one parameter group (eigenvalues descending)."""

    eigenvalues: Tensor  # [k]
    eigenvectors: dict[str, Tensor]  # name -> [k, *shape]
    first_derivatives: Tensor  # [N, k]
    second_derivatives: Tensor  # [N, k]

    @property
    def gradient_projection(self) -> Tensor:
        """``<grad, e_j>`` (over the samples used), ``[k]``."""
        return self.first_derivatives.sum(0)

    def newton_step(self, damping: float = 0.0) -> dict[str, Tensor]:
        """``-sum_j <grad, e_j> / (lambda_j + damping) e_j`` per parameter."""
        denom = self.eigenvalues + damping
        if bool((denom <= 0).any()):
            raise ValueError("eigenvalues + damping must be positive")
        coeff = -self.gradient_projection / denom
        return {n: torch.tensordot(coeff, e, dims=1) for n, e in self.eigenvectors.items()}


def ggn_eigen(
    curvature: dict[str, Form],
    gradient: dict[str, Form],
    top_k: int | None,
) -> GGNEigenResult:
    """Eigen-decomposition for the parameters in ``curvature`` (name -> form of the curvature
    vectors) with per-sample gradient forms ``gradient`` (same names, one vector)."""
    forms = list(curvature.values())
    gram = sum((f.batch_dot() for f in forms[1:]), forms[0].batch_dot())
    lam, U = torch.linalg.eigh(gram)
    lam, U = lam.flip(0), U.flip(1)
    tol = (
        lam.abs().max().clamp_min(torch.finfo(lam.dtype).tiny)
        * torch.finfo(lam.dtype).eps
        * gram.shape[0]
    )
    keep = int((lam > tol).sum())
    if top_k is not None:
        keep = min(keep, top_k)
    lam, U = lam[:keep], U[:, :keep]
    scaled = U / lam.sqrt()
    vectors = {n: f.combine(scaled) for n, f in curvature.items()}
    K, N = forms[0].vectors, forms[0].num_samples
    cross = sum(gradient[n].cross_dot(f) for n, f in curvature.items())  # [N, R]
    first = cross @ scaled
    second = U.reshape(K, N, keep).pow(2).sum(0) * lam
    return GGNEigenResult(lam, vectors, first, second)
