"""The torch optimizer shell that KFAC, SINGD and SIRFShampoo share.

It composes the components of this package into one step::

    gradients averaged over ranks (without DDP)          statistics.average_gradients_over_ranks
    statistics since the last step, averaged, checked    statistics (subclass: _collect_statistics)
    gradients checked finite
    per preconditioned layer, with its param group read now (schedulers, checkpoints):
        fold statistics in, refresh when due            subclass: _update_preconditioner
                                                         (averages, schedule, damping)
        precondition the gradients                      subclass: _preconditioned_gradients
        graft                                            grafting.graft
    one scale for all directions                         clipping.clip_scale
    momentum, decoupled weight decay, learning rate      update.descend_many_
    AdamW for every other parameter                      fallback.adamw_many_

The training loop is the ordinary one plus one ``with`` line around the forward pass (which
records what the method needs: the layer inputs and, on statistics steps, the curvature
vectors' backward; SIRFShampoo: the batch size)::

    for X, y in loader:
        opt.zero_grad()
        with opt.capture():
            loss = loss_fn(model(X), y)
        loss.backward()
        opt.step()

Gradient accumulation: several ``capture`` + ``backward`` blocks before one ``step``; the
statistics are averaged over all their samples. ``torch.amp.GradScaler``: use
``scaler.step(opt)`` as usual (the statistics come from the unscaled loss). Data parallel
(``torch.distributed`` initialized): statistics are averaged over ranks, weighted by their
sample counts; gradients too unless the model is wrapped in ``DistributedDataParallel``
(which already averages them). ``capture`` leaves no hook on the model after the block.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ..distributed import fsdp
from .clipping import check_clip, clip_factor
from .fallback import ADAMW_DEFAULTS, adamw_many_, check_adamw, step_counter_as_int
from .fsdp import full_parameters
from .grafting import check_grafting, graft_many
from .products import ProductCache, kronecker_solve
from .routing import (
    NO_STATISTICS,
    Signature,
    check_signature,
    kronecker_layers,
    parameter_signature,
    routing_table,
)
from .schedule import (
    RENAMED_GROUP_KEYS,
    check_every,
    check_warmup,
    is_due,
    rename_group_keys,
    scheduled_damping,
    warmup_factor,
)
from .statistics import average_gradients_over_ranks, distributed_world, finite_flags
from .update import descend_many_

Directions = list[tuple[Tensor, Tensor, dict[str, Any]]]
"""``(parameter, direction, param group)`` per preconditioned parameter of a step."""
Layer = tuple[str, dict[str, Any], dict[str, Any], list[Tensor]]
"""``(name, state, param group, parameters)`` of a preconditioned layer."""


class CurvatureOptimizer(Optimizer):
    """Base class of :class:`~beyondgrad.optim.KFAC`, :class:`~beyondgrad.optim.SINGD` and
    :class:`~beyondgrad.optim.SIRFShampoo` (not used directly).

    Args:
        model: the network (hooks on its modules record what the method needs).
        params: parameters or param groups (default: all of ``model``'s trainable
            parameters); a group with ``precondition=False`` goes to the AdamW fallback.
            Every parameter the method cannot precondition also goes there, never left
            untrained; :meth:`routing` reports where each one went and why.
        defaults: param-group defaults (``lr``, ``momentum``, ``weight_decay``,
            ``refresh_every``, ``grafting``, the method's own; the fallback's are added).
        loss_fn: the loss module, for methods that backpropagate curvature vectors.
        seed: seeds the Monte-Carlo draws (per step, so that a resume draws the same).

    Attributes:
        steps: completed steps (saved by ``state_dict``).
        layers: per preconditioned layer (module or parameter name) its state; ``"params"``
            holds the names of the parameters it covers.
        routes: parameter name -> ``(target, reason)``.
        kl_clip, max_update_norm: the clipping bounds (None: off).
    """

    method = "base"

    def __init__(
        self,
        model: nn.Module,
        params: Iterable[Any] | None,
        defaults: dict[str, Any],
        loss_fn: nn.Module | None = None,
        seed: int = 0,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
        base = {**ADAMW_DEFAULTS, "grafting": None, "refresh_every": 1, "warmup": 0}
        for key, value in base.items():
            defaults.setdefault(key, value)
        self._groups_complete = False
        super().__init__(params, defaults)
        self._groups_complete = True
        self.model, self.loss_fn, self.seed = model, loss_fn, seed
        self.names = {id(p): n for n, p in model.named_parameters()}
        for group in self.param_groups:
            if any(id(p) not in self.names for p in group["params"]):
                raise ValueError("every optimized parameter must belong to `model`")
            self._validate_group(group)
        self.steps = 0
        self.layers: dict[str, dict[str, Any]] = {}
        self.routes: dict[str, tuple[str, str]] = {}
        self.kl_clip: float | None = None
        self.max_update_norm: float | None = None
        self._group_index = {id(p): i for i, g in enumerate(self.param_groups) for p in g["params"]}
        self._refused: dict[str, str] = {}
        self._products = ProductCache()  # the per-step products prepared at refreshes

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group (only while constructing: a group added later is not routed).
        Deprecated keys (``T``) are renamed with a ``DeprecationWarning``.

        Args:
            param_group: a ``torch.optim`` param group (``{"params": [...], **settings}``).

        Raises:
            RuntimeError: called after construction.
        """
        if getattr(self, "_groups_complete", False):
            raise RuntimeError(
                f"{type(self).__name__}: give every param group to the constructor (a group "
                "added later would not be routed to the preconditioner or the fallback)"
            )
        if isinstance(param_group, dict):
            rename_group_keys(param_group, type(self).__name__)
        super().add_param_group(param_group)

    def _validate_group(self, group: dict[str, Any]) -> None:
        """Check (and normalize in place) one param group's settings; subclasses extend it.
        Runs at construction and on the groups of a state_dict before it is loaded."""
        _check_common(group)
        check_adamw(group)
        check_grafting(group["grafting"])
        check_every("refresh_every", group["refresh_every"])
        check_warmup(group["warmup"])

    def group_of(self, p: Tensor) -> dict[str, Any]:
        """The param group of ``p`` as it is now (after schedulers and ``load_state_dict``)."""
        return self.param_groups[self._group_index[id(p)]]

    def _set_clipping(self, kl_clip: float | None, max_update_norm: float | None) -> None:
        """Validate and set the global clipping bounds (see :mod:`.clipping`)."""
        check_clip("kl_clip", kl_clip)
        check_clip("max_update_norm", max_update_norm)
        self.kl_clip, self.max_update_norm = kl_clip, max_update_norm

    def _set_compile(self, compile_update: bool | str) -> None:
        """Validate and set the ``compile_update`` flag (see :meth:`compiled`)."""
        if not isinstance(compile_update, (bool, str)):
            raise ValueError(
                f"compile_update must be a bool or a backend name, got {compile_update!r}"
            )
        self.compile_update = compile_update

    def compiled(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` through ``torch.compile`` when ``compile_update`` is set (True: the default
        backend; a string: that backend, e.g. ``"eager"``), else ``fn`` itself.

        Args:
            fn: a per-step tensor function of the method (the preconditioning product).
        """
        flag = getattr(self, "compile_update", False)
        if flag is False:
            return fn
        backend = "inductor" if flag is True else flag
        return torch.compile(fn, backend=backend, dynamic=False)

    def _solver(self) -> Callable[..., Tensor]:
        """:func:`~.products.kronecker_solve`, through :meth:`compiled` (built once)."""
        solve = self.__dict__.get("_compiled_solve")
        if solve is None:
            solve = self._compiled_solve = self.compiled(kronecker_solve)
        return solve

    def _refresh_due(self, group: dict[str, Any]) -> bool:
        return is_due(self.steps, group["refresh_every"])

    def lr_scale(self, group: dict[str, Any]) -> float:
        """The warm-up factor of ``group``'s learning rates at this step (see
        :func:`~beyondgrad.optim.schedule.warmup_factor`)."""
        return warmup_factor(self.steps, group["warmup"])

    def damping(self, group: dict[str, Any]) -> float:
        """``group``'s damping at this step (raised during the warm-up, see
        :func:`~beyondgrad.optim.schedule.scheduled_damping`)."""
        return scheduled_damping(group["damping"], self.steps, group["warmup"])

    # -- routing ------------------------------------------------------------------------------
    def routing(self) -> str:
        """A table: every optimized parameter, where it goes (the method or ``adamw``), why."""
        return routing_table(self.routes)

    def _route(self, preconditioned: dict[str, str]) -> None:
        """``preconditioned``: parameter name -> reason, for those the method takes."""
        for group in self.param_groups:
            for p in group["params"]:
                name = self.names[id(p)]
                if not group["precondition"]:
                    self.routes[name] = ("adamw", "its param group has precondition=False")
                elif name in preconditioned:
                    self.routes[name] = (self.method, preconditioned[name])
                else:
                    self.routes[name] = ("adamw", self._why_not(name))

    def _why_not(self, name: str) -> str:
        return self._refused.get(name, f"{self.method} has no rule for it")

    def _drop_layer(self, name: str, reason: str) -> None:
        """Send a layer's parameters to the fallback (its preconditioner state is dropped)."""
        for pname in self.layers.pop(name)["params"]:
            self.routes[pname] = ("adamw", reason)

    def _preconditioned(self, p: Tensor) -> bool:
        return self.routes[self.names[id(p)]][0] == self.method

    # -- what the subclasses provide ----------------------------------------------------------
    @contextmanager
    def _record(self) -> Iterator[None]:
        """What ``capture`` records around the forward pass (nothing by default)."""
        yield

    def _collect_statistics(self) -> dict[str, Any]:
        """The statistics since the last step per layer (reset), checked; {} by default."""
        return {}

    def _update_preconditioner(
        self, state: dict[str, Any], group: dict[str, Any], stats: Any, params: list[Tensor]
    ) -> None:
        """Fold this step's ``stats`` of a layer (None: none) into its ``state``; refresh the
        preconditioner when ``_refresh_due(group)``."""
        raise NotImplementedError

    def _preconditioned_gradients(
        self, state: dict[str, Any], group: dict[str, Any], params: list[Tensor]
    ) -> list[Tensor]:
        """The preconditioned gradient of each of ``params`` (which have gradients)."""
        raise NotImplementedError

    def _after_preconditioner_updates(self) -> None:
        """Runs once per step after every layer's :meth:`_update_preconditioner` (e.g. the
        deferred owner-based refreshes of :mod:`.ownership`); nothing by default."""

    # -- the step -----------------------------------------------------------------------------
    @contextmanager
    def capture(self) -> Iterator[CurvatureOptimizer]:
        """Wrap the forward pass (model call and ``loss_fn`` call) of every training step.

        KFAC and SINGD: on statistics steps this backpropagates the curvature vectors when the
        block exits (the forward graph is kept for the ordinary ``loss.backward()``); with
        ``fisher_type="empirical"`` nothing is backpropagated: the statistics come from the
        layer-output gradients of the ordinary ``loss.backward()`` after the block, read at
        ``step()``.
        SIRFShampoo: counts the batch size. Hooks are removed when the block exits.
        """
        with self._record():
            yield self

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        """One update of every parameter (preconditioned ones and the AdamW fallback).

        Args:
            closure: re-evaluates the model and returns the loss (called with gradients
                enabled); optional, as in ``torch.optim``.

        Returns:
            What ``closure`` returned, else ``None``.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with full_parameters(self) as sharded:  # FSDP2: whole parameters for the step
            self._step(sharded)
        return loss

    def _step(self, sharded: bool) -> None:
        """The step on plain parameters (``sharded``: FSDP2 averaged the gradients)."""
        if not sharded and not isinstance(self.model, nn.parallel.DistributedDataParallel):
            average_gradients_over_ranks(p for g in self.param_groups for p in g["params"])
        stats = self._collect_statistics()
        self._check_grads()
        directions = self._directions(stats)
        scales = {id(g): self.lr_scale(g) for g in self.param_groups}
        scale = clip_factor(
            [(d, p.grad, g["lr"] * scales[id(g)]) for p, d, g in directions],
            self.kl_clip,
            self.max_update_norm,
        )  # a 0-d tensor when clipping is on: no host synchronization
        by_group: dict[int, tuple[dict[str, Any], list[Tensor], list[Tensor]]] = {}
        for p, d, group in directions:  # one batched update per param group
            _, ps, ds = by_group.setdefault(id(group), (group, [], []))
            ps.append(p)
            ds.append(d if scale is None else d * scale.to(d.dtype))
        for group, ps, ds in by_group.values():
            states = [self.state[p] for p in ps]
            descend_many_(ps, ds, group, states, scales[id(group)])
        self._fallback_step(scales)
        self.steps += 1

    def _directions(self, stats: dict[str, Any]) -> Directions:
        """Update every layer's preconditioner (refreshes batched over layers by the method,
        :meth:`_finish_refresh`); the grafted directions (:meth:`_precondition_all`)."""
        named = dict(self.model.named_parameters())
        items: list[Layer] = []
        for name, state in self.layers.items():
            params = [named[n] for n in state["params"]]
            group = self.group_of(params[0])
            self._update_preconditioner(state, group, stats.get(name), params)
            if params[0].grad is not None:
                items.append((name, state, group, params))
        self._after_preconditioner_updates()
        self._finish_refresh()
        directions: Directions = []
        preconditioned = self._precondition_all(items)
        self._products.end_step()  # drop what no layer used this step
        by_group: dict[int, tuple[dict[str, Any], list[Tensor], list[Tensor]]] = {}
        for (_, _, group, params), ds in zip(items, preconditioned):
            _, ps, dirs = by_group.setdefault(id(group), (group, [], []))
            ps.extend(params)
            dirs.extend(ds)
        for group, ps, dirs in by_group.values():  # grafted per param group, batched
            grafted = graft_many(dirs, [p.grad for p in ps], group, [self.state[p] for p in ps])
            directions += [(p, d, group) for p, d in zip(ps, grafted)]
        return directions

    def _finish_refresh(self) -> None:
        """Work that ``_update_preconditioner`` deferred to be done for all layers at once
        (KFAC: one batched eigendecomposition per factor shape); nothing by default."""

    def _precondition_all(self, items: list[Layer]) -> list[list[Tensor]]:
        """The preconditioned gradients of every ``(name, state, group, params)`` in
        ``items`` (one layer after the other by default; KFAC batches layers of one shape)."""
        return [self._preconditioned_gradients(s, g, ps) for _, s, g, ps in items]

    def _check_grads(self) -> None:
        named = [(p, p.grad) for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not named:
            return
        finite = finite_flags([grad for _, grad in named])
        if bool(finite.all()):  # one synchronization for all parameters
            return
        bad = [self.names[id(p)] for (p, _), ok in zip(named, finite.tolist()) if not ok]
        raise FloatingPointError(
            f"{type(self).__name__}: non-finite gradient of {', '.join(repr(b) for b in bad)}; "
            "the optimizer state was left unchanged (with mixed precision, step through "
            "torch.amp.GradScaler.step, which skips such steps)"
        )

    def _fallback_step(self, scales: dict[int, float]) -> None:
        """AdamW for every parameter routed to the fallback (see :mod:`.fallback`)."""
        for group in self.param_groups:
            ps = [p for p in group["params"] if p.grad is not None and not self._preconditioned(p)]
            if ps:
                adamw_many_(ps, group, [self.state[p] for p in ps], scales[id(group)])

    # -- state --------------------------------------------------------------------------------
    def _signature(self) -> Signature:
        params = [p for g in self.param_groups for p in g["params"]]
        names = [self.names[id(p)] for p in params]
        return parameter_signature(names, [tuple(p.shape) for p in params], self.routes)

    def state_dict(self) -> dict[str, Any]:
        """torch's state (per-parameter state, param groups) plus, under ``"beyondgrad"``,
        the method, ``steps``, every layer's preconditioner state and the routing signature
        (name, shape, target, reason per optimized parameter)."""
        sd = super().state_dict()
        sd["beyondgrad"] = {
            "method": self.method,
            "steps": self.steps,
            "layers": {name: _copy(state) for name, state in self.layers.items()},
            "params": self._signature(),
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a ``state_dict`` of the same method, model and routing; its param-group
        settings (learning rates of a scheduler, damping, ...) replace the current ones. A
        layer saved before the warm start existed (no ``started`` flag where this optimizer
        keeps one) counts as started once the saved run has stepped.

        Raises:
            ValueError: another method, other parameter shapes (a model of other widths),
                another routing, other layers, or invalid group settings; nothing is changed.
        """
        sd = dict(state_dict)
        extra = sd.pop("beyondgrad", None)
        if extra is None or extra.get("method") != self.method:
            raise ValueError(
                f"not a {type(self).__name__} state_dict (saved by "
                f"{None if extra is None else extra.get('method')!r})"
            )
        dropped = self._check_compatible(sd, extra)
        if len(sd["param_groups"]) == len(self.param_groups):
            sd["param_groups"] = [
                _migrate_group(saved, now)
                for saved, now in zip(sd["param_groups"], self.param_groups)
            ]
        for group in sd["param_groups"]:
            self._validate_group(group)
        sd["state"] = {k: step_counter_as_int(v) for k, v in sd["state"].items()}
        super().load_state_dict(sd)
        self.steps = extra["steps"]
        for name in dropped:
            self._drop_layer(name, NO_STATISTICS)
        device = next(self.model.parameters()).device
        for name, saved in extra["layers"].items():
            current = self.layers[name]
            legacy = _legacy_started(saved, current, extra["steps"])
            self.layers[name] = {**current, **_copy(saved, device), **legacy}
        self._products.clear()

    def _check_compatible(self, sd: dict[str, Any], extra: dict[str, Any]) -> list[str]:
        """The layers the saved state moved to the fallback; raises on any mismatch."""
        owner = type(self).__name__
        if "params" in extra:
            moved = set(check_signature(extra["params"], self._signature(), owner))
            dropped = [n for n, s in self.layers.items() if set(s["params"]) & moved]
        else:  # older state_dicts: check the shapes of the per-parameter state
            _check_state_shapes(sd, [p for g in self.param_groups for p in g["params"]], owner)
            dropped = sorted(set(self.layers) - set(extra["layers"])) if extra["steps"] else []
        expected = set(self.layers) - set(dropped)
        if set(extra["layers"]) != expected:
            raise ValueError(
                f"{owner}.load_state_dict: the state_dict has preconditioner state for layers "
                f"{sorted(extra['layers'])}, this optimizer for {sorted(expected)}; nothing "
                "was loaded"
            )
        return dropped

    def optimizer_state_bytes(self) -> int:
        """Bytes held by the optimizer state (preconditioners, momenta, AdamW moments) and by
        the per-step products prepared at the last refresh, on this rank (per-element state
        of an FSDP2 model counts its local shard; the replicated preconditioners count whole)."""
        states = (*self.state.values(), *self.layers.values())
        return sum(_nbytes(v) for s in states for v in s.values()) + self._products.nbytes()


def _copy(value: Any, device: torch.device | None = None) -> Any:
    """A copy of nested dicts/lists/tuples of tensors (moved to ``device`` when given)."""
    if isinstance(value, Tensor):
        return value.to(device, copy=True) if device is not None else value.clone()
    if isinstance(value, dict):
        return {k: _copy(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_copy(v, device) for v in value)
    return value


def _legacy_started(saved: dict[str, Any], current: dict[str, Any], steps: int) -> dict[str, Any]:
    """A layer state saved before the warm start existed has no ``started`` flag: the layer
    counts as started once the run has stepped (else it keeps the current flag)."""
    if "started" in current and "started" not in saved:
        return {"started": bool(steps) or bool(current["started"])}
    return {}


def _nbytes(value: Any) -> int:
    if isinstance(value, Tensor):  # a DTensor (FSDP2 state) counts its local shard only
        return fsdp.local_nbytes(value)
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


def _migrate_group(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
    """A saved param group with deprecated keys renamed and settings it lacks (older
    state_dicts, e.g. ``refresh_every`` or ``grafting``) taken from the current group."""
    out = dict(saved)
    for old, new in RENAMED_GROUP_KEYS.items():
        if old in out:
            out.setdefault(new, out.pop(old))
    for key, value in current.items():
        if key != "params":
            out.setdefault(key, value)
    return out


def _check_state_shapes(sd: dict[str, Any], params: list[Tensor], owner: str) -> None:
    for index, state in sd.get("state", {}).items():
        if not isinstance(index, int) or index >= len(params):
            continue
        for key, value in state.items():
            if isinstance(value, Tensor) and value.ndim and value.shape != params[index].shape:
                raise ValueError(
                    f"{owner}.load_state_dict: the state_dict was saved for another model "
                    f"(its {key!r} of parameter {index} has shape {list(value.shape)}, the "
                    f"parameter {list(params[index].shape)}); nothing was loaded"
                )


def _check_common(group: dict[str, Any]) -> None:
    if group["lr"] < 0 or not math.isfinite(group["lr"]):
        raise ValueError(f"lr must be a finite non-negative number, got {group['lr']}")
    if group["weight_decay"] < 0:
        raise ValueError(f"weight_decay must be non-negative, got {group['weight_decay']}")
    if not 0 <= group["momentum"] < 1:
        raise ValueError(f"momentum must be in [0, 1), got {group['momentum']}")


__all__ = ["CurvatureOptimizer", "distributed_world", "kronecker_layers"]
