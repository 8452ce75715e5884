"""Deprecated location of the built-in tasks: use :mod:`beyondgrad.app.tasks`."""

import warnings

from .app.tasks import TASKS, Task, make_task

warnings.warn("beyondgrad.tasks moved to beyondgrad.app.tasks", DeprecationWarning, stacklevel=2)

__all__ = ["TASKS", "Task", "make_task"]
