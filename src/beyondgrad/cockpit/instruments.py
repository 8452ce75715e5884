"""The instruments: small self-contained objects, each with its needs, formula and panel.

An :class:`Instrument` declares which of the step's shared reductions it reads (``needs``,
names from :mod:`beyondgrad.cockpit.reductions`), a pure ``formula`` from those reductions
to the values it logs, and the dashboard :class:`~beyondgrad.cockpit.panels.Panel` it is
drawn in. The Cockpit gathers the union of its instruments' needs, computes each reduction
once per tracked step, then evaluates the formulas. Adding an instrument is one object here
and its name in a preset (or pass the object itself in ``Cockpit(config=[...])``).

Notation (one tracked step, batch of ``B`` samples, ``D`` parameters): ``g_n`` the gradient
of sample ``n``'s loss ``l_n``, scaled so that the mini-batch loss is ``mean_n l_n`` and its
gradient ``g = mean_n g_n`` (for ``reduction="sum"`` losses the same per-sample gradients are
used, so ``g`` is the sum divided by ``B``). All statistics are reduced layer by layer from the
engine's per-sample rows; per-sample gradients are never all materialized.

When the model couples its samples (BatchNorm in train mode, ``Embedding(scale_grad_by_freq=
True)``), per-sample gradients are undefined: the instruments that read them (every one but
Loss, GradNorm, Distance, UpdateSize and HessMaxEV) are not logged for that step, with a
warning (``Cockpit(on_undefined="raise")`` raises instead).

=================  =================================================================  ========
instrument         value                                                              preset
=================  =================================================================  ========
Loss               mini-batch loss                                                    economy
GradNorm           ``||g||`` (and per layer)                                          economy
Distance           ``||theta_t - theta_0||`` (and per layer)                          economy
UpdateSize         ``||theta_{t+1} - theta_t||`` (and per layer)                      economy
Alpha              normalized step length of the update from the previous step: a    economy
                   quadratic fitted to the losses and directional derivatives at
                   both ends (weighted by their sampling variances); -1 = no
                   progress, 0 = valley floor, 1 = the opposite slope at equal height
NormTest           ``sqrt(sum_n ||g_n - g||^2 / (B (B-1))) / ||g||``                  economy
InnerTest          ``sqrt(sum_n (g_n.g - ||g||^2)^2 / (B (B-1))) / ||g||^2``          economy
OrthoTest          ``sqrt(sum_n ||g_n - (g_n.g/||g||^2) g||^2 / (B (B-1))) / ||g||``  economy
GradNoiseScale     ``tr(Sigma) / ||g||^2`` with ``tr(Sigma) = sum_n ||g_n - g||^2 /   economy
                   (B-1)`` (McCandlish et al. 2018, B_simple)
GradHist1d         histogram of per-sample gradient entries (a random subset of       economy
                   ``hist_entries`` entries per layer from ``hist_samples`` samples)
MeanGSNR           mean over entries of ``g_j^2 / var_j``, ``var_j = mean_n g_nj^2 -   business
                   g_j^2`` (round-off entries skipped)
EarlyStopping      ``1 - (B/D) sum_j g_j^2 / s_j^2`` (sample variance ``s_j^2``);     business
                   positive: stop (Mahsereci et al. 2017)
CABS               ``lr * sum_j var_j / loss`` (Balles et al. 2017), ``lr`` of the     business
                   optimizer's first param group
HessTrace          trace of the curvature (GGN diagonal, MC 1 sample) (per layer)     business
TICDiag            ``sum_j (mean_n g_nj^2) / (h_j + eps)`` with ``h`` that diagonal    business
TICTrace           ``sum_j mean_n g_nj^2 / tr(h)`` (times ``D``: the TIC if ``h`` is   business
                   flat)
HessMaxEV          largest Hessian eigenvalue (Lanczos on Hessian-vector products)    full
                   and its relative residual ``HessMaxEVResidual`` (above
                   ``hess_tol`` where Lanczos stopped at ``hess_iters``)
GradHist2d         2-d histogram of (parameter value, per-sample gradient entry)      full
LayerSpectra       per layer: top GGN eigenvalues (MC, ViViT) and their effective     full
                   rank ``(sum l)^2 / sum l^2``
=================  =================================================================  ========
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import panels as pn
from . import reductions as r
from .formulas import (
    alpha,
    curvature_statistics,
    effective_rank,
    entry_statistics,
    gradient_tests,
    histogram,
    histogram2d,
    robust_limit,
)
from .reductions import StepData

Formula = Callable[[StepData], dict[str, Any]]


@dataclass(frozen=True, eq=False)
class Instrument:
    """One training instrument.

    Args:
        name: the key it logs (its formula may add per-layer keys such as
            ``f"{name}_layers"``).
        needs: the shared reductions it reads (:mod:`beyondgrad.cockpit.reductions`).
        formula: ``StepData -> {key: value}``, pure; an empty dict logs nothing.
        panel: the dashboard panel it is drawn in (None: logged, not drawn).
        next_step: it also needs the step after a tracked step (tracked then too, for the
            loss and such instruments only), e.g. Alpha.
    """

    name: str
    needs: frozenset[str]
    formula: Formula
    panel: pn.Panel | None = None
    next_step: bool = False

    @property
    def per_sample(self) -> bool:
        """Whether it reads per-sample statistics (undefined when samples are coupled)."""
        return bool(self.needs & r.PER_SAMPLE)

    def evaluate(self, data: StepData) -> dict[str, Any]:
        """The values to log for ``data``."""
        return self.formula(data)


def _needs(*names: str) -> frozenset[str]:
    return frozenset(names)


# -- formulas reading the shared reductions ----------------------------------------------------
def _tests(data: StepData) -> dict[str, float]:
    assert data.batch_l2 is not None and data.dots is not None
    return data.shared(
        "gradient_tests", lambda: gradient_tests(data.B, data.batch_l2, data.dots, data.grad_sq)
    )


def _sgs(data: StepData) -> Tensor:
    """``sum_n g_n^2`` (flat, the gradients' dtype)."""
    assert data.sgs is not None
    return data.sgs


def _entries(data: StepData) -> dict[str, float]:
    def compute() -> dict[str, float]:
        grad = data.workspace.flat("grad", data.grads)  # at least float32
        eps = torch.finfo(functools.reduce(torch.promote_types, [g.dtype for g in data.grads])).eps
        return entry_statistics(data.B, grad, _sgs(data), data.loss, data.lr, eps, data.workspace)

    return data.shared("entry_statistics", compute)


def _diag(data: StepData) -> Tensor:
    def compute() -> Tensor:
        assert data.ggn_diag is not None
        return data.workspace.flat("ggn_diag", [data.ggn_diag[n] for n in data.layers])

    return data.shared("ggn_diag_flat", compute)


def _curvature(data: StepData) -> dict[str, float]:
    def compute() -> dict[str, float]:
        return curvature_statistics(_sgs(data), data.B, _diag(data), workspace=data.workspace)

    return data.shared("curvature_statistics", compute)


def _pick(shared: Callable[[StepData], dict[str, float]], key: str) -> Formula:
    return lambda data: {key: shared(data)[key]}


def _grad_norm(data: StepData) -> dict[str, Any]:
    assert data.grad_norms is not None
    return {
        "GradNorm": data.grad_sq**0.5,
        "GradNorm_layers": dict(zip(data.layers, data.grad_norms.tolist())),
    }


def _layer_sizes(name: str, field: str) -> Formula:
    def formula(data: StepData) -> dict[str, Any]:
        layers = getattr(data, field)
        if layers is None:
            return {}
        total = torch.tensor(list(layers.values()), dtype=torch.float64).pow(2).sum().sqrt()
        return {name: float(total), f"{name}_layers": layers}

    return formula


def _alpha(data: StepData) -> dict[str, float]:
    start = data.alpha_start
    if start is None or data.losses is None or data.directional is None:
        return {}
    return {"Alpha": alpha(start["losses"], start["derivatives"], data.losses, data.directional)}


def _hist1d(data: StepData) -> dict[str, Any]:
    if data.hist_values is None:
        return {}
    return {"GradHist1d": histogram(data.hist_values, data.settings.hist_bins, _limit(data))}


def _hist2d(data: StepData) -> dict[str, Any]:
    if data.hist_values is None or data.hist_params is None:
        return {}
    bins, q = data.settings.hist_bins, data.settings.hist_quantile
    return {"GradHist2d": histogram2d(data.hist_params, data.hist_values, bins, _limit(data), q)}


def _limit(data: StepData) -> float:
    assert data.hist_values is not None
    q = data.settings.hist_quantile
    return data.shared("hist_limit", lambda: robust_limit(data.hist_values, q))


def _hess_trace(data: StepData) -> dict[str, Any]:
    assert data.ggn_diag is not None
    diag = data.ggn_diag
    per_layer = torch.stack([diag[n].sum(dtype=torch.float64) for n in data.layers])
    total, *layers = torch.cat([_diag(data).sum(dtype=torch.float64)[None], per_layer]).tolist()
    return {"HessTrace": total, "HessTrace_layers": dict(zip(data.layers, layers))}  # one sync


def _hess_max_ev(data: StepData) -> dict[str, float]:
    if data.hess_max_ev is None:
        return {}
    return {"HessMaxEV": data.hess_max_ev, "HessMaxEVResidual": data.hess_residual or 0.0}


def _spectra(data: StepData) -> dict[str, Any]:
    if data.ggn_spectra is None:
        return {}
    return {
        "LayerSpectra": data.ggn_spectra,
        "LayerEffectiveRank": {
            k: effective_rank(torch.tensor(v)) for k, v in data.ggn_spectra.items()
        },
    }


# -- panels ------------------------------------------------------------------------------------
_ALPHA = pn.Panel((0, 0), "Alpha", pn.alpha_histogram)
_SIZES = pn.Panel((1, 0), "Distance / update size", log=True)
_NORM = pn.Panel((2, 0), "Gradient norm", log=True)
_TESTS = pn.Panel((0, 1), "Gradient tests (dashed: thresholds)", pn.gradient_tests, log=True)
_HIST1 = pn.Panel((1, 1), "Gradient histogram (log counts)", pn.histogram_over_time)
_HIST2 = pn.Panel((2, 1), "Parameters vs gradients", pn.last_histogram2d)
_MAXEV = pn.Panel((0, 2), "Largest Hessian eigenvalue", log=True)
_TRACE = pn.Panel((1, 2), "Curvature trace (GGN diagonal)", log=True)
_TIC = pn.Panel((2, 2), "Takeuchi information criterion", log=True)
_GNS = pn.Panel((3, 0), "Gradient noise scale (B_simple)", log=True)
_GSNR = pn.Panel((3, 1), "Mean gradient signal-to-noise ratio", log=True)
_SPECTRA = pn.Panel((3, 2), "Per-layer top GGN eigenvalue", pn.layer_spectra)
_EARLY = pn.Panel((4, 0), "Early stopping", reference=(0.0, "stop when above"))
_CABS = pn.Panel((4, 1), "CABS (suggested batch size)", log=True)
_LOSS = pn.Panel((5, 0), "Mini-batch loss", log=True)

_TEST_NEEDS = _needs(r.GRAD, r.BATCH_L2, r.DOTS)
_ENTRY_NEEDS = _needs(r.GRAD, r.SGS, r.LR)
_TIC_NEEDS = _needs(r.GRAD, r.SGS, r.GGN_DIAG)

#: every built-in instrument, in dashboard/preset order
REGISTRY: dict[str, Instrument] = {
    i.name: i
    for i in (
        Instrument("Loss", _needs(r.LOSS), lambda d: {"Loss": d.loss}, _LOSS),
        Instrument("GradNorm", _needs(r.GRAD), _grad_norm, _NORM),
        Instrument("Distance", _needs(r.DISTANCE), _layer_sizes("Distance", "distance"), _SIZES),
        Instrument(
            "UpdateSize", _needs(r.UPDATE), _layer_sizes("UpdateSize", "update_norms"), _SIZES
        ),
        Instrument(
            "Alpha", _needs(r.LOSSES, r.DIRECTIONAL, r.UPDATE), _alpha, _ALPHA, next_step=True
        ),
        Instrument("NormTest", _TEST_NEEDS, _pick(_tests, "NormTest"), _TESTS),
        Instrument("InnerTest", _TEST_NEEDS, _pick(_tests, "InnerTest"), _TESTS),
        Instrument("OrthoTest", _TEST_NEEDS, _pick(_tests, "OrthoTest"), _TESTS),
        Instrument("GradNoiseScale", _TEST_NEEDS, _pick(_tests, "GradNoiseScale"), _GNS),
        Instrument("GradHist1d", _needs(r.GRAD, r.ENTRIES), _hist1d, _HIST1),
        Instrument("MeanGSNR", _ENTRY_NEEDS, _pick(_entries, "MeanGSNR"), _GSNR),
        Instrument("EarlyStopping", _ENTRY_NEEDS, _pick(_entries, "EarlyStopping"), _EARLY),
        Instrument("CABS", _ENTRY_NEEDS, _pick(_entries, "CABS"), _CABS),
        Instrument("HessTrace", _needs(r.GRAD, r.GGN_DIAG), _hess_trace, _TRACE),
        Instrument("TICDiag", _TIC_NEEDS, _pick(_curvature, "TICDiag"), _TIC),
        Instrument("TICTrace", _TIC_NEEDS, _pick(_curvature, "TICTrace"), _TIC),
        Instrument("HessMaxEV", _needs(r.HESS_MAX_EV), _hess_max_ev, _MAXEV),
        Instrument("GradHist2d", _needs(r.GRAD, r.ENTRIES, r.ENTRY_PARAMS), _hist2d, _HIST2),
        Instrument("LayerSpectra", _needs(r.GGN_SPECTRA), _spectra, _SPECTRA),
    )
}

ECONOMY = (
    "Loss",
    "GradNorm",
    "Distance",
    "UpdateSize",
    "Alpha",
    "NormTest",
    "InnerTest",
    "OrthoTest",
    "GradNoiseScale",
    "GradHist1d",
)
BUSINESS = (*ECONOMY, "MeanGSNR", "EarlyStopping", "CABS", "HessTrace", "TICDiag", "TICTrace")
FULL = (*BUSINESS, "HessMaxEV", "GradHist2d", "LayerSpectra")
PRESETS: dict[str, tuple[str, ...]] = {"economy": ECONOMY, "business": BUSINESS, "full": FULL}
INSTRUMENTS = FULL
CURVATURE = ("HessTrace", "TICDiag", "TICTrace")  # need the GGN diagonal


def resolve(config: str | Any) -> tuple[Instrument, ...]:
    """The instruments of a preset name or of an iterable of names and/or instruments.

    Args:
        config: ``"economy"``, ``"business"``, ``"full"``, or an iterable whose items are
            instrument names (:data:`INSTRUMENTS`) or :class:`Instrument` objects.

    Returns:
        The instruments, without duplicates, in the given order.

    Raises:
        ValueError: an unknown preset or instrument name.
    """
    if isinstance(config, str):
        if config not in PRESETS:
            raise ValueError(
                f"unknown config {config!r}; use one of {sorted(PRESETS)} or a list of "
                "instrument names"
            )
        return tuple(REGISTRY[n] for n in PRESETS[config])
    items = list(config)
    unknown = [i for i in items if not isinstance(i, Instrument) and i not in REGISTRY]
    if unknown:
        raise ValueError(f"unknown instruments {unknown}; choose from {INSTRUMENTS}")
    out = [i if isinstance(i, Instrument) else REGISTRY[i] for i in items]
    return tuple(dict.fromkeys(out))


__all__ = [
    "BUSINESS",
    "ECONOMY",
    "FULL",
    "INSTRUMENTS",
    "PRESETS",
    "REGISTRY",
    "Instrument",
    "alpha",
    "curvature_statistics",
    "effective_rank",
    "entry_statistics",
    "gradient_tests",
    "histogram",
    "histogram2d",
    "resolve",
    "robust_limit",
]
