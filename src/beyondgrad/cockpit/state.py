"""The Cockpit's state between steps, as a ``state_dict`` that ``torch.save`` /
``torch.load(weights_only=True)`` round-trip.

What a resumed run needs to log exactly what an uninterrupted run logs:

- ``generator``: the Cockpit's random state (histogram entries, MC vectors, Lanczos);
- ``initial``: Distance's reference point ``theta_0``;
- ``records``: the logged records (``output()``, ``plot()`` and the ``plot_every`` count);
- ``alpha_start``: Alpha's start point (the last update, the per-sample losses and slopes
  along it at its start) when the next step is its end point;
- ``armed``: a tracked step whose update has not been measured yet (only without
  ``optimizer=``; its per-sample rows are not saved, so Alpha of the next step is left out);
- ``dropped`` and ``warned``: the instruments left out and the warnings already given.
- ``hess_vector`` (optional): HessMaxEV's warm start, the last top Hessian eigenvector.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor

FORMAT = 1


def on_devices(values: dict[str, Tensor], like: dict[str, Tensor]) -> dict[str, Tensor]:
    """``values`` copied onto the devices (and dtypes) of the tensors of the same names."""
    return {n: v.to(device=like[n].device, dtype=like[n].dtype).clone() for n, v in values.items()}


def alpha_start_state(start: dict[str, Any] | None) -> dict[str, Any] | None:
    """Alpha's start point with its tensors detached and cloned (None stays None)."""
    if start is None:
        return None
    return {
        "step": int(start["step"]),
        "direction": {n: t.detach().clone() for n, t in start["direction"].items()},
        "losses": None if start["losses"] is None else start["losses"].clone(),
        "derivatives": start["derivatives"].clone(),
    }


def load_alpha_start(
    state: dict[str, Any] | None, params: dict[str, Tensor]
) -> dict[str, Any] | None:
    """Alpha's start point from :func:`alpha_start_state`, its direction on the parameters'
    devices (the losses and slopes stay float64 on the CPU)."""
    if state is None:
        return None
    return {
        "step": int(state["step"]),
        "direction": on_devices(state["direction"], params),
        "losses": None if state["losses"] is None else state["losses"].cpu().double(),
        "derivatives": state["derivatives"].cpu().double(),
    }


def records_state(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A deep copy of the records (plain numbers, strings, lists and dicts)."""
    return copy.deepcopy(records)


def check_format(state: dict[str, Any]) -> None:
    """Raise ``ValueError`` unless ``state`` is a Cockpit state of a known format."""
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(
            f"not a Cockpit state_dict of format {FORMAT} (got keys {sorted(state)[:8]})"
            if isinstance(state, dict)
            else f"a Cockpit state_dict is a dict, got {type(state).__name__}"
        )


def check_names(saved: dict[str, Tensor], params: dict[str, Tensor], what: str) -> None:
    """Raise ``ValueError`` when ``saved`` is keyed by other parameters (another model), or a
    tensor's shape differs."""
    if set(saved) != set(params):
        missing, extra = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
        raise ValueError(
            f"the Cockpit state's {what} belongs to another model: missing {missing[:4]}, "
            f"unexpected {extra[:4]}"
        )
    wrong = [n for n, t in saved.items() if t.shape != params[n].shape]
    if wrong:
        raise ValueError(f"the Cockpit state's {what} has other shapes for {wrong[:4]}")


def generator_state(generator: torch.Generator) -> Tensor:
    """The generator's state (a CPU byte tensor)."""
    return generator.get_state()


__all__ = [
    "FORMAT",
    "alpha_start_state",
    "check_format",
    "check_names",
    "generator_state",
    "load_alpha_start",
    "on_devices",
    "records_state",
]
