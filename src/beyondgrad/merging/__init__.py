"""Merging models of one architecture with curvature: weighted averaging, Fisher merging
(diagonal or Kronecker-factored Fishers from the engine) and RegMean (per-layer input Gram
matrices, the KFAC ``A`` factors), and the merge weights chosen on data
(:func:`select_weights`). See :mod:`beyondgrad.merging.merge` for the conventions."""

from .curvature import (
    FISHERS,
    Gram,
    KroneckerFisher,
    as_batches,
    diagonal_fisher,
    input_grams,
    kronecker_fisher,
    mean_loss,
    sum_loss,
)
from .merge import (
    average,
    average_state_dicts,
    check_compatible,
    fisher_average,
    fisher_merge,
    kfac_fisher_average,
    kfac_merge_layer,
    merge_weights,
    regmean,
    regmean_average,
    regmean_layer,
)
from .select import SHARES, select_weights, weight_candidates

__all__ = [
    "FISHERS",
    "SHARES",
    "Gram",
    "KroneckerFisher",
    "as_batches",
    "average",
    "average_state_dicts",
    "check_compatible",
    "diagonal_fisher",
    "fisher_average",
    "fisher_merge",
    "input_grams",
    "kfac_fisher_average",
    "kfac_merge_layer",
    "kronecker_fisher",
    "mean_loss",
    "merge_weights",
    "regmean",
    "regmean_average",
    "regmean_layer",
    "select_weights",
    "sum_loss",
    "weight_candidates",
]
