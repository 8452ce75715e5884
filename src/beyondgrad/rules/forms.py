"""Deprecated location; the forms live in :mod:`beyondgrad.forms`."""

from ..forms import *  # noqa: F403
from ..forms import __all__  # noqa: F401
