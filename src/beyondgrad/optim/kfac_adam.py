"""KFACAdam: Adam in the eigenbasis of KFAC's Kronecker factors.

KFAC keeps moving averages of the factors ``A`` and ``B`` of each layer (as :class:`~.KFAC`:
the engine's statistics every ``stats_every`` steps, eigendecompositions every
``refresh_every``), but instead of dividing by the Kronecker eigenvalues ``l_B l_A^T +
damping`` it divides by a running second moment of the gradient *in the factors' eigenbasis*:
for the gradient ``G`` (``[G, rows, cols]`` in the layout of the factors, eigenbases ``Q_L``,
``Q_R`` of the left and right factor)

    R = Q_L^T G Q_R,    v <- beta2 v + (1 - beta2) R * R   (v = R * R at the first step),
    D = Q_L [R / (sqrt(v) + eps)] Q_R^T,

and the step is Adam's: ``m <- momentum m + (1 - momentum) D``, ``p <- p (1 - lr wd) - lr m``.
This is the eigenvalue correction of EKFAC (George et al., 2018: the diagonal of the curvature
in KFAC's eigenbasis re-estimated, there from per-sample gradients) estimated from the
mini-batch gradient with a moving average, as SOAP (Vyas et al., 2024) does in Shampoo's
eigenbasis. The Kronecker eigenvalues only choose the basis; the scale of each direction is
Adam's, so the learning rate is Adam-like (default 3e-3) and no KL clip is needed (off by
default). When a refresh changes the basis, ``v`` is kept (SOAP's choice): it is re-estimated
within ``1 / (1 - beta2)`` steps; with ``basis_update="power"`` the basis moves by one step of
orthogonal iteration and ``v`` follows its columns (:func:`power_basis`). Moving ``v`` into the
new basis (``(P_L * P_L) v (P_R * P_R)^T``, ``P = Q_new^T Q_old``) was tried and trained worse
on char-GPT (2.78 vs 2.58 validation loss after 100 steps, one seed): not offered.
Under ``ownership`` the refreshes are KFAC's (eigendecompositions on the owner rank; only with
``basis_update="eigh"``).

Cost per step: four products per layer (rotate, rotate back) and elementwise work, as KFAC with
eigenvalue damping; layers of one shape refreshed together are rotated in one batched product
and keep their second moments stacked. Statistics and refreshes as KFAC's (the factory's
amortized settings: statistics and a refresh every 20 steps). Measured on the suite's
char-GPT (``benchmarks/results/optim_suite_cpu.md``; ``optim_profile_gpt_cpu.md``: at batch 8 the
step's extra time is the rotations, ~1.4 GFLOP per step, and the refresh's ``eigh``).

Everything else is KFAC's: routing (AdamW fallback for parameters without a Kronecker rule and
tied weights), grafting, clipping, warm-up, ownership, ``state_dict`` (the second moments are
part of each layer's state).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from ..linalg.eigenbasis import symmetric_eigh
from .kfac import KFAC, _grouped
from .schedule import check_every


def eigen_adam(
    M: Tensor, q_left: Tensor, q_right: Tensor, v: Tensor | None, beta2: float, eps: float
) -> tuple[Tensor, Tensor]:
    """One step of Adam's second moment in a Kronecker eigenbasis.

    Args:
        M: gradients ``[L, r, c]``.
        q_left: orthonormal eigenbases ``[L, r, r]``, or ``[L, 0, 0]``: the coordinate axes.
        q_right: ``[L, c, c]`` (or ``[L, 0, 0]``).
        v: the second moments ``[L, r, c]`` in the eigenbasis (updated in place), or None at
            the first step.
        beta2: their decay per step.
        eps: added to ``sqrt(v)``.

    Returns:
        ``(D, v)``: the direction ``Q_L [R / (sqrt(v) + eps)] Q_R^T`` (``[L, r, c]``, in
        ``M``'s dtype) and the second moments.
    """
    R = _rotate(M.to(q_left.dtype), q_left, q_right, inverse=False)
    if v is None:
        v = R.square().to(torch.promote_types(R.dtype, torch.float32))
    else:
        v.mul_(beta2).addcmul_(R, R, value=1 - beta2)
    scaled = R / (v.sqrt() + eps).to(R.dtype)
    return _rotate(scaled, q_left, q_right, inverse=True).to(M.dtype), v


def _rotate(M: Tensor, q_left: Tensor, q_right: Tensor, inverse: bool) -> Tensor:
    """``Q_L^T M Q_R`` (``inverse``: ``Q_L M Q_R^T``); an empty basis (``[L, 0, 0]``, a side
    wider than ``max_basis_dim``) is the coordinate axes: that side is not rotated."""
    if q_left.shape[-1]:
        M = (q_left if inverse else q_left.mT) @ M
    if q_right.shape[-1]:
        M = M @ (q_right.mT if inverse else q_right)
    return M


class KFACAdam(KFAC):
    """``KFACAdam(model, loss_fn, params=None, lr=3e-3, ...)``; see the module docstring.

    Args:
        model: the network.
        loss_fn: the loss module (called inside ``capture()``).
        params: parameters or param groups (default: all trainable parameters of ``model``).
        lr: learning rate (per group; Adam-like).
        momentum: Adam's first-moment decay ``beta1`` (per group).
        beta2: the second moments' decay per step, in ``[0, 1)``.
        eps: added to their square root, positive.
        basis_update: ``"eigh"`` (a fresh eigendecomposition at every refresh; default) or
            ``"power"`` (one step of orthogonal iteration from the previous basis at each
            refresh, from the coordinate axes at the first, as SOAP's refresh; see
            :func:`power_basis`): about 5% less time per step on char-GPT, none on the
            autoencoder (a 1001-wide QR costs about an ``eigh`` there: 96 vs 90 ms per step);
            no difference in quality measurable in 2 seeds x 40 s.
        max_basis_dim: a side of a layer's gradient matrix wider than this keeps the
            coordinate axes (no eigendecomposition, no rotation on that side: Adam there, as
            SOAP's ``max_precond_dim``); None (default): every side is rotated. Rotating costs
            ``~r c (r + c)`` per layer and step for an ``r x c`` gradient: the wide sides of
            wide layers dominate it. For layers too wide to eigendecompose (a large
            vocabulary); on the suite's autoencoder ``max_basis_dim=512`` halves the step (45
            vs 96 ms) but trains far worse (no target in 1,332 steps against the target in 391
            at the tuned configuration, seed 1): the wide sides' bases carry the benefit.
        weight_decay: decoupled weight decay (per group).
        kl_clip: KL trust-region bound as KFAC's, or None (default: off).
        **kfac: every other :class:`~.KFAC` setting (``fisher_type``, ``kfac_approx``,
            ``ema``, ``stats_every``, ``refresh_every``, ``grafting``, ``warmup``,
            ``ownership``, ``preconditioner_dtype``, ``seed``, ``max_update_norm``, the
            fallback's ``adam_*``; ``adam_lr`` defaults to ``lr``); ``damping`` and
            ``damping_mode`` do not apply (the eigenvalues only choose the basis).
    """

    method = "kfac-adam"

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        params: Iterable[Any] | None = None,
        lr: float = 3e-3,
        momentum: float = 0.9,
        beta2: float = 0.95,
        eps: float = 1e-8,
        basis_update: str = "eigh",
        max_basis_dim: int | None = None,
        weight_decay: float = 0.0,
        kl_clip: float | None = None,
        **kfac: Any,
    ):
        for key in ("damping", "damping_mode"):
            if key in kfac:
                raise TypeError(
                    f"KFACAdam takes no {key!r}: the factors' eigenvalues only choose the basis "
                    "(Adam's second moments scale it); see eps"
                )
        if not 0 <= beta2 < 1:
            raise ValueError(f"beta2 must be in [0, 1), got {beta2}")
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps}")
        if basis_update not in ("power", "eigh"):
            raise ValueError(f"basis_update must be 'power' or 'eigh', got {basis_update!r}")
        if basis_update == "power" and kfac.get("ownership") is not None:
            raise ValueError(
                "basis_update='power' needs every rank's previous basis; with ownership= the "
                "owner ranks eigendecompose (use basis_update='eigh')"
            )
        if max_basis_dim is not None:
            check_every("max_basis_dim", max_basis_dim)
        if max_basis_dim is not None and kfac.get("ownership") is not None:
            raise ValueError(
                "max_basis_dim with ownership= is not supported: the owner ranks broadcast full "
                "eigenbases (leave max_basis_dim=None, or drop ownership)"
            )
        self.basis_update, self.max_basis_dim = basis_update, max_basis_dim
        self.beta2, self.eps = beta2, eps
        kfac.setdefault("adam_lr", lr)  # the fallback is Adam too: the same step size
        super().__init__(
            model,
            loss_fn,
            params,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            kl_clip=kl_clip,
            damping_mode="eigen",
            **kfac,
        )

    def _decompose_batches(self, batches: dict[tuple[Any, ...], list[dict[str, Any]]]) -> None:
        """As KFAC's (batched over layers of one shape), except that with
        ``basis_update="power"`` a batch whose layers all have a basis already moves it by one
        step of orthogonal iteration (:func:`power_basis`) and permutes their second moments
        with it."""
        fresh: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
        for key, members in batches.items():
            if self.basis_update == "eigh":
                fresh[key] = members
                continue
            sizes = [self._groups(state) for state in members]
            A = torch.cat([_grouped(state["A"]) for state in members])
            B = torch.cat([_grouped(state["B"]) for state in members])
            left, right = (A, B) if key[3] == "A kron B" else (B, A)
            if all("eig" in s for s in members):
                old = [torch.cat(parts) for parts in zip(*(s["eig"] for s in members))]
                q_old = (old[1], old[3])
            else:  # the first refresh starts from the coordinate axes
                q_old = (_identity(left, self._wide(left)), _identity(right, self._wide(right)))
            l_left, q_left, order_left = self._power_side(left, q_old[0])
            l_right, q_right, order_right = self._power_side(right, q_old[1])
            parts = [t.split(sizes) for t in (l_left, q_left, l_right, q_right)]
            rows, cols = order_left.split(sizes), order_right.split(sizes)
            for i, state in enumerate(members):
                state["eig"] = tuple(part[i] for part in parts)
                _permute_(state.get("second_moment"), rows[i], cols[i])
        super()._decompose_batches(fresh)

    def _wide(self, M: Tensor) -> bool:
        """Whether the factors ``M`` ``[L, d, d]`` are wider than ``max_basis_dim``."""
        return self.max_basis_dim is not None and M.shape[-1] > self.max_basis_dim

    def _power_side(self, M: Tensor, Q: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """:func:`power_basis` of one side, or the coordinate axes where it is too wide."""
        if not self._wide(M):
            return power_basis(M, Q)
        diagonal, axes = _axes(M)
        order = torch.arange(M.shape[-1], device=M.device).expand(M.shape[:2])
        return diagonal, axes, order

    def _decompose_stacked(
        self, A: Tensor, B: Tensor, order: str, damping: float
    ) -> tuple[Tensor, ...]:
        """The factors' eigenbases as KFAC's (``damping`` does not apply: the eigenvalues only
        choose the basis), except that a side wider than ``max_basis_dim`` keeps the coordinate
        axes (an empty basis ``[L, 0, 0]``; its values are the factor's diagonal)."""
        left, right = (A, B) if order == "A kron B" else (B, A)
        parts: list[Tensor] = []
        for M in (left, right):
            if self._wide(M):
                parts += _axes(M)
            else:
                values, basis = symmetric_eigh(M.to(torch.promote_types(M.dtype, torch.float32)))
                parts += [values.clamp(min=0), basis]
        return tuple(parts)

    def _solve_stacked(
        self, M: Tensor, states: list[dict[str, Any]], group: dict[str, Any]
    ) -> Tensor:
        """Adam in the eigenbasis for the layers ``states`` (one, or several of one shape
        refreshed together, in one batched product; their second moments kept stacked)."""
        left, right, _ = self._operator(states, group)
        step = self.__dict__.get("_compiled_eigen_adam")
        if step is None:
            step = self._compiled_eigen_adam = self.compiled(eigen_adam)
        D, v = step(M, left[0], right[0], _stacked(states), self.beta2, self.eps)
        for state, vi in zip(states, v.split([self._groups(s) for s in states])):
            state["second_moment"] = vi
        return D * (1 - group["momentum"])  # Adam's first moment (descend_many_ keeps the sum)


def power_basis(M: Tensor, Q: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One step of orthogonal iteration for symmetric ``M`` ``[L, d, d]`` from the basis ``Q``
    (SOAP's refresh): the columns of ``Q`` sorted by their Rayleigh quotients ``diag(Q^T M Q)``
    (descending), then ``Q_new = qr(M Q_sorted)``. The basis moves toward ``M``'s eigenvectors
    and stays close to the old one, so the second moments estimated in it stay meaningful
    (a fresh ``eigh`` may reorder and remix the directions at every refresh).

    Returns:
        ``(quotients [L, d] (sorted, the old basis'), Q_new [L, d, d], order [L, d])``:
        column ``j`` of the new basis continues column ``order[:, j]`` of the old one.
    """
    work = torch.promote_types(M.dtype, torch.float32)
    M, Q = M.to(work), Q.to(work)
    quotients = (Q * (M @ Q)).sum(-2)
    quotients, order = quotients.sort(-1, descending=True)
    Q = Q.gather(-1, order[:, None, :].expand_as(Q))
    return quotients, torch.linalg.qr(M @ Q)[0], order


def _permute_(v: Tensor | None, rows: Tensor, cols: Tensor) -> None:
    """Reorder the second moments ``v`` ``[G, r, c]`` in place with their basis' columns."""
    if v is None:
        return
    v.copy_(v.gather(-2, rows[:, :, None].expand_as(v)).gather(-1, cols[:, None, :].expand_as(v)))


def _axes(M: Tensor) -> list[Tensor]:
    """The coordinate axes as the basis of the factors ``M`` ``[L, d, d]``: their diagonals
    ``[L, d]`` (the Rayleigh quotients) and an empty basis ``[L, 0, 0]`` (see :func:`_rotate`)."""
    work = torch.promote_types(M.dtype, torch.float32)
    diagonal = torch.diagonal(M, dim1=-2, dim2=-1).to(work)
    return [diagonal, M.new_empty((M.shape[0], 0, 0), dtype=work)]


def _identity(M: Tensor, empty: bool = False) -> Tensor:
    """Identity matrices shaped and typed like ``M`` ``[L, d, d]`` (``empty``: ``[L, 0, 0]``)."""
    if empty:
        return _axes(M)[1]
    eye = torch.eye(M.shape[-1], dtype=torch.promote_types(M.dtype, torch.float32), device=M.device)
    return eye.expand(M.shape).contiguous()


def _stacked(states: list[dict[str, Any]]) -> Tensor | None:
    """The layers' second moments as one ``[L, r, c]`` tensor: the stack they are views of
    when they are all of it, in order (updated in place), else a concatenation; None before
    the first step (any layer without one starts every layer afresh)."""
    vs = [s.get("second_moment") for s in states]
    if any(v is None for v in vs):
        return None
    if len(vs) == 1:
        return vs[0]
    base = vs[0]._base
    if base is not None and base.shape[0] == sum(v.shape[0] for v in vs):
        offsets = [v.storage_offset() for v in vs]
        stride = base.stride(0)
        expected = [base.storage_offset() + stride * k for k in _starts(vs)]
        if all(v._base is base for v in vs) and offsets == expected:
            return base
    return torch.cat(vs)


def _starts(vs: list[Tensor]) -> list[int]:
    starts, k = [], 0
    for v in vs:
        starts.append(k)
        k += v.shape[0]
    return starts


__all__ = ["KFACAdam", "eigen_adam", "power_basis"]
