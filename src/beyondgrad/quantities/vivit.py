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
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..engine import GRAD, Needs, ReduceContext, Statistics
from ..forms import Form
from .curvature import Curvature


@dataclass
class GGNEigenResult:
    """Eigenpairs of the GGN of one parameter group (eigenvalues descending).

    Args:
        eigenvalues: ``[k]``, descending, all positive (null directions are dropped).
        eigenvectors: ``{parameter name: [k, *shape]}``; row ``j`` of every entry together
            is the unit eigenvector ``e_j``.
        first_derivatives: ``[N, k]``, ``<g_n, e_j>`` for the per-sample gradients ``g_n``
            (reduction included, so they sum to ``<grad, e_j>``).
        second_derivatives: ``[N, k]``, ``e_j^T G_n e_j`` for the per-sample GGNs ``G_n``
            (they sum to ``lambda_j``).
    """

    eigenvalues: Tensor  # [k]
    eigenvectors: dict[str, Tensor]  # name -> [k, *shape]
    first_derivatives: Tensor  # [N, k]
    second_derivatives: Tensor  # [N, k]

    @property
    def gradient_projection(self) -> Tensor:
        """``<grad, e_j>`` (over the samples used), ``[k]``."""
        return self.first_derivatives.sum(0)

    def newton_step(self, damping: float = 0.0) -> dict[str, Tensor]:
        """The damped Newton step in the eigenbasis, per parameter.

        Args:
            damping: added to every eigenvalue; ``eigenvalues + damping`` must be positive.

        Returns:
            ``{name: -sum_j <grad, e_j> / (lambda_j + damping) e_j}``, parameter-shaped.
        """
        denom = self.eigenvalues + damping
        if bool((denom <= 0).any()):
            raise ValueError("eigenvalues + damping must be positive")
        coeff = -self.gradient_projection / denom
        return {n: torch.tensordot(coeff, e, dims=1) for n, e in self.eigenvectors.items()}


def _gram_eigen(forms: list[Form], top_k: int | None) -> tuple[Tensor, Tensor]:
    """Eigenpairs of the Gram matrix ``sum_f V_f^T V_f`` of ``forms`` (the rows of one
    parameter group): eigenvalues descending and above round-off (``eps R max|lambda|``),
    at most ``top_k`` of them, ``[k]``, and their eigenvectors ``[R, k]``."""
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
    return lam[:keep], U[:, :keep]


def ggn_eigen(
    curvature: dict[str, Form],
    gradient: dict[str, Form],
    top_k: int | None,
) -> GGNEigenResult:
    """Eigen-decomposition for the parameters in ``curvature`` (name -> form of the curvature
    vectors) with per-sample gradient forms ``gradient`` (same names, one vector)."""
    forms = list(curvature.values())
    lam, U = _gram_eigen(forms, top_k)
    keep = len(lam)
    scaled = U / lam.sqrt()
    vectors = {n: f.combine(scaled) for n, f in curvature.items()}
    K, N = forms[0].vectors, forms[0].num_samples
    cross = sum(gradient[n].cross_dot(f) for n, f in curvature.items())  # [N, R]
    first = cross @ scaled
    second = U.reshape(K, N, keep).pow(2).sum(0) * lam
    return GGNEigenResult(lam, vectors, first, second)


@dataclass(frozen=True)
class SqrtGGN(Curvature):
    """The GGN factor ``V`` with ``GGN = V V^T`` (the basis of ViViT), per parameter
    ``[K, N, *shape]``: K = outputs per sample (exact; cross-entropy: ``C - 1`` per position, the
    rank of the softmax Hessian) or ``mc_samples`` (MC). Flattening the
    first two axes and the parameters, ``V^T V`` is the Gram matrix of the GGN.

    Args:
        mc_samples: ``None`` for the exact GGN, else sampled labels per sample (MC Fisher).
        max_vectors: exact mode refuses samples with more model outputs than this.
    """

    def reduce(self, form: Form, ctx: ReduceContext, out: Tensor | None = None) -> Tensor:
        """The rows, split into vectors and samples.

        Args:
            form: the parameter's form (restricted to the subsample).
            ctx: batch size and loss reduction (unused).
            out: ignored; a new tensor is returned.

        Returns:
            ``[K, N, *shape]``: ``K`` vectors per sample (outputs, or ``mc_samples``).
        """
        return form.batch_grad().reshape(form.vectors, form.num_samples, *form.shape)


@dataclass(frozen=True)
class _GroupedEigen(Curvature):
    """The fields both eigen-quantities share: ``top_k`` leading eigenvalues kept (None: all
    above round-off) of each group in ``param_groups`` (None: the whole model)."""

    top_k: int | None = None
    param_groups: tuple[tuple[str, ...], ...] | None = None
    #: before the other curvature reductions of the same vectors: where the Gram matrix is
    #: cheaper from materialized rows (convolutions), those rows stay for e.g. DiagGGN's
    #: sums of squares, which would otherwise materialize them again chunk by chunk
    order: ClassVar[int] = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"top_k must be None or a positive int, got {self.top_k!r}")


