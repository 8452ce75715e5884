"""``bg.compute``: one forward and one backward pass of ``loss_fn(model(X), y)``, every
requested quantity (a thin wrapper around :func:`~beyondgrad.engine.session.capture`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .backprop import VectorKind
from .capture import check_not_meta, plan_layers
from .coupling import COUPLED_MESSAGE, known_coupling, remember_coupling, samples_coupled
from .leaves import leaves
from .losses import check_loss_fn
from .result import Result, is_gradient
from .samples import ShapeRecorder, is_probed, probe_size, remember_probe, signature
from .session import (
    SamplesCoupledError,
    capture,
    check_quantities,
    check_samples_independent,
    needs_independent_samples,
)
from .state import preserved_buffers


def call_model(model: nn.Module, X: Any) -> Any:
    """``model(**X)`` for a mapping, ``model(*X)`` for a tuple/list, else ``model(X)``."""
    if isinstance(X, Mapping):
        return model(**X)
    if isinstance(X, (tuple, list)):
        return model(*X)
    return model(X)


def _check_batch(X: Any, y: Tensor) -> None:
    """``X`` holds a tensor with a leading sample axis and ``y`` has as many samples."""
    found = [t for t in leaves(X) if isinstance(t, Tensor) and t.ndim > 0]
    if not found:
        raise ValueError("X contains no tensor with a leading sample axis")
    n_x = found[0].shape[0]
    if y.ndim == 0 or y.shape[0] != n_x:
        raise ValueError(
            f"batch sizes disagree: X has {n_x} samples, y has "
            f"{y.shape[0] if y.ndim else 'no sample axis'}"
        )


def compute(
    model: nn.Module,
    loss_fn: nn.Module,
    X: Any,
    y: Tensor,
    *quantities: Any,
    subsampling: Sequence[int] | Tensor | None = None,
    generator: torch.Generator | None = None,
    accumulate_grad: bool = False,
    out: Result | None = None,
    vectors: Sequence[VectorKind] = (),
    check_samples: bool = True,
) -> Result:
    """One forward and one backward pass of ``loss_fn(model(X), y)``; every quantity.

    The model is left as it was (parameters, ``.grad`` unless ``accumulate_grad``, buffers
    such as BatchNorm running statistics). Gradients are enabled also under ``no_grad()``.

    Args:
        model: any ``nn.Module``.
        loss_fn: a supported loss module (``bg.SUPPORTED_LOSSES``).
        X: a tensor (``model(X)``), a tuple/list (``model(*X)``) or a dict (``model(**X)``);
            the leading axis of its tensors and of ``y`` is the sample axis.
        y: targets ``[N, ...]`` (a tensor).
        *quantities: quantity instances, e.g. ``bg.BatchGrad(), bg.DiagGGN()``.
        subsampling: sample indices for per-sample quantities.
        generator: for Monte-Carlo quantities.
        accumulate_grad: also add the gradient to ``param.grad`` (needs ``bg.Grad()``);
            otherwise parameters and their ``.grad`` are left untouched.
        out: a previous result of the same shapes whose per-sample gradients are overwritten
            instead of allocating new memory.
        vectors: extra vector kinds to backpropagate into ``result.stats`` (e.g.
            ``[("mc", 1)]``) without a quantity asking for them.
        check_samples: for quantities that need independent samples (per-sample ones,
            ``DiagGGN``, ...), first probe the model for coupling by any op (two forward
            passes on two samples, see :mod:`beyondgrad.engine.coupling`). ``False`` skips the
            probe; the checks of modules and of the autograd graph still run.

    Returns:
        A :class:`~beyondgrad.engine.Result`.

    Raises:
        SamplesCoupledError: the samples interact and a quantity needs them independent.
    """
    quantities = tuple(check_quantities(quantities, vectors))
    _check_call(model, X, y)
    args = (subsampling, generator, accumulate_grad, out, vectors, check_samples)
    with torch.enable_grad(), preserved_buffers(model):
        return _compute(model, loss_fn, X, y, quantities, *args)


def _check_call(model: nn.Module, X: Any, y: Any) -> None:
    """Clear errors for inputs that would otherwise fail deep inside."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "bg.compute needs autograd but runs inside torch.inference_mode(); call it "
            "outside (torch.no_grad() is fine: gradients are enabled for the call)"
        )
    if not isinstance(y, Tensor):
        raise TypeError(f"y must be a tensor of targets [N, ...], got {type(y).__name__}")
    check_not_meta(model)
    _check_batch(X, y)
    if y.shape[0] == 0:
        raise ValueError("the batch is empty (X and y have 0 samples)")


