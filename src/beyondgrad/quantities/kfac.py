"""KFAC: Kronecker-factored curvature, one block per module, from the engine's raw Kronecker
sums (:meth:`~beyondgrad.engine.Statistics.kronecker`); the diagonal of the same curvature for
modules without Kronecker structure."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..engine import GRAD, Needs, Statistics, VectorKind
from ..factors import DiagonalFactors, KroneckerFactors
from ..rules.kronecker import KronStats
from .base import Quantity

FISHER_TYPES = ("type-2", "mc", "empirical", "forward-only")
KFAC_APPROX = ("expand", "reduce")


@dataclass(frozen=True)
class KFAC(Quantity):
    """Kronecker-factored curvature, one block per module (keyed by module name):
    :class:`~beyondgrad.factors.KroneckerFactors` for Linear, Conv1/2/3d, ConvTranspose1/2/3d
    and Embedding layers, :class:`~beyondgrad.factors.DiagonalFactors` (the diagonal of the
    same curvature) for every other layer with parameters.

    Args:
        fisher_type: ``"type-2"`` (exact loss-Hessian vectors: KFLR / the GGN), ``"mc"``
            (``mc_samples`` sampled labels), ``"empirical"`` (the observed labels'
            gradients), ``"forward-only"`` (``B = I``).
        kfac_approx: ``"expand"`` treats a weight-sharing axis (sequence positions, conv
            positions) as data; ``"reduce"`` averages inputs and sums output gradients over it
            first (conv inputs via index patterns, never unfolding).
        mc_samples: labels drawn per sample for ``"mc"``.
        bias: ``"joint"`` (the bias extends ``A``) or ``"separate"``.
        max_vectors: limit on exact vectors per sample (``"type-2"``).
        diagonal_fallback: ``False`` skips layers without Kronecker structure (no block, and
            no backward work for them).
        keep_sums: ``True`` leaves the raw sums cached in the result's statistics
            (``res.stats.kronecker`` then costs nothing) at one copy per factor; by default the
            factors are normalized in the sums' own storage and a later ``kronecker`` call
            recomputes the sums.

    Scales: ``A`` is the mean of the (bias-augmented) inputs' outer products over the
    ``count`` rows; ``B`` the sum over the backpropagated vectors' output-gradient outer
    products, on the loss's scale (see :mod:`beyondgrad.factors`).
    """

    fisher_type: str = "mc"
    kfac_approx: str = "expand"
    mc_samples: int = 1
    bias: str = "joint"
    max_vectors: int = 256
    diagonal_fallback: bool = True
    keep_sums: bool = False

    per_sample: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.fisher_type not in FISHER_TYPES:
            raise ValueError(f"fisher_type must be one of {FISHER_TYPES}, got {self.fisher_type!r}")
        if self.kfac_approx not in KFAC_APPROX:
            raise ValueError(f"kfac_approx must be one of {KFAC_APPROX}, got {self.kfac_approx!r}")
        if self.bias not in ("joint", "separate"):
            raise ValueError(f"bias must be 'joint' or 'separate', got {self.bias!r}")
        if not isinstance(self.mc_samples, int) or self.mc_samples < 1:
            raise ValueError(f"mc_samples must be a positive int, got {self.mc_samples!r}")

    @property
    def vectors(self) -> VectorKind:
        """``("exact", 0)``, ``("mc", M)`` or ``("grad", 1)`` (empirical, forward-only)."""
        return {"type-2": ("exact", 0), "mc": ("mc", self.mc_samples)}.get(self.fisher_type, GRAD)

    def needs(self) -> Needs:
        """The vectors of ``fisher_type``; only Kronecker layers without the fallback."""
        return Needs(
            kinds=(self.vectors,),
            kronecker_only=not self.diagonal_fallback,
            max_vectors=self.max_vectors,
            independent_samples=False,  # an approximation defined by its procedure
        )

    def compute(
        self, stats: Statistics, prepared: Any = None, out: dict | None = None
    ) -> dict[str, Any]:
        """``{module name: KroneckerFactors | DiagonalFactors}``.

        Args:
            stats: the engine's statistics (Kronecker sums and forms per module).
            prepared: unused.
            out: unused.

        Returns:
            One block per module with parameters that the loss reaches (Kronecker layers, and
            the others if ``diagonal_fallback``).
        """
        blocks: dict[str, Any] = {}
        for module in stats.modules:
            if stats.has_kronecker(module):
                # the sums are ours: normalized in place (a copy of each factor is a fresh
                # allocation, page-faulted in on every call for the large ones)
                own = not self.keep_sums
                key = (module, self.vectors, self.kfac_approx)
                sums = stats.take_kronecker(*key) if own else stats.kronecker(*key)
                if sums is not None:
                    blocks[module] = self.factors(sums, stats, module, in_place=own)
            elif self.diagonal_fallback:
                blocks[module] = self._diagonal(stats, module)
        return blocks

    def factors(
        self, sums: KronStats, stats: Statistics, module: str, in_place: bool = False
    ) -> KroneckerFactors:
        """Normalize raw Kronecker sums into this quantity's factors for ``module``.

        Args:
            sums: the raw sums of one module: ``A_sum`` over ``count`` rows, ``B_sum`` over
                the backpropagated vectors.
            stats: the batch's statistics (reduction factor ``R``, sample count, parameters).
            module: the module name.
            in_place: normalize ``sums``' tensors in place (they become the factors' storage).

        Returns:
            The factors: ``A = A_sum / count``; ``B = B_sum`` on the loss's scale (divided
            by ``R`` for ``"empirical"``, the identity for ``"forward-only"``).
        """
        R, N = stats.reduction_factor, stats.num_samples
        local = stats.module_parameters(module)
        A = sums.A_sum.div_(sums.count) if in_place else sums.A_sum / sums.count
        B = sums.B_sum
        if self.fisher_type == "empirical":  # the loss-gradient vectors carry R twice
            B = B.div_(R) if in_place else B / R
        elif self.fisher_type == "forward-only":
            B = torch.eye(B.shape[-1], dtype=B.dtype, device=B.device).expand_as(B).clone()
        bias_mode: str | None = self.bias if "bias" in local else None
        bias_block = None
        if bias_mode == "separate":
            bias_block = B * A[:, -1:, -1:]
            A = A[:, :-1, :-1]
        squeeze = A.shape[0] == 1
        return KroneckerFactors(
            A[0] if squeeze else A,
            B[0] if squeeze else B,
            sums.order,
            tuple(local.values()),
            bias_mode,
            self.fisher_type,
            self.kfac_approx,
            R,
            N,
            (bias_block[0] if squeeze else bias_block) if bias_block is not None else None,
            sums.weight_perm,
        )

    def _diagonal(self, stats: Statistics, module: str) -> DiagonalFactors:
        if self.fisher_type == "forward-only":
            raise NotImplementedError(
                f"KFAC(fisher_type='forward-only') has no fallback for module "
                f"'{module}' (rule {stats.rule_name(module)}); use another fisher_type"
            )
        R = stats.reduction_factor
        diag = {}
        for name in stats.module_parameters(module).values():
            form = stats.form(name, self.vectors)
            value = (
                form.sum_grad_squared()
                if form is not None
                else torch.zeros_like(stats.parameter(name))
            )
            diag[name] = value / R if self.fisher_type == "empirical" else value
        return DiagonalFactors(diag, self.fisher_type, R, stats.num_samples)
