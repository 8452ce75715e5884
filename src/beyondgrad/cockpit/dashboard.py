"""The dashboard: a 4x3 grid of panels drawn with matplotlib (PNG and SVG).

Columns: **step size** (Alpha, Distance and UpdateSize, gradient norm), **gradients**
(gradient tests, 1-d histogram of per-sample gradient entries over time, 2-d histogram of
parameters vs gradients at the last step), **curvature** (largest Hessian eigenvalue, trace,
TIC). Bottom row: **performance** (mini-batch loss, and any logged ``val_*``/``train_*``
metrics) across two panels, and **hyperparameters** (learning rate). A panel whose instrument
was not tracked says so instead of failing.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def load(path: str | Path) -> list[dict[str, Any]]:
    """Records from a ``cockpit.jsonl`` log (or a run directory holding one); partial lines
    of the same step are merged."""
    path = Path(path)
    if path.is_dir():
        path = path / "cockpit.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"no cockpit log at {path}")
    merged: dict[int, dict[str, Any]] = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                record = json.loads(line)
                merged.setdefault(record["step"], {}).update(record)
    return [merged[k] for k in sorted(merged)]


def _series(records: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [
        (r["step"], r[key])
        for r in records
        if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])
    ]
    return [p[0] for p in pts], [p[1] for p in pts]


def _missing(ax: Any, what: str) -> None:
    ax.text(0.5, 0.5, f"{what}\nnot tracked", ha="center", va="center", color="gray",
            transform=ax.transAxes)  # fmt: skip
    ax.set_xticks([])
    ax.set_yticks([])


def _line(ax: Any, records: Sequence[dict[str, Any]], keys: Sequence[str], title: str,
          log: bool = False) -> None:  # fmt: skip
    drawn = False
    for key in keys:
        x, y = _series(records, key)
        if x:
            ax.plot(x, y, label=key, lw=1.2, marker="." if len(x) < 30 else None)
            drawn = True
    if not drawn:
        _missing(ax, " / ".join(keys))
    else:
        if log and all(v > 0 for k in keys for v in _series(records, k)[1]):
            ax.set_yscale("log")
        if len(keys) > 1:
            ax.legend(fontsize=7)
        ax.set_xlabel("step")
    ax.set_title(title, fontsize=9)


def draw(records: Sequence[dict[str, Any]], path: str | Path, title: str = "Cockpit") -> list[Path]:
    """Draw the dashboard for ``records`` to ``path`` (PNG) and ``path`` with ``.svg``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(4, 3, figsize=(15, 14))
    fig.suptitle(title, fontsize=13)
    for ax, head in zip(axes[0], ("STEP SIZE", "GRADIENTS", "CURVATURE")):
        ax.annotate(head, (0.5, 1.18), xycoords="axes fraction", ha="center", fontsize=11,
                    fontweight="bold")  # fmt: skip
    # step size column
    ax = axes[0, 0]
    alphas = [r["Alpha"] for r in records if isinstance(r.get("Alpha"), (int, float))]
    if alphas:
        ax.hist(np.clip(alphas, -1.5, 1.5), bins=30, range=(-1.5, 1.5), color="tab:blue")
        ax.axvline(0, color="k", lw=0.8)
        ax.set_xlabel("alpha (-1 no progress, 0 valley floor, 1 overshoot)")
        ax.set_title(f"Alpha (median {np.median(alphas):.2f})", fontsize=9)
    else:
        _missing(ax, "Alpha")
    _line(axes[1, 0], records, ["Distance", "UpdateSize"], "Distance / update size", log=True)
    _line(axes[2, 0], records, ["GradNorm"], "Gradient norm", log=True)
    # gradients column
    _line(axes[0, 1], records, ["NormTest", "InnerTest", "OrthoTest"], "Gradient tests", log=True)
    ax = axes[1, 1]
    hists = [(r["step"], r["GradHist1d"]) for r in records if "GradHist1d" in r]
    if hists:
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
        ax.set_title("Gradient histogram (log counts)", fontsize=9)
    else:
        _missing(ax, "GradHist1d")
    ax = axes[2, 1]
    last2d = next((r for r in reversed(records) if "GradHist2d" in r), None)
    if last2d:
        h = last2d["GradHist2d"]
        extent = (-h["param_limit"], h["param_limit"], -h["grad_limit"], h["grad_limit"])
        counts = np.log1p(np.asarray(h["counts"]).T)
        ax.imshow(counts, aspect="auto", origin="lower", cmap="magma", extent=extent)
        ax.set_xlabel("parameter value")
        ax.set_ylabel("per-sample gradient")
        ax.set_title(f"Parameters vs gradients (step {last2d['step']})", fontsize=9)
    else:
        _missing(ax, "GradHist2d")
    # curvature column
    _line(axes[0, 2], records, ["HessMaxEV"], "Largest Hessian eigenvalue", log=True)
    _line(axes[1, 2], records, ["HessTrace"], "Curvature trace (GGN diagonal)", log=True)
    _line(axes[2, 2], records, ["TICDiag", "TICTrace"], "Takeuchi information criterion", log=True)
    # bottom row: performance and hyperparameters
    _line(axes[3, 0], records, ["Loss"], "Mini-batch loss", log=True)
    metrics = sorted({k for r in records for k in r if k.startswith(("val_", "train_"))})
    _line(axes[3, 1], records, metrics or ["val_accuracy"], "Metrics")
    _line(axes[3, 2], records, ["lr"], "Learning rate", log=True)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    outs = [path.with_suffix(".png"), path.with_suffix(".svg")]
    for out in outs:
        fig.savefig(out, dpi=90)
    plt.close(fig)
    return outs


__all__ = ["draw", "load"]