@dataclass(frozen=True)
class GGNEigen(_GroupedEigen):
    """ViViT: exact eigenpairs of the GGN (or MC Fisher) from the Gram matrix of its factor,
    with per-sample first/second directional derivatives and the damped Newton step along
    them (:class:`GGNEigenResult`).

    ``top_k``: keep the leading eigenpairs (default: all nonzero ones). ``param_groups``:
    tuples of parameter names, one eigenproblem each (default: the whole model, key
    ``"model"``; groups are keyed ``"group0"``, ...). With ``subsampling`` (and MC) the GGN is
    that of the selected samples' rows (unchanged scale): a cheaper approximation. The result
    maps each group key to a ``GGNEigenResult``.

    Args:
        mc_samples: ``None`` for the exact GGN, else sampled labels per sample (MC Fisher).
        max_vectors: exact mode refuses samples with more model outputs than this.
        top_k: number of leading eigenpairs kept.
        param_groups: the parameter-name groups, one eigenproblem each.
    """

    def needs(self) -> Needs:
        """The curvature vectors and the loss gradient (for the directional derivatives)."""
        return Needs(kinds=(self.vectors, GRAD), max_vectors=self.max_vectors)

    def compute(
        self, stats: Statistics, prepared: Any = None, out: dict | None = None
    ) -> dict[str, GGNEigenResult]:
        """One :class:`GGNEigenResult` per parameter group.

        Args:
            stats: the engine's statistics (curvature and loss-gradient forms).
            prepared: unused.
            out: unused.

        Returns:
            ``{"model": result}``, or ``{"group0": ..., "group1": ...}`` with ``param_groups``.

        Raises:
            KeyError: a group names an unknown parameter.
            ValueError: no parameter of a group reaches the loss.
        """
        result: dict[str, GGNEigenResult] = {}
        for key, group in _groups(stats, self.param_groups, (self.vectors, GRAD), "GGNEigen"):
            curvature = {name: forms[0] for name, forms in group.items()}
            gradient = {name: forms[1] for name, forms in group.items()}
            result[key] = ggn_eigen(curvature, gradient, self.top_k)
        return result


@dataclass(frozen=True)
class GGNSpectrum(_GroupedEigen):
    """The leading eigenvalues of the GGN (or MC Fisher) per parameter group, from the Gram
    matrix of its factor alone: :class:`GGNEigen`'s eigenvalues without its eigenvectors and
    directional derivatives, so the loss gradient is not backpropagated with the curvature
    vectors and nothing parameter-sized is formed from the Gram's eigenvectors (the Cockpit's
    per-layer spectra).

    Args:
        mc_samples: ``None`` for the exact GGN, else sampled labels per sample (MC Fisher).
        max_vectors: exact mode refuses samples with more model outputs than this.
        top_k: number of leading eigenvalues kept (default: all above round-off).
        param_groups: the parameter-name groups, one eigenproblem each (keys as
            :class:`GGNEigen`'s: ``"model"``, or ``"group0"``, ...).
    """

    def needs(self) -> Needs:
        """The curvature vectors only."""
        return Needs(kinds=(self.vectors,), max_vectors=self.max_vectors)

    def compute(
        self, stats: Statistics, prepared: Any = None, out: dict | None = None
    ) -> dict[str, Tensor]:
        """Per parameter group the eigenvalues, descending and positive, ``[k]``.

        Args:
            stats: the engine's statistics (curvature forms).
            prepared: unused.
            out: unused.

        Returns:
            ``{"model": eigenvalues}``, or ``{"group0": ..., ...}`` with ``param_groups``.

        Raises:
            KeyError: a group names an unknown parameter.
            ValueError: no parameter of a group reaches the loss.
        """
        return {
            key: _gram_eigen([forms[0] for forms in group.values()], self.top_k)[0]
            for key, group in _groups(stats, self.param_groups, (self.vectors,), "GGNSpectrum")
        }


def _groups(
    stats: Statistics,
    param_groups: tuple[tuple[str, ...], ...] | None,
    kinds: tuple[Any, ...],
    owner: str,
) -> list[tuple[str, dict[str, list[Form]]]]:
    """Per group (key ``"model"`` or ``"group<i>"``) the per-sample forms of each of its
    served parameters, one per vector kind in ``kinds``.

    Raises:
        KeyError: a group names an unknown parameter.
        ValueError: no parameter of a group reaches the loss.
    """
    served = set(stats.parameters)
    known = {name for name, _ in stats.model.named_parameters()}
    out = []
    for i, group in enumerate(param_groups or (tuple(stats.parameters),)):
        forms: dict[str, list[Form]] = {}
        for name in group:
            if name not in known:
                raise KeyError(f"{owner}: unknown parameter {name!r}")
            found = [stats.form(name, kind, True) if name in served else None for kind in kinds]
            if all(f is not None for f in found):
                forms[name] = found  # type: ignore[assignment]
        if not forms:
            raise ValueError(f"{owner}: no parameter of group {i} reaches the loss")
        out.append(("model" if param_groups is None else f"group{i}", forms))
    return out
