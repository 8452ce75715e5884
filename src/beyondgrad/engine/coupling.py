"""Samples coupled by the model: detection.

Per-sample quantities (and every quantity that reduces per-sample rows, e.g. the GGN diagonal)
are exact only when each sample's output depends on its own inputs alone. Three checks, from
free to cheap:

1. Modules (:func:`~beyondgrad.engine.session.check_samples_independent`): BatchNorm layers
   with batch statistics, ``Embedding(scale_grad_by_freq=True)``.
2. The autograd graph (:func:`coupling_node`, free: one walk over the graph's nodes): batch
   normalization with batch statistics however it is called (``F.batch_norm(training=True)``
   in a custom forward); instance normalization, which folds the samples into channels, is
   not a coupling.
3. A forward probe (:func:`samples_coupled`, used by :func:`~beyondgrad.compute`): the model
   runs, without gradients, on two samples ``(a, b)`` and on ``(b, b)``; if the output of the
   second position changes, the first sample reached it, whatever op is responsible
   (``h - h.mean(0)``, ``.item()`` of a batch statistic, attention across the batch). Its cost
   is two forward passes on two samples (negligible against a batch of tens of samples). The
   model's buffers and random number generators are restored afterwards; user hooks on the
   model run during the probe. For a batch of two samples the runs use three (``(a, b, b)``
   and ``(b, b, b)``), so that the first run also serves as the sample-axis probe of
   :mod:`beyondgrad.engine.samples` (a batch of another size). The answer is cached per model
   and input signature (argument shapes, dtypes, and the model's state: its modules, their
   training flags, the user's module hooks, its parameters and their ``requires_grad``;
   :func:`known_coupling`), so a training loop probes once, not every step, and probes again
   when a module is replaced, a mode toggled or a hook added; a model whose coupling changes
   without any of these (a plain attribute flipped between steps) is not probed again.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map

from .state import preserved_buffers

_KNOWN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def known_coupling(model: nn.Module, key: Any) -> bool | None:
    """The cached answer of the forward probe for ``model`` on input signature ``key``
    (:func:`~beyondgrad.engine.samples.signature`); ``None`` when not probed yet."""
    return _KNOWN.get(model, {}).get(key)


def remember_coupling(model: nn.Module, key: Any, coupled: bool) -> None:
    """Cache the forward probe's answer for ``model`` on input signature ``key``."""
    _KNOWN.setdefault(model, {})[key] = coupled


BATCH_NORM_NODES = frozenset(
    {
        "NativeBatchNormBackward0",
        "NativeBatchNormLegitBackward0",
        "NativeBatchNormLegitBackward1",
        "CudnnBatchNormBackward0",
        "MiopenBatchNormBackward0",
        "BatchNormWithUpdateBackward0",
        "BatchNormNoUpdateBackward0",
    }
)


def _uses_batch_statistics(node: Any) -> bool:
    """Whether a batch-norm autograd node normalized a batch of several samples with its own
    statistics."""
    training = getattr(node, "_saved_training", None)
    if training is None:  # the *Update* variants: no running stats means batch statistics
        running = getattr(node, "_saved_running_mean", None)
        training = type(node).__name__ == "BatchNormWithUpdateBackward0" or running is None
    if not training:
        return False
    try:
        x = node._saved_input
    except RuntimeError:  # freed saved tensors: assume the common case, a real batch
        return True
    return x.ndim > 0 and x.shape[0] > 1


def coupling_node(loss: Tensor) -> Any | None:
    """The first autograd node of ``loss``'s graph that couples samples (batch normalization
    with batch statistics), or ``None``."""
    if loss.grad_fn is None:
        return None
    stack, seen = [loss.grad_fn], {loss.grad_fn}
    while stack:
        node = stack.pop()
        if type(node).__name__ in BATCH_NORM_NODES and _uses_batch_statistics(node):
            return node
        for nxt, _ in node.next_functions:
            if nxt is not None and nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return None


