"""Checkpoints through ``torch.distributed.checkpoint`` (DCP): models, optimizers, the Cockpit.

:func:`save` writes, per named object, either a model's ``state_dict()`` as it is (DTensor
parameters of ``fully_shard`` models are written as shards and resharded on load) or the
``state_dict()`` of any other stateful object (the optimizers, the Cockpit, LR schedulers) in a
form DCP keeps exactly: its tensors as DCP tensors, the rest of its structure (nested dicts
with integer keys, tuples, strings, dtypes) as one pickled skeleton. :func:`load` reads a
model into its own ``state_dict()`` (any world size) and every other object's whole state,
however many ranks wrote it, then calls ``load_state_dict``: a fresh optimizer resumes
bit-identically, also on another world size (its state is replicated on every rank).

Why not ``torch.distributed.checkpoint.state_dict.get_state_dict``: it keeps only the
``state`` and ``param_groups`` of an optimizer's state_dict (the preconditioners under
``"beyondgrad"`` would be dropped) and initializes an empty optimizer state by a step with
zero gradients. Why not ``dcp.save(opt.state_dict())`` alone: DCP turns integer keys into
strings and loads only the keys of the template a fresh object provides.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from .group import Group, device_of, resolve_group

_TENSOR = "__beyondgrad_tensor__"


def _split(value: Any, tensors: dict[str, Tensor]) -> Any:
    """``value`` with every tensor replaced by a reference into ``tensors`` (filled)."""
    if isinstance(value, Tensor):
        key = str(len(tensors))
        tensors[key] = value.detach()
        return (_TENSOR, key)
    if isinstance(value, dict):
        return {k: _split(v, tensors) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_split(v, tensors) for v in value)
    return value


def _join(value: Any, tensors: Mapping[str, Tensor]) -> Any:
    """The inverse of :func:`_split`."""
    if isinstance(value, tuple) and len(value) == 2 and value[0] == _TENSOR:
        return tensors[value[1]]
    if isinstance(value, dict):
        return {k: _join(v, tensors) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_join(v, tensors) for v in value)
    return value


def _check_replicated(name: str, tensors: dict[str, Tensor], group: Group | None) -> None:
    """Raise unless the plain tensors of object ``name`` are equal on every rank (DCP writes
    a replicated tensor from one rank only: a rank-local state would be lost silently)."""
    if group is None:
        return
    plain = [(k, t) for k, t in tensors.items() if type(t) is Tensor and t.numel()]
    if not plain:
        return
    sums = []
    for _, t in plain:
        x = t.detach().reshape(-1).to(torch.float64).nan_to_num(0.0, 1e300, -1e300)
        ramp = torch.linspace(1.0, 2.0, x.numel(), dtype=torch.float64, device=x.device)
        sums.append(torch.stack([x.sum(), (x * ramp).sum(), x.abs().sum()]).cpu())
    both = torch.cat([torch.cat(sums), -torch.cat(sums)]).to(device_of(group))
    torch.distributed.all_reduce(both, op=torch.distributed.ReduceOp.MAX, group=group)
    half = both.numel() // 2
    equal = (both[:half] == -both[half:]).reshape(-1, 3).all(1)
    if not bool(equal.all()):
        raise RuntimeError(
            f"checkpoint: the state of {name!r} differs between the ranks (DCP writes a "
            "replicated tensor from one rank only): every rank must hold the same state. "
            "Optimizers and the Cockpit are replicated under data parallelism; a rank-local "
            "object needs its own checkpoint per rank"
        )


def save(checkpoint_id: str, objects: Mapping[str, Any], process_group: Any = None) -> None:
    """Save named objects with ``torch.distributed.checkpoint`` (collective under a group).

    Args:
        checkpoint_id: the checkpoint directory (DCP's ``checkpoint_id``).
        objects: name -> an ``nn.Module`` (its ``state_dict()``, DTensors included) or an
            object with ``state_dict()``/``load_state_dict()`` (``bg.optim`` optimizers,
            ``bg.cockpit.Cockpit``, torch optimizers and schedulers).
        process_group: ``None`` (the default group when ``torch.distributed`` is
            initialized), a ``ProcessGroup``, or ``"local"`` (this process writes alone).

    Raises:
        RuntimeError: a non-module object whose tensors differ between the ranks.
    """
    import torch.distributed.checkpoint as dcp  # imported on use: it is slow to import

    group = resolve_group(process_group)
    state: dict[str, Any] = {}
    for name, obj in objects.items():
        if isinstance(obj, nn.Module):
            state[name] = obj.state_dict()
            continue
        tensors: dict[str, Tensor] = {}
        skeleton = _split(obj.state_dict(), tensors)
        _check_replicated(name, tensors, group)
        state[name] = {"skeleton": (skeleton,), "tensors": tensors}  # a tuple: one pickle
    with _quiet(group):
        dcp.save(state, checkpoint_id=checkpoint_id, **_group_kwargs(group))


def load(checkpoint_id: str, objects: Mapping[str, Any], process_group: Any = None) -> None:
    """Load named objects saved by :func:`save` (collective under a group), on any world size.

    A module is loaded into its own ``state_dict()`` (DTensor shards resharded), strictly;
    every other object gets its whole saved state (full tensors on the CPU; its
    ``load_state_dict`` moves them) through ``load_state_dict``.

    Args:
        checkpoint_id: the checkpoint directory.
        objects: name -> module or stateful object, as for :func:`save` (a subset is fine).
        process_group: as for :func:`save`.

    Raises:
        KeyError: a name the checkpoint does not hold.
    """
    import torch.distributed.checkpoint as dcp

    group = resolve_group(process_group)
    kwargs = _group_kwargs(group)
    meta = dcp.FileSystemReader(checkpoint_id).read_metadata()
    for name, obj in objects.items():
        if isinstance(obj, nn.Module):
            template = {name: obj.state_dict()}
            with _quiet(group):
                dcp.load(template, checkpoint_id=checkpoint_id, **kwargs)
            obj.load_state_dict(template[name])
            continue
        flat = _template(meta, name)
        with _quiet(group):
            dcp.load(flat, checkpoint_id=checkpoint_id, **kwargs)
        prefix = f"{name}.tensors."
        tensors = {k[len(prefix) :]: v for k, v in flat.items() if k.startswith(prefix)}
        obj.load_state_dict(_join(flat[f"{name}.skeleton"][0], tensors))


def _template(meta: Any, name: str) -> dict[str, Any]:
    """A flat DCP template of everything saved under ``name``: empty full tensors of the
    saved sizes and dtypes, placeholders for the pickled skeleton."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    keys = [k for k in meta.state_dict_metadata if k.startswith(f"{name}.")]
    skeleton = f"{name}.skeleton"
    if skeleton not in keys:
        raise KeyError(f"checkpoint: no object {name!r} saved by beyondgrad.distributed.save")
    out: dict[str, Any] = {}
    for key in keys:
        item = meta.state_dict_metadata[key]
        if key == skeleton or key.startswith(f"{name}.tensors."):
            if isinstance(item, TensorStorageMetadata):
                out[key] = torch.empty(tuple(item.size), dtype=item.properties.dtype)
            else:
                out[key] = None
    return out


def _group_kwargs(group: Group | None) -> dict[str, Any]:
    if group is None:
        return {"no_dist": True}
    return {"process_group": group}


@contextmanager
def _quiet(group: Group | None) -> Iterator[None]:
    """Without a group, silence DCP's warning that it runs in a single process (intended)."""
    with warnings.catch_warnings():
        if group is None:
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        yield


__all__ = ["load", "save"]