def _compute(
    model: nn.Module,
    loss_fn: nn.Module,
    X: Any,
    y: Tensor,
    quantities: tuple[Any, ...],
    subsampling: Sequence[int] | Tensor | None,
    generator: torch.Generator | None,
    accumulate_grad: bool,
    out: Result | None,
    vectors: Sequence[VectorKind],
    check_samples: bool,
) -> Result:
    wants_gradient = any(is_gradient(q) for q in quantities)
    if accumulate_grad and not wants_gradient:
        raise ValueError("accumulate_grad=True needs bg.Grad() among the quantities")
    separate = [q for q in quantities if getattr(q, "separate_pass", False)]
    if separate:  # e.g. HesScale: its own recursion, not the engine's exact backward
        return _with_separate_passes(
            model, loss_fn, X, y, quantities, separate, subsampling, generator, accumulate_grad
        )
    if check_samples and needs_independent_samples(quantities):
        check_samples_independent(model)  # modules first: their error names the module
        if _probe_coupling(model, X, y.shape[0]):
            raise SamplesCoupledError(COUPLED_MESSAGE)
    with capture(
        model,
        loss_fn,
        *quantities,
        subsampling=subsampling,
        generator=generator,
        vectors=vectors,
        check_samples=False,  # probed above, before the session
    ) as session:
        loss = loss_fn(call_model(model, X), y)
    result = session.compute(loss, out=out)
    if accumulate_grad:
        params = dict(model.named_parameters())
        for name, g in result.grad.items():
            p = params[name]
            p.grad = g.detach().clone() if p.grad is None else p.grad + g
    return result


def _model_arguments(X: Any) -> tuple[tuple, dict]:
    """The ``(args, kwargs)`` the model's forward receives from :func:`call_model`."""
    if isinstance(X, Mapping):
        return (), dict(X)
    if isinstance(X, (tuple, list)):
        return tuple(X), {}
    return (X,), {}


def _probe_coupling(model: nn.Module, X: Any, N: int) -> bool:
    """The coupling probe (:func:`~beyondgrad.engine.coupling.samples_coupled`). Its first run
    on a batch of another size also serves as the sample-axis probe
    (:mod:`beyondgrad.engine.samples`): the layers' shapes are recorded and cached, so the
    session runs no probe forward of its own (unless these shapes are already cached)."""
    args, kwargs = _model_arguments(X)
    key = signature(args, kwargs, model)
    known = known_coupling(model, key)
    if known is not None:
        return known
    if is_probed(model, args, kwargs):
        coupled = samples_coupled(model, X, N, call_model)
    else:
        M = probe_size(N)
        shapes = ShapeRecorder([(u.name, u.module) for u in plan_layers(model)])
        coupled = samples_coupled(model, X, N, call_model, observe=shapes, size=M)
        remember_probe(model, args, kwargs, shapes, M)
    remember_coupling(model, key, coupled)
    return coupled


def _with_separate_passes(
    model: nn.Module,
    loss_fn: nn.Module,
    X: Any,
    y: Tensor,
    quantities: Sequence[Any],
    separate: list[Any],
    subsampling: Sequence[int] | Tensor | None,
    generator: torch.Generator | None,
    accumulate_grad: bool,
) -> Result:
    rest = [q for q in quantities if q not in separate]
    result = None
    if rest:
        result = compute(
            model,
            loss_fn,
            X,
            y,
            *rest,
            subsampling=subsampling,
            generator=generator,
            accumulate_grad=accumulate_grad,
        )
    check_loss_fn(loss_fn)
    for q in separate:
        values = q.compute_separately(model, loss_fn, X, y)
        if result is None:
            with torch.no_grad():
                output = call_model(model, X)
                loss = loss_fn(output, y)
            result = Result(loss, output, {}, {n: "hesscale" for n in values}, None)
        result._values[q] = values
    result._values = {q: result._values[q] for q in quantities}
    return result  # type: ignore[return-value]


__all__ = ["call_model", "capture", "compute"]