def _rows(X: Any, N: int, index: list[int]) -> Any:
    pick = torch.tensor(index)
    return tree_map(
        lambda t: (
            t[pick.to(t.device)] if isinstance(t, Tensor) and t.ndim and t.shape[0] == N else t
        ),
        X,
    )


def _distinct_pair(X: Any, N: int) -> tuple[int, int] | None:
    """Two samples whose inputs differ (``None`` if all samples are equal)."""
    leaves = [t for t in tree_flatten(X)[0] if isinstance(t, Tensor) and t.ndim and t.shape[0] == N]
    for j in range(1, N):
        if any(not torch.equal(t[0], t[j]) for t in leaves):
            return 0, j
    return None


def _tolerance(dtype: torch.dtype) -> float:
    return min(1000 * torch.finfo(dtype).eps, 1e-2) if dtype.is_floating_point else 0.0


COUPLED_MESSAGE = (
    "the model couples its samples: the output of one sample changes when another "
    "sample of the batch changes (found by running the model on two samples, "
    "e.g. `h - h.mean(0)`, `.item()` of a batch statistic, attention across the "
    "batch). Per-sample quantities (and reductions of per-sample rows, e.g. "
    "DiagGGN) are undefined; the gradient (bg.Grad) and KFAC remain available."
)


def samples_coupled(
    model: nn.Module,
    X: Any,
    N: int,
    call: Callable[[nn.Module, Any], Any],
    observe: AbstractContextManager[Any] | None = None,
    size: int = 2,
) -> bool:
    """The forward probe (see the module docstring): whether sample ``a`` changes the output
    of sample ``b`` in a batch of two. ``call(model, X)`` runs the model. A model that
    cannot run on two samples is not probed (``False``).

    Args:
        model: the model.
        X: the model's input (see :func:`~beyondgrad.engine.compute.call_model`).
        N: the number of samples in ``X``.
        call: runs the model on an input.
        observe: entered around the first run (batch ``(a, b, b, ...)``), e.g. a
            :class:`~beyondgrad.engine.samples.ShapeRecorder` so that the sample-axis probe
            needs no forward pass of its own.
        size: the probe batch size (``>= 2``): runs on ``(a, b, b, ...)`` and ``(b, b, ...)``.

    Returns:
        Whether the output of position 1 differs between the two runs.
    """
    pair = _distinct_pair(X, N) if N > 1 else None
    if pair is None:
        return False
    a, b = pair
    devices = [t.device for t in tree_flatten(X)[0] if isinstance(t, Tensor)]
    cuda = sorted({d.index or 0 for d in devices if d.type == "cuda"})
    try:
        with torch.no_grad(), preserved_buffers(model), torch.random.fork_rng(devices=cuda):
            torch.manual_seed(0)  # the same random draws (dropout masks) in both runs
            with observe if observe is not None else nullcontext():
                first = call(model, _rows(X, N, [a] + [b] * (size - 1)))
            torch.manual_seed(0)
            second = call(model, _rows(X, N, [b] * size))
    except Exception:  # e.g. a model written for one batch size only
        return False
    return _differ(first, second, size)


def _differ(first: Any, second: Any, size: int) -> bool:
    """Whether position 1 of any floating output of the two probe runs differs."""
    for u, v in zip(tree_flatten(first)[0], tree_flatten(second)[0]):
        if not (isinstance(u, Tensor) and isinstance(v, Tensor)) or u.shape != v.shape:
            continue
        if u.ndim == 0 or u.shape[0] != size or not (u.is_floating_point() or u.is_complex()):
            continue
        tol = _tolerance(u.dtype)
        scale = float(v[1].abs().max()) if v[1].numel() else 0.0
        if not torch.allclose(u[1], v[1], rtol=tol, atol=tol * scale, equal_nan=True):
            return True
    return False
