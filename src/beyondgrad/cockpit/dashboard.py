"""The dashboard: the panels with logged values, three to a row, drawn with matplotlib's
object API (no pyplot, so it can draw in a background thread; PNG and SVG).

Order (each instrument declares its :class:`~beyondgrad.cockpit.panels.Panel`): **step size**
(Alpha with labelled overflow bins, Distance and UpdateSize, gradient norm), **gradients**
(the gradient tests against their reference thresholds, the 1-d histogram of per-sample
gradient entries over time, the 2-d histogram of parameters vs gradients), **curvature**
(largest Hessian eigenvalue, trace, TIC), gradient noise scale, gradient signal-to-noise, per-layer
GGN spectra, early stopping, CABS; last **performance** (mini-batch loss; each logged
``val_*``/``train_*`` metric in a panel named after it, with its target as a dashed line when
one is given) and **hyperparameters** (learning rate). A panel whose instruments were not
tracked is not drawn: an economy run shows no empty curvature frames.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .instruments import REGISTRY, Instrument
from .panels import Panel, line, present
from .runlog import parse_log

_METRIC_ROW = 5
_LR = Panel((_METRIC_ROW, 9), "Learning rate", log=True)
COLUMNS = 3


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


def panels(
    records: Sequence[dict[str, Any]],
    instruments: Iterable[Instrument] | None = None,
    targets: dict[str, float] | None = None,
) -> list[tuple[Panel, list[str]]]:
    """The panels to draw for ``records``, in dashboard order, each with its keys.

    Args:
        records: the logged records.
        instruments: whose panels to consider (default: every registered instrument); a
            Cockpit passes its own (custom instruments included).
        targets: ``{metric: target}`` drawn as dashed lines in the metric panels.

    Returns:
        ``(panel, keys)`` for every panel with a logged key, sorted by ``panel.slot``.
    """
    found: dict[int, tuple[Panel, list[str]]] = {}
    for instrument in (*REGISTRY.values(), *(instruments or ())):
        panel = instrument.panel
        if panel is not None and instrument.name not in found.get(id(panel), (None, []))[1]:
            found.setdefault(id(panel), (panel, []))[1].append(instrument.name)
    metrics = sorted({k for r in records for k in r if k.startswith(("val_", "train_"))})
    for i, key in enumerate(metrics):
        target = (targets or {}).get(key)
        ref = (
            (target, f"target {target:g}") if target is not None and math.isfinite(target) else None
        )
        found[-1 - i] = (Panel((_METRIC_ROW, 1 + i), key, reference=ref), [key])
    found[-1 - len(metrics)] = (_LR, ["lr"])
    chosen = [(p, keys) for p, keys in found.values() if present(records, keys)]
    return sorted(chosen, key=lambda item: item[0].slot)


def figure(
    records: Sequence[dict[str, Any]],
    title: str = "Cockpit",
    instruments: Iterable[Instrument] | None = None,
    targets: dict[str, float] | None = None,
) -> Any:
    """The dashboard of ``records`` as a ``matplotlib.figure.Figure`` (not shown, not saved).

    Args:
        records: the logged records (:func:`load`, or ``Cockpit.output().values()``).
        title: the figure's title.
        instruments: whose panels to draw (default: every registered instrument).
        targets: ``{metric: target}`` drawn as dashed lines in the metric panels.

    Returns:
        The figure: one axes per drawn panel (:func:`panels`), none empty.
    """
    from matplotlib.figure import Figure

    chosen = panels(records, instruments, targets)
    rows = max(1, math.ceil(len(chosen) / COLUMNS))
    fig = Figure(figsize=(15, 3.4 * rows + 0.6))
    fig.suptitle(title, fontsize=13)
    for k, (panel, keys) in enumerate(chosen):
        ax = fig.add_subplot(rows, COLUMNS, k + 1)
        panel.draw(ax, records, keys, panel)
    if not chosen:
        ax = fig.add_subplot(1, 1, 1)
        line(ax, records, ["Loss"], Panel((0, 0), "nothing logged yet"))
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / (3.4 * rows + 0.6)))
    return fig


def draw(
    records: Sequence[dict[str, Any]],
    path: str | Path,
    title: str = "Cockpit",
    instruments: Iterable[Instrument] | None = None,
    targets: dict[str, float] | None = None,
) -> list[Path]:
    """Draw the dashboard for ``records`` to ``path`` (PNG) and ``path`` with ``.svg``, each
    written atomically (a temporary file beside it, renamed over it).

    Args:
        records: the logged records (:func:`load`, or ``Cockpit.output().values()``).
        path: the PNG file to write; the SVG goes beside it.
        title: the figure's title.
        instruments: whose panels to draw (default: every registered instrument).
        targets: ``{metric: target}`` drawn as dashed lines in the metric panels.

    Returns:
        The two files written.
    """
    fig = figure(records, title, instruments, targets)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    outs = [path.with_suffix(".png"), path.with_suffix(".svg")]
    for out in outs:
        fd, name = tempfile.mkstemp(prefix=f".{out.stem}.", suffix=out.suffix, dir=out.parent)
        os.close(fd)
        try:
            fig.savefig(name, dpi=90)
            os.chmod(name, 0o644)
            os.replace(name, out)
        finally:
            Path(name).unlink(missing_ok=True)
    return outs


__all__ = ["draw", "figure", "load", "panels"]
