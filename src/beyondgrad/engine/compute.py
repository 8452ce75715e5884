"""``bg.compute`` and ``bg.capture``: one forward, one backward, every requested quantity.

``capture`` is the building block: hooks are in place inside the ``with`` block, the user runs an
ordinary forward pass and loss, then ``session.compute(loss)`` backpropagates and reduces.
``compute`` wraps it for ``(X, y)`` batches.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from ..quantities import BatchGrad, Grad, Quantity, ReduceContext
from ..rules import Form, generic_forms, merge_forms, uses_batch_statistics
from .attribution import attribute
from .capture import Call, Recorder, Unit, plan_units
from .losses import check_loss_fn, check_target


class Result:
    """What :func:`compute` returns.

    ``loss``: the scalar loss (detached). ``grad``: the gradient per parameter name (only when
    :class:`~beyondgrad.Grad` was requested). ``result[Q]`` (a quantity class or instance):
    ``{parameter name: tensor}``; names as in ``model.named_parameters()``. ``rules``: the rule
    serving each parameter. ``subsampling``: the sample indices of per-sample quantities.
    """

    def __init__(
        self,
        loss: Tensor,
        output: Tensor,
        values: dict[Quantity, dict[str, Tensor]],
        rules: dict[str, str],
        subsampling: Tensor | None,
    ):
        self.loss = loss
        self.output = output
        self.rules = rules
        self.subsampling = subsampling
        self._values = values

    def _find(self, key: Quantity | type[Quantity]) -> Quantity:
        if isinstance(key, Quantity):
            if key not in self._values:
                raise KeyError(f"{key!r} was not computed; requested: {list(self._values)}")
            return key
        matches = [q for q in self._values if type(q) is key]
        if not matches:
            raise KeyError(f"{key.__name__} was not computed; requested: {list(self._values)}")
        if len(matches) > 1:
            raise KeyError(f"several {key.__name__} were computed; index with the instance")
        return matches[0]

    def __getitem__(self, key: Quantity | type[Quantity]) -> dict[str, Tensor]:
        return self._values[self._find(key)]

    def __contains__(self, key: object) -> bool:
        try:
            self._find(key)  # type: ignore[arg-type]
        except (KeyError, TypeError):
            return False
        return True

    @property
    def grad(self) -> dict[str, Tensor]:
        if Grad() not in self._values:
            raise AttributeError("the gradient was not computed: pass bg.Grad() to compute()")
        return self._values[Grad()]

    def quantities(self) -> list[Quantity]:
        return list(self._values)

    def __repr__(self) -> str:
        names = ", ".join(repr(q) for q in self._values)
        return f"Result(loss={self.loss.item():.6g}, quantities=[{names}])"


def _check_quantities(quantities: Sequence[Any]) -> list[Quantity]:
    out: list[Quantity] = []
    for q in quantities:
        if isinstance(q, type) and issubclass(q, Quantity):
            raise TypeError(f"pass an instance, e.g. bg.{q.__name__}(), not the class")
        if not isinstance(q, Quantity):
            raise TypeError(f"{q!r} is not a beyondgrad quantity")
        if q not in out:
            out.append(q)
    if not out:
        raise ValueError("no quantities requested (e.g. bg.BatchGrad(), bg.BatchL2())")
    return out


def _check_samples_independent(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and uses_batch_statistics(module):
            raise RuntimeError(
                f"module '{name}' ({type(module).__name__}) normalizes with batch statistics "
                "(training mode or track_running_stats=False), which couples the samples: "
                "per-sample quantities are undefined. Call model.eval() first."
            )
        if isinstance(module, nn.Embedding) and module.scale_grad_by_freq:
            raise RuntimeError(
                f"module '{name}' (Embedding with scale_grad_by_freq=True) scales gradients by "
                "batch-wide counts, which couples the samples: per-sample quantities are "
                "undefined."
            )


def _index(
    subsampling: Sequence[int] | Tensor | None, N: int, device: torch.device
) -> Tensor | None:
    if subsampling is None:
        return None
    idx = torch.as_tensor(subsampling, dtype=torch.long, device=device).reshape(-1)
    if idx.numel() == 0:
        raise ValueError("subsampling is empty")
    if int(idx.min()) < -N or int(idx.max()) >= N:
        raise IndexError(
            f"subsampling index out of range for a batch of {N} samples: {idx.tolist()}"
        )
    return idx % N


def _leading_size(X: Any) -> int | None:
    leaves = [t for t in tree_flatten(X)[0] if isinstance(t, Tensor) and t.ndim > 0]
    return leaves[0].shape[0] if leaves else None


class Session:
    """Returned by :func:`capture`; see there."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        quantities: list[Quantity],
        subsampling: Sequence[int] | Tensor | None,
        generator: torch.Generator | None,
    ):
        self.model, self.loss_fn, self.quantities = model, loss_fn, quantities
        self.subsampling, self.generator = subsampling, generator
        self.per_sample = any(q.per_sample for q in quantities)
        if self.per_sample:
            _check_samples_independent(model)
        self.units = plan_units(model)
        self.recorder = Recorder(self.units)
        self.loss_calls: list[tuple[Tensor, Tensor, Tensor]] = []
        self._loss_handle: Any = None

    # -- forward ------------------------------------------------------------------------------
    def _loss_hook(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        if torch.is_grad_enabled() and self.recorder.enabled:
            self.loss_calls.append((args[0], args[1], output))

    def __enter__(self) -> Session:
        self.recorder.__enter__()
        self._loss_handle = self.loss_fn.register_forward_hook(self._loss_hook)
        return self

    def __exit__(self, *exc: object) -> None:
        self.recorder.remove()
        if self._loss_handle is not None:
            self._loss_handle.remove()
            self._loss_handle = None

    # -- backward and reduction ---------------------------------------------------------------
    def _loss_record(self, loss: Tensor) -> tuple[Tensor, Tensor]:
        matches = [(f, y) for f, y, out in self.loss_calls if out is loss]
        if not matches:
            raise RuntimeError(
                "the loss passed to compute() was not produced directly by loss_fn inside the "
                "capture block (was it scaled, summed or modified afterwards?). Quantities "
                "refer to the loss exactly as loss_fn defines it; change loss_fn instead."
            )
        if len(self.loss_calls) > 1:
            raise RuntimeError("loss_fn was called more than once inside the capture block")
        return matches[0]

    def compute(self, loss: Tensor, out: Result | None = None) -> Result:
        """Backpropagate ``loss`` once and reduce every requested quantity. ``out``: a previous
        result whose per-sample tensors (``BatchGrad``) may be overwritten to save allocation."""
        self.__exit__()
        output, target = self._loss_record(loss)
        check_target(self.loss_fn, output, target)
        if not bool(torch.isfinite(loss)):
            raise FloatingPointError(f"the loss is not finite ({loss.item()})")
        N = output.shape[0]
        names = {id(p): n for n, p in self.model.named_parameters()}
        want_grad = Grad() in self.quantities
        only_grad = self.quantities == [Grad()]
        if not only_grad:  # a plain gradient needs no attribution to layer calls
            attribute(loss, self.units, names)
        index = _index(self.subsampling, N, loss.device) if self.per_sample else None

        # one backward pass: to every recorded layer output, and to the parameters only when
        # the gradient itself is requested (autograd forms it at the cost of a plain backward)
        calls = [] if only_grad else [(u, c) for u in self.units for c in u.calls]
        edges = [(u, c, i) for u, c in calls for i, e in enumerate(c.edges) if e is not None]
        params = _served_parameters(self.units) if want_grad else []
        targets = [c.edges[i] for _, c, i in edges] + params
        grads = torch.autograd.grad(loss, targets, allow_unused=True) if targets else ()
        _check_finite(grads, [u.name for u, _, _ in edges] + [names[id(p)] for p in params])
        param_grads = {id(p): g for p, g in zip(params, grads[len(edges) :])}
        out_grads: dict[int, list[Tensor | None]] = {
            id(c): [None] * len(c.outputs) for _, c in calls
        }
        for (_, c, i), g in zip(edges, grads):
            if g is not None:
                shape = c.edge_shapes[i]
                out_grads[id(c)][i] = g.view(shape) if shape is not None else g

        forms: dict[int, list[Form]] = {}
        for unit, call in calls:
            gs = out_grads[id(call)]
            if all(g is None for g in gs):
                continue
            for local, form in self._call_forms(unit, call, gs, N).items():
                forms.setdefault(id(unit.params[local]), []).append(form)

        ctx = ReduceContext(N, self.loss_fn.reduction)  # type: ignore[arg-type]
        values: dict[Quantity, dict[str, Tensor]] = {q: {} for q in self.quantities}
        # per-sample gradients first: once materialized, the other reductions read them
        order = [q for q in self.quantities if not isinstance(q, Grad)]
        order.sort(key=lambda q: not isinstance(q, BatchGrad))
        rules = _rules_by_name(self.units, names)
        for name, param in self.model.named_parameters():
            if name not in rules:
                continue
            if want_grad:
                g = param_grads.get(id(param))
                values[Grad()][name] = g if g is not None else torch.zeros_like(param)
            if not order:
                continue
            form_list = forms.get(id(param))
            if not form_list:
                for q in order:
                    values[q][name] = _zeros(q, param, N if index is None else len(index), ctx)
                continue
            form = merge_forms(form_list)
            if want_grad and index is None:
                form.seed("grad", values[Grad()][name])
            selected = form.select(index) if index is not None else form
            for q in order:
                buffer = _buffer(out, q, name, (selected.num_samples, *param.shape), param)
                values[q][name] = q.reduce(selected, ctx, buffer)
        return Result(loss.detach(), output.detach(), values, rules, index)

    def _call_forms(
        self, unit: Unit, call: Call, gs: list[Tensor | None], N: int
    ) -> dict[str, Form]:
        _check_versions(unit, call)
        if unit.rule is not None:
            g = gs[0]
            if g is None or not unit.params:
                return {}
            if call.x.ndim == 0 or call.x.shape[0] != N or g.shape[0] != N:
                raise RuntimeError(
                    f"module '{unit.name}': expected the sample axis (length {N}) first, got "
                    f"input {tuple(call.x.shape)} and output {tuple(g.shape)}. beyondgrad treats "
                    "the leading axis of every layer's input as the sample axis."
                )
            local = unit.rule.forms(unit.module, call.x.detach(), g)
            return {k: v for k, v in local.items() if k in unit.params}
        with self.recorder.paused(), torch.enable_grad():
            return generic_forms(
                unit.module, unit.params, call.args, call.kwargs, call.output, gs, N
            )


def _buffer(
    out: Result | None, q: Quantity, name: str, shape: tuple[int, ...], param: Tensor
) -> Tensor | None:
    """The tensor of ``out`` that may receive quantity ``q`` of parameter ``name``."""
    if out is None or not isinstance(q, BatchGrad) or q not in out:
        return None
    buf = out[q].get(name)
    if buf is None or buf.shape != shape or buf.dtype != param.dtype or buf.device != param.device:
        return None
    return buf


def _zeros(q: Quantity, param: Tensor, S: int, ctx: ReduceContext) -> Tensor:
    from ..rules.forms import SampleForm

    return q.reduce(SampleForm(param.new_zeros(S, *param.shape)), ctx)


def _rules_by_name(units: list[Unit], names: dict[int, str]) -> dict[str, str]:
    rules: dict[str, str] = {}
    for unit in units:
        for p in unit.params.values():
            name = names[id(p)]
            rules[name] = (
                unit.rule_name if name not in rules or rules[name] == unit.rule_name else "mixed"
            )
    return rules


def _served_parameters(units: list[Unit]) -> list[nn.Parameter]:
    seen: dict[int, nn.Parameter] = {}
    for unit in units:
        for p in unit.params.values():
            seen.setdefault(id(p), p)
    return list(seen.values())


def _check_finite(grads: Sequence[Tensor | None], where: list[str]) -> None:
    """Raise on a non-finite gradient. One reduction per tensor (a sum is non-finite if any
    entry is); only on failure is each tensor inspected element-wise."""
    present = [(i, g) for i, g in enumerate(grads) if g is not None]
    if not present or bool(torch.stack([g.sum() for _, g in present]).isfinite().all()):
        return
    for i, g in present:
        if not bool(torch.isfinite(g).all()):
            raise FloatingPointError(f"non-finite gradient backpropagated to '{where[i]}'")


def _check_versions(unit: Unit, call: Call) -> None:
    for t, version in call.input_versions:
        if t._version != version:
            raise RuntimeError(
                f"an input of module '{unit.name}' was modified in place after the module "
                "used it; its recorded value is no longer valid. Avoid the in-place operation "
                "(e.g. use nn.ReLU(inplace=False) on that tensor)."
            )


@contextmanager
def capture(
    model: nn.Module,
    loss_fn: nn.Module,
    *quantities: Quantity,
    subsampling: Sequence[int] | Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[Session]:
    """Record an ordinary forward pass, then compute quantities from its loss::

        with bg.capture(model, loss_fn, bg.BatchL2()) as session:
            loss = loss_fn(model(X), y)
        res = session.compute(loss)

    The loss must be the tensor ``loss_fn`` returned (not scaled or modified afterwards). Hooks
    are removed when the block exits, also on errors.
    """
    check_loss_fn(loss_fn)
    session = Session(model, loss_fn, _check_quantities(quantities), subsampling, generator)
    with session:
        yield session


def _call_model(model: nn.Module, X: Any) -> Any:
    if isinstance(X, Mapping):
        return model(**X)
    if isinstance(X, (tuple, list)):
        return model(*X)
    return model(X)


def compute(
    model: nn.Module,
    loss_fn: nn.Module,
    X: Any,
    y: Tensor,
    *quantities: Quantity,
    subsampling: Sequence[int] | Tensor | None = None,
    generator: torch.Generator | None = None,
    accumulate_grad: bool = False,
    out: Result | None = None,
) -> Result:
    """One forward and one backward pass of ``loss_fn(model(X), y)``; every quantity.

    ``X``: a tensor (``model(X)``), a tuple/list (``model(*X)``) or a dict (``model(**X)``);
    the leading axis of its tensors and of ``y`` is the sample axis. ``subsampling``: sample
    indices for per-sample quantities. ``generator``: for Monte-Carlo quantities.
    ``accumulate_grad``: also add the gradient to ``param.grad`` (needs ``bg.Grad()``);
    otherwise parameters and their ``.grad`` are left untouched. ``out``: a previous result
    of the same shapes whose per-sample gradients are overwritten instead of allocating new
    memory (a large fresh allocation costs more than computing per-sample gradients).
    """
    if accumulate_grad and Grad() not in quantities:
        raise ValueError("accumulate_grad=True needs bg.Grad() among the quantities")
    n_x = _leading_size(X)
    if n_x is None:
        raise ValueError("X contains no tensor with a leading sample axis")
    if y.ndim == 0 or y.shape[0] != n_x:
        raise ValueError(
            f"batch sizes disagree: X has {n_x} samples, y has "
            f"{y.shape[0] if y.ndim else 'no sample axis'}"
        )
    with capture(
        model, loss_fn, *quantities, subsampling=subsampling, generator=generator
    ) as session:
        loss = loss_fn(_call_model(model, X), y)
    result = session.compute(loss, out=out)
    if accumulate_grad:
        params = dict(model.named_parameters())
        for name, g in result.grad.items():
            p = params[name]
            p.grad = g.detach().clone() if p.grad is None else p.grad + g
    return result
