"""Cockpit: training instruments computed from the engine's per-layer reductions during an
ordinary training step, logged as JSON lines (and TensorBoard scalars) and drawn as a
dashboard. See :class:`Cockpit`, :class:`Instrument` and
:mod:`beyondgrad.cockpit.instruments`."""

from .cockpit import Cockpit
from .dashboard import draw, figure, load
from .instruments import BUSINESS, ECONOMY, FULL, INSTRUMENTS, PRESETS, REGISTRY, Instrument
from .panels import Panel
from .schedules import every, logarithmic

__all__ = [
    "BUSINESS",
    "ECONOMY",
    "FULL",
    "INSTRUMENTS",
    "PRESETS",
    "REGISTRY",
    "Cockpit",
    "Instrument",
    "Panel",
    "draw",
    "every",
    "figure",
    "load",
    "logarithmic",
]
