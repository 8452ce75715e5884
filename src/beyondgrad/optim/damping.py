"""Damping: the regularization ``damping * I`` that keeps a preconditioner invertible.

Three forms, one knob (``damping``, a param-group setting that schedulers and checkpoints may
change):

- eigen-damping (KFAC ``damping_mode="eigen"``): the exact inverse of ``B kron A + damping I``
  from the factors' eigendecompositions, :func:`eigen_damped_solve`;
- factored (pi) damping (KFAC ``damping_mode="pi"``): ``damping`` split over the two factors
  before they are decomposed (``KFAC._decompose``); the solve then uses ``delta = 0``;
- trace-coupled damping of the inverse-free factor updates (SINGD, SIRFShampoo): the damping
  term of factor ``n`` is ``damping * prod_{j != n} tr(K_j^T K_j) / d_j``
  (:func:`trace_coupled`), the Kronecker-product analogue of adding ``damping I`` to the
  whole curvature.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from ..linalg.eigenbasis import eigenbasis_apply, kronecker_eigenvalues


def check_damping(value: float, positive: bool, owner: str) -> None:
    """Raise ``ValueError`` unless ``value`` is positive (``positive=True``) or non-negative."""
    if value < 0 or (positive and value == 0) or value != value:
        need = "positive" if positive else "non-negative"
        raise ValueError(f"{owner}: damping must be {need}, got {value}")


def eigen_damped_solve(eig: tuple[Tensor, ...], M: Tensor, delta: float) -> Tensor:
    """``Q_L [(Q_L^T M Q_R) / (l_L l_R^T + delta)] Q_R^T`` per group: the solve with a damped
    Kronecker product from its factors' eigendecompositions.

    Args:
        eig: ``(l_left [G, r], Q_left [G, r, r], l_right [G, c], Q_right [G, c, c])``, the
            eigenpairs of the factors acting on the rows and the columns of ``M``.
        M: ``[G, r, c]``, e.g. a layer's gradient in its factor layout.
        delta: added to every eigenvalue product (0 for pi-damped factors).

    Returns:
        ``[G, r, c]`` in ``M``'s dtype (computed in the eigenvectors' dtype).
    """
    l_left, q_left, l_right, q_right = eig
    values = 1.0 / (kronecker_eigenvalues(l_left, l_right) + delta)  # no host sync per step
    out = eigenbasis_apply(q_left, values, q_right, M.to(q_left.dtype)[..., None])
    return out[..., 0].to(M.dtype)


def trace_coupled(mean_traces: Sequence[float], damping: float) -> list[float]:
    """The damping coefficient of every factor of a Kronecker product of ``len(mean_traces)``
    factors: ``damping * prod_{j != n} mean_traces[j]``.

    Args:
        mean_traces: per factor ``tr(K_j^T K_j) / d_j`` (1.0 for an uncoupled variant).
        damping: the damping.

    Returns:
        One coefficient per factor.
    """
    out = []
    for n in range(len(mean_traces)):
        others = 1.0
        for j, tr in enumerate(mean_traces):
            if j != n:
                others *= tr
        out.append(damping * others)
    return out


__all__ = ["check_damping", "eigen_damped_solve", "trace_coupled"]
