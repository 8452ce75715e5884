"""Dashboard panels: where an instrument is drawn and how (matplotlib axes, imported lazily).

A :class:`Panel` is a slot of the dashboard grid with a title and a drawing function
``draw(ax, records, keys, panel)``; instruments that share a panel object are drawn together
(``keys``: their names, in registration order). A panel whose keys were never logged says
"not tracked" instead of failing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

Records = Sequence[dict[str, Any]]
DrawFn = Callable[[Any, Records, Sequence[str], "Panel"], None]


def series(records: Records, key: str) -> tuple[list[int], list[float]]:
    """``(steps, values)`` of the finite numbers logged under ``key``."""
    pts = [
        (r["step"], r[key])
        for r in records
        if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])
    ]
    return [p[0] for p in pts], [p[1] for p in pts]


def missing(ax: Any, what: str) -> None:
    """Mark ``ax`` as "``what`` not tracked"."""
    ax.text(0.5, 0.5, f"{what}\nnot tracked", ha="center", va="center", color="gray",
            transform=ax.transAxes)  # fmt: skip
    ax.set_xticks([])
    ax.set_yticks([])


def line(ax: Any, records: Records, keys: Sequence[str], panel: Panel) -> None:
    """One line per key over the steps (log scale if the panel asks and all are positive)."""
    drawn = False
    for key in keys:
        x, y = series(records, key)
        if x:
            ax.plot(x, y, label=key, lw=1.2, marker="." if len(x) < 30 else None)
            drawn = True
    if not drawn:
        missing(ax, " / ".join(keys))
    else:
        if panel.log and all(v > 0 for k in keys for v in series(records, k)[1]):
            ax.set_yscale("log")
        if len(keys) > 1:
            ax.legend(fontsize=7)
        ax.set_xlabel("step")
    ax.set_title(panel.title, fontsize=9)


def alpha_histogram(ax: Any, records: Records, keys: Sequence[str], panel: Panel) -> None:
    """Histogram of the logged Alpha values (clipped to [-1.5, 1.5]) with their median."""
    alphas = [r[keys[0]] for r in records if isinstance(r.get(keys[0]), (int, float))]
    if not alphas:
        missing(ax, keys[0])
        return
    ax.hist(np.clip(alphas, -1.5, 1.5), bins=30, range=(-1.5, 1.5), color="tab:blue")
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlabel("alpha (-1 no progress, 0 valley floor, 1 overshoot)")
    ax.set_title(f"{panel.title} (median {np.median(alphas):.2f})", fontsize=9)


def histogram_over_time(ax: Any, records: Records, keys: Sequence[str], panel: Panel) -> None:
    """The logged 1-d histograms as columns of an image (log counts), re-binned onto the
    largest range."""
    hists = [(r["step"], r[keys[0]]) for r in records if keys[0] in r]
    if not hists:
        missing(ax, keys[0])
        return
    limit = max(h["limit"] for _, h in hists)
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


@dataclass(frozen=True, eq=False)
class Panel:
    """A dashboard slot.

    Args:
        slot: ``(row, column)`` in the 4x3 grid (columns: step size, gradients, curvature;
            bottom row: performance and hyperparameters).
        title: the panel's title.
        draw: ``draw(ax, records, keys, panel)``; default :func:`line`.
        log: logarithmic y axis (line panels, when every value is positive).
    """

    slot: tuple[int, int]
    title: str
    draw: DrawFn = line
    log: bool = False


__all__ = [
    "Panel",
    "alpha_histogram",
    "histogram_over_time",
    "last_histogram2d",
    "line",
    "missing",
    "series",
]
