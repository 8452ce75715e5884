"""Dashboard panels: where an instrument is drawn and how (matplotlib axes, imported lazily).

A :class:`Panel` is a place in the dashboard with a title and a drawing function
``draw(ax, records, keys, panel)``; instruments that share a panel object are drawn together
(``keys``: their names, in registration order). The dashboard draws only the panels whose
keys were logged, in the order of their ``slot`` (row-major), three to a row: a preset never
shows an empty frame for what it does not track.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

Records = Sequence[dict[str, Any]]
DrawFn = Callable[[Any, Records, Sequence[str], "Panel"], None]

#: Reference thresholds of the gradient tests, drawn as dashed lines: a value above its line
#: says the mini-batch is too small for the test (norm test, Byrd et al. 2012; inner-product
#: and orthogonality tests, Bollapragada et al. 2018; the Cockpit's gauges draw them against
#: the unit scale). Change the entries to draw other thresholds.
TEST_THRESHOLDS: dict[str, float] = {"NormTest": 1.0, "InnerTest": 1.0, "OrthoTest": 1.0}
#: Alpha values beyond this magnitude are counted in the labelled overflow bins
ALPHA_RANGE = 1.5
#: quantile of the per-step histogram ranges that the histogram-over-time panel shows
RANGE_QUANTILE = 0.9


def series(records: Records, key: str) -> tuple[list[int], list[float]]:
    """``(steps, values)`` of the finite numbers logged under ``key``."""
    pts = [
        (r["step"], r[key])
        for r in records
        if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])
    ]
    return [p[0] for p in pts], [p[1] for p in pts]


def present(records: Records, keys: Sequence[str]) -> bool:
    """Whether any record holds any of ``keys`` (the panel has something to draw)."""
    return any(k in r for r in records for k in keys)


def missing(ax: Any, what: str) -> None:
    """Mark ``ax`` as "``what``: no finite values"."""
    ax.text(0.5, 0.5, f"{what}\nno finite values", ha="center", va="center", color="gray",
            transform=ax.transAxes)  # fmt: skip
    ax.set_xticks([])
    ax.set_yticks([])


def _lines(ax: Any, records: Records, keys: Sequence[str], panel: Panel) -> bool:
    """One line per key; returns whether anything was drawn (log y axis if asked and all
    values are positive)."""
    drawn = False
    for key in keys:
        x, y = series(records, key)
        if x:
            ax.plot(x, y, label=key, lw=1.2, marker="." if len(x) < 30 else None)
            drawn = True
    if drawn:
        if panel.log and all(v > 0 for k in keys for v in series(records, k)[1]):
            ax.set_yscale("log")
        ax.set_xlabel("step")
    ax.set_title(panel.title, fontsize=9)
    return drawn


def line(ax: Any, records: Records, keys: Sequence[str], panel: Panel) -> None:
    """One line per key over the steps, the panel's reference line (if any) dashed."""
    if not _lines(ax, records, keys, panel):
        missing(ax, " / ".join(keys))
        return
    if panel.reference is not None:
        value, label = panel.reference
        ax.axhline(value, color="k", ls="--", lw=0.9, label=label)
    if len(keys) > 1 or panel.reference is not None:
        ax.legend(fontsize=7)


def gradient_tests(ax: Any, records: Records, keys: Sequence[str], panel: Panel) -> None:
    """The gradient tests over the steps, each against its reference threshold
    (:data:`TEST_THRESHOLDS`, dashed, same colour)."""
    if not _lines(ax, records, keys, panel):
        missing(ax, " / ".join(keys))
        return
    for line_, key in zip(ax.get_lines(), [k for k in keys if series(records, k)[0]]):
        if key in TEST_THRESHOLDS:
            ax.axhline(TEST_THRESHOLDS[key], color=line_.get_color(), ls="--", lw=0.9,
                       label=f"{key} threshold {TEST_THRESHOLDS[key]:g}")  # fmt: skip
    ax.legend(fontsize=7)


def alpha_histogram(ax: Any, records: Records, keys: Sequence[str], panel: Panel) -> None:
    """Histogram of the logged Alpha values over ``[-ALPHA_RANGE, ALPHA_RANGE]`` with their
    median; values beyond are counted in two labelled overflow bins at the ends."""
    alphas = np.asarray([r[keys[0]] for r in records if isinstance(r.get(keys[0]), (int, float))])
    lim = ALPHA_RANGE
    if not len(alphas):
        missing(ax, keys[0])
        return
    inside = alphas[np.abs(alphas) <= lim]
    ax.hist(inside, bins=30, range=(-lim, lim), color="tab:blue")
    width = 2 * lim / 30
    for count, x, label in ((int((alphas < -lim).sum()), -lim - width, f"< -{lim:g}"),
                            (int((alphas > lim).sum()), lim + width, f"> {lim:g}")):  # fmt: skip
        ax.bar(x, count, width=2 * width, color="tab:red", alpha=0.8)
        ax.annotate(f"{label}\n(overflow {count})", (x, count), xytext=(0, 2),
                    textcoords="offset points", ha="center", va="bottom", fontsize=7)  # fmt: skip
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlim(-lim - 3 * width, lim + 3 * width)
    ax.set_xlabel("alpha (-1 no progress, 0 valley floor, 1 overshoot)")
    ax.set_title(f"{panel.title} (median {np.median(alphas):.2f})", fontsize=9)


