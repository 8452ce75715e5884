"""Refresh schedules: how often an optimizer rebuilds its preconditioner.

One spelling for every optimizer: ``refresh_every=k`` (a param-group setting) rebuilds the
preconditioner of the group's layers on steps ``0, k, 2k, ...`` (counted by the optimizer's
``steps``, which ``state_dict`` saves): KFAC's eigendecompositions, SINGD's and SIRFShampoo's
factor updates. KFAC also has ``stats_every`` (global), how often the curvature statistics
are collected into its moving averages; SINGD collects statistics exactly on the steps where
some group refreshes, SIRFShampoo needs none beyond the gradient.

Warm-up (``warmup=w``, a param-group setting, in steps; 0 turns it off): during the first
``w`` steps the learning rate (of the preconditioned parameters and of the AdamW fallback) is
scaled by ``(step + 1) / w`` (:func:`warmup_factor`), and the damping by a factor that falls
linearly from :data:`DAMPING_WARMUP` to 1 (:func:`scheduled_damping`): the preconditioner is
built from few statistics then, so it is trusted less.

Old spellings stay accepted with a ``DeprecationWarning``: ``T`` (constructor argument of
SINGD and SIRFShampoo, and SIRFShampoo's per-group key) means ``refresh_every``.
"""

from __future__ import annotations

import warnings
from typing import Any

RENAMED_GROUP_KEYS = {"T": "refresh_every"}
"""Deprecated param-group keys -> their current spelling."""


DAMPING_WARMUP = 10.0
"""The damping at step 0 of a warm-up, as a multiple of the group's ``damping``."""


def warmup_factor(step: int, warmup: int) -> float:
    """The learning-rate factor of ``step`` in a linear warm-up of ``warmup`` steps.

    Args:
        step: the number of completed optimizer steps.
        warmup: the warm-up length (0: none).

    Returns:
        ``min(1, (step + 1) / warmup)`` (1.0 without warm-up).
    """
    return 1.0 if step >= warmup else (step + 1) / warmup


def scheduled_damping(damping: float, step: int, warmup: int) -> float:
    """The damping of ``step``: ``damping`` times a factor that falls linearly from
    :data:`DAMPING_WARMUP` at step 0 to 1 at the end of the warm-up (then stays 1).

    Args:
        damping: the group's damping.
        step: the number of completed optimizer steps.
        warmup: the warm-up length (0: none).
    """
    if step >= warmup:
        return damping
    return damping * (1.0 + (DAMPING_WARMUP - 1.0) * (1.0 - step / warmup))


def check_warmup(value: object) -> int:
    """``value`` if it is a non-negative int, else a ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"warmup must be a non-negative int, got {value!r}")
    return value


def is_due(step: int, every: int) -> bool:
    """Whether a task run every ``every`` steps runs at ``step`` (steps 0, every, 2 every, ...).

    Args:
        step: the number of completed optimizer steps.
        every: the period (a positive int).

    Returns:
        ``step % every == 0``.
    """
    return step % every == 0


def check_every(name: str, value: Any) -> int:
    """``value`` if it is a positive int, else a ``ValueError`` naming the knob ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def deprecated_alias(
    owner: str, new: str, new_value: Any, default: Any, old: str, old_value: Any
) -> Any:
    """Resolve a renamed constructor argument.

    Args:
        owner: the class name, for the messages.
        new: the current name; ``new_value`` its value and ``default`` its default.
        old: the deprecated name; ``old_value`` its value (None: not given).

    Returns:
        ``new_value``, or ``old_value`` (with a ``DeprecationWarning``) when the old name was
        given. Both given with different values: ``ValueError``.
    """
    if old_value is None:
        return new_value
    warnings.warn(
        f"{owner}({old}=...) is deprecated; use {new}=... (same meaning)",
        DeprecationWarning,
        stacklevel=3,
    )
    if new_value != default and new_value != old_value:
        raise ValueError(f"{owner}: give {new} only ({old} is its deprecated spelling)")
    return old_value


def rename_group_keys(group: dict[str, Any], owner: str) -> None:
    """Rename deprecated keys of a user's param group in place (``DeprecationWarning``).

    Args:
        group: a param group as given to the constructor (before defaults are filled in).
        owner: the class name, for the messages.
    """
    for old, new in RENAMED_GROUP_KEYS.items():
        if old not in group:
            continue
        warnings.warn(
            f"{owner}: the param-group key {old!r} is deprecated; use {new!r} (same meaning)",
            DeprecationWarning,
            stacklevel=4,
        )
        if new in group and group[new] != group[old]:
            raise ValueError(f"{owner}: a param group gives both {old!r} and {new!r}")
        group[new] = group.pop(old)


__all__ = [
    "DAMPING_WARMUP",
    "RENAMED_GROUP_KEYS",
    "check_every",
    "check_warmup",
    "deprecated_alias",
    "is_due",
    "rename_group_keys",
    "scheduled_damping",
    "warmup_factor",
]
