"""Cockpit: training instruments computed from the engine's per-layer reductions during an
ordinary training step, logged as JSON lines (and TensorBoard scalars) and drawn as a
dashboard. See :class:`Cockpit` and :mod:`beyondgrad.cockpit.instruments`."""

from .cockpit import Cockpit
from .dashboard import draw, load
from .instruments import BUSINESS, ECONOMY, FULL, INSTRUMENTS, PRESETS
from .schedules import every, logarithmic

__all__ = [
    "BUSINESS",
    "ECONOMY",
    "FULL",
    "INSTRUMENTS",
    "PRESETS",
    "Cockpit",
    "draw",
    "every",
    "load",
    "logarithmic",
]