def histogram_over_time(ax: Any, records: Records, keys: Sequence[str], panel: Panel) -> None:
    """The logged 1-d histograms as columns of an image (log counts), re-binned onto a common
    range: the :data:`RANGE_QUANTILE` quantile of the steps' ranges (each step's range is
    itself a robust quantile of its entries); entries beyond fall in the edge rows."""
    hists = [(r["step"], r[keys[0]]) for r in records if keys[0] in r]
    if not hists:
        missing(ax, keys[0])
        return
    limit = float(np.quantile([h["limit"] for _, h in hists], RANGE_QUANTILE)) or 1.0
    bins = len(hists[0][1]["counts"])
    grid = np.zeros((bins, len(hists)))
    for j, (_, h) in enumerate(hists):  # re-bin each step onto the common range
        edges = np.linspace(-h["limit"], h["limit"], bins + 1)
        centers = (edges[:-1] + edges[1:]) / 2
        idx = np.clip(((centers + limit) / (2 * limit) * bins).astype(int), 0, bins - 1)
        np.add.at(grid[:, j], idx, h["counts"])
    ax.imshow(np.log1p(grid), aspect="auto", origin="lower", cmap="viridis",
              extent=(hists[0][0], hists[-1][0] + 1, -limit, limit))  # fmt: skip
    ax.set_xlabel("step")
    ax.set_ylabel("per-sample gradient entry")
    ax.set_title(panel.title, fontsize=9)


def last_histogram2d(ax: Any, records: Records, keys: Sequence[str], panel: Panel) -> None:
    """The last logged 2-d histogram (parameter value vs per-sample gradient entry)."""
    last = next((r for r in reversed(records) if keys[0] in r), None)
    if not last:
        missing(ax, keys[0])
        return
    h = last[keys[0]]
    extent = (-h["param_limit"], h["param_limit"], -h["grad_limit"], h["grad_limit"])
    ax.imshow(np.log1p(np.asarray(h["counts"]).T), aspect="auto", origin="lower",
              cmap="magma", extent=extent)  # fmt: skip
    ax.set_xlabel("parameter value")
    ax.set_ylabel("per-sample gradient")
    ax.set_title(f"{panel.title} (step {last['step']})", fontsize=9)


def layer_spectra(ax: Any, records: Records, keys: Sequence[str], panel: Panel) -> None:
    """Per layer the largest logged GGN eigenvalue over the steps (log scale)."""
    layers: dict[str, tuple[list[int], list[float]]] = {}
    for r in records:
        for layer, values in (r.get(keys[0]) or {}).items():
            if values and math.isfinite(values[0]) and values[0] > 0:
                xs, ys = layers.setdefault(layer or "(model)", ([], []))
                xs.append(r["step"])
                ys.append(values[0])
    if not layers:
        missing(ax, keys[0])
        return
    for layer, (xs, ys) in layers.items():
        ax.plot(xs, ys, lw=1.0, label=layer, marker="." if len(xs) < 30 else None)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    if len(layers) <= 8:
        ax.legend(fontsize=6)
    ax.set_title(panel.title, fontsize=9)


@dataclass(frozen=True, eq=False)
class Panel:
    """A dashboard panel.

    Args:
        slot: ``(row, column)``: the panel's place in the order of the dashboard (row-major;
            columns 0 step size, 1 gradients, 2 curvature; the last rows performance and
            hyperparameters). Only panels with logged values are drawn, three to a row.
        title: the panel's title.
        draw: ``draw(ax, records, keys, panel)``; default :func:`line`.
        log: logarithmic y axis (line panels, when every value is positive).
        reference: ``(value, label)`` of a dashed reference line (line panels), or None.
    """

    slot: tuple[int, int]
    title: str
    draw: DrawFn = line
    log: bool = False
    reference: tuple[float, str] | None = None


__all__ = [
    "ALPHA_RANGE",
    "RANGE_QUANTILE",
    "TEST_THRESHOLDS",
    "Panel",
    "alpha_histogram",
    "gradient_tests",
    "histogram_over_time",
    "last_histogram2d",
    "layer_spectra",
    "line",
    "missing",
    "present",
    "series",
]
