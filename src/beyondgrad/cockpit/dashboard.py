"""The dashboard: a 4x3 grid of panels drawn with matplotlib (PNG and SVG).

Columns: **step size** (Alpha, Distance and UpdateSize, gradient norm), **gradients**
(gradient tests, 1-d histogram of per-sample gradient entries over time, 2-d histogram of
parameters vs gradients at the last step), **curvature** (largest Hessian eigenvalue, trace,
TIC). Bottom row: **performance** (mini-batch loss, and any logged ``val_*``/``train_*``
metrics) across two panels, and **hyperparameters** (learning rate). Each instrument declares
its panel (:class:`~beyondgrad.cockpit.panels.Panel`); a panel whose instruments were not
tracked says so instead of failing.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .instruments import REGISTRY
from .panels import Panel, line
from .runlog import parse_log

_METRICS = Panel((3, 1), "Metrics")
_LR = Panel((3, 2), "Learning rate", log=True)


def load(path: str | Path) -> list[dict[str, Any]]:
    """Records from a ``cockpit.jsonl`` log (or a run directory holding one); partial lines
    of the same step are merged. A truncated last line (a run killed while writing it) is
    skipped with a ``RuntimeWarning``.

    Args:
        path: a ``cockpit.jsonl`` file or a directory holding one.

    Returns:
        One record (``{name: value}``, with ``"step"``) per step, in step order.

    Raises:
        FileNotFoundError: no log at ``path``.
        ValueError: a malformed line before the last one.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "cockpit.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"no cockpit log at {path}")
    merged: dict[int, dict[str, Any]] = {}
    for record in parse_log(path):
        merged.setdefault(record["step"], {}).update(record)
    return [merged[k] for k in sorted(merged)]


def _panels() -> dict[tuple[int, int], tuple[Panel, list[str]]]:
    """Every registered instrument's panel with the names drawn in it, by grid slot."""
    slots: dict[tuple[int, int], tuple[Panel, list[str]]] = {}
    for instrument in REGISTRY.values():
        if instrument.panel is not None:
            slots.setdefault(instrument.panel.slot, (instrument.panel, []))[1].append(
                instrument.name
            )
    return slots


def draw(records: Sequence[dict[str, Any]], path: str | Path, title: str = "Cockpit") -> list[Path]:
    """Draw the dashboard for ``records`` to ``path`` (PNG) and ``path`` with ``.svg``.

    Args:
        records: the logged records (:func:`load`, or ``Cockpit.output().values()``).
        path: the PNG file to write; the SVG goes beside it.
        title: the figure's title.

    Returns:
        The two files written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(4, 3, figsize=(15, 14))
    fig.suptitle(title, fontsize=13)
    for ax, head in zip(axes[0], ("STEP SIZE", "GRADIENTS", "CURVATURE")):
        ax.annotate(head, (0.5, 1.18), xycoords="axes fraction", ha="center", fontsize=11,
                    fontweight="bold")  # fmt: skip
    for (row, col), (panel, keys) in _panels().items():
        panel.draw(axes[row, col], records, keys, panel)
    metrics = sorted({k for r in records for k in r if k.startswith(("val_", "train_"))})
    line(axes[3, 1], records, metrics or ["val_accuracy"], _METRICS)
    line(axes[3, 2], records, ["lr"], _LR)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    outs = [path.with_suffix(".png"), path.with_suffix(".svg")]
    for out in outs:
        fig.savefig(out, dpi=90)
    plt.close(fig)
    return outs


__all__ = ["draw", "load"]
