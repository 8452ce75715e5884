"""Influence functions on the library's curvature: ``bg.influence.scores`` and friends (see
:mod:`beyondgrad.influence.influence` for the conventions)."""

from .influence import (
    CURVATURES,
    InfluenceFactors,
    example_gradients,
    fit_factors,
    progress_bar,
    scores,
    self_influence,
    top_k,
)

__all__ = [
    "CURVATURES",
    "InfluenceFactors",
    "example_gradients",
    "fit_factors",
    "progress_bar",
    "scores",
    "self_influence",
    "top_k",
]
