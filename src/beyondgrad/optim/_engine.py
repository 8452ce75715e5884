"""The one place where :mod:`beyondgrad.optim` reaches into the engine.

Everything the optimizers need from the engine goes through the functions here: which modules
own which parameters and which rule serves them (:func:`layer_units`), the Kronecker statistics
of one forward pass as **raw sums over samples** with their sample count
(:func:`record_kronecker_sums`), and the conversion of a layer's gradients to and from the
``[G, rows, cols]`` layout of its Kronecker factors (:func:`to_factor_layout`,
:func:`from_factor_layout`).

The engine's :class:`~beyondgrad.engine.Statistics` hands out raw Kronecker sums
(``A_sum`` over ``count`` rows, ``B_sum`` over the backpropagated vectors, on the loss's scale);
this module rescales them to sums over samples, so that the optimizers accumulate over several
capture blocks (gradient accumulation) and over ranks before they divide once by the count.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..engine import Session, Statistics, capture
from ..engine.capture import plan_layers
from ..factors import from_block_layout, to_block_layout
from ..quantities import KFAC as KFACQuantity


@dataclass(frozen=True)
class LayerUnit:
    """A module that owns trainable parameters directly.

    Attributes:
        name: the module's name in ``model.named_modules()``.
        module: the module.
        rule: the engine rule that serves it (``"linear"``, ``"conv"``, ...; ``"generic"``).
        params: its own trainable parameters by their name relative to the module.
    """

    name: str
    module: nn.Module
    rule: str
    params: dict[str, nn.Parameter]


def layer_units(model: nn.Module) -> list[LayerUnit]:
    """Every module of ``model`` that owns trainable parameters, with the engine rule serving it.

    Args:
        model: the network.

    Returns:
        One :class:`LayerUnit` per module, in ``named_modules()`` order.
    """
    return [LayerUnit(u.name, u.module, u.rule_name, dict(u.params)) for u in plan_layers(model)]


@dataclass
class KroneckerSums:
    """Kronecker statistics of one layer summed over the samples of one or more batches.

    Attributes:
        A: input side, ``sum_n A_n`` (``[I, I]``, ``[G, I, I]`` with groups; a joint bias is the
            last row/column). Divided by ``count`` it is the engine's ``KroneckerFactors.A``.
        B: output side, ``sum_n B_n`` (``[O, O]`` or ``[G, O, O]``), same scaling.
        count: the number of samples summed.
        order: ``"B kron A"`` (weight ``[O, I]`` row-major) or ``"A kron B"`` (embeddings).
        weight_perm: the weight permutation of transposed convolutions, else None.
    """

    A: Tensor
    B: Tensor
    count: int
    order: str
    weight_perm: tuple[int, ...] | None = None

    def add(self, other: KroneckerSums) -> None:
        """Accumulate ``other`` (the same layer, another batch) into this one, in place (the
        sums are the optimizer's own tensors: :func:`record_kronecker_sums` makes new ones)."""
        self.A = self.A.add_(other.A)
        self.B = self.B.add_(other.B)
        self.count += other.count


def kronecker_quantity(fisher_type: str, kfac_approx: str, mc_samples: int) -> KFACQuantity:
    """The engine quantity whose factors feed KFAC and SINGD (no diagonal fallback).

    Args:
        fisher_type: ``"type-2"``, ``"mc"`` or ``"empirical"`` (``"forward-only"`` refused).
        kfac_approx: ``"expand"`` or ``"reduce"``.
        mc_samples: Monte-Carlo samples per data point for ``"mc"``.

    Returns:
        The quantity (it validates its arguments).
    """
    if fisher_type == "forward-only":
        raise ValueError("fisher_type='forward-only' is not a curvature for an optimizer")
    return KFACQuantity(
        fisher_type=fisher_type,
        kfac_approx=kfac_approx,
        mc_samples=mc_samples,
        diagonal_fallback=False,
    )


@dataclass
class KroneckerRecording:
    """Filled when a :func:`record_kronecker_sums` block exits, or, where the statistics come
    from the ordinary backward, as soon as that backward pass has finished: module name ->
    sums; modules the engine gave no Kronecker block (e.g. applied functionally) are absent.

    Attributes:
        deferred: the sums come from the ordinary backward after the block.
        backpropagated: (deferred) that backward has finished; the sums are then final,
            empty where its layer-output gradients were not finite (e.g. an overflowing
            ``GradScaler`` iteration, whose step the scaler skips).
        sink: (deferred) where the sums go when that backward has finished, instead of
            ``sums`` (an optimizer's accumulator: one set of sums for many blocks).
    """

    sums: dict[str, KroneckerSums] = field(default_factory=dict)
    deferred: bool = False
    backpropagated: bool = False
    sink: Callable[[dict[str, KroneckerSums]], None] | None = None
    _session: Session | None = None

    def discard(self) -> None:
        """Drop a deferred recording: its hooks leave the graph, its sums are emptied."""
        if self._session is not None:
            self._session.on_backward_end = None
            self._session.release_watch()
            self._session = None
        self.sums = {}


@contextmanager
def record_kronecker_sums(
    model: nn.Module,
    loss_fn: nn.Module,
    quantity: KFACQuantity,
    generator: torch.Generator,
    owner: str,
    modules: Collection[str] | None = None,
    compute_dtype: torch.dtype | None = None,
    from_backward: bool = True,
) -> Iterator[KroneckerRecording]:
    """Record the forward pass in the block; on exit backpropagate the curvature vectors (the
    forward graph is kept for the user's ``loss.backward()``) and fill the recording.

    The empirical Fisher's vectors are the loss gradient itself: for ``fisher_type=
    "empirical"`` with ``from_backward`` nothing is backpropagated here. The block watches the
    ordinary backward that follows it and forms the sums from its layer-output gradients when
    that pass has finished (divided by ``d(backpropagated)/d(loss)``, e.g. a gradient scaler's
    scale; terms added to the loss before ``backward()``, such as an auxiliary loss, are part
    of those gradients). A statistics step then costs the Kronecker sums alone.

    Args:
        model: the network.
        loss_fn: the loss module, which must be called inside the block (once).
        quantity: from :func:`kronecker_quantity`.
        generator: for Monte-Carlo sampling.
        owner: the optimizer's class name, for error messages.
        modules: the layers whose sums are wanted (default: every layer with a Kronecker
            rule); the others' are not formed (e.g. a tied output layer that the optimizer's
            fallback serves: its ``[V, V]`` output factor would cost more than the step).
        compute_dtype: the dtype the sums are formed in (``None``: the gradients'; see
            :meth:`~beyondgrad.engine.Statistics.take_kronecker`).
        from_backward: the empirical Fisher from the ordinary backward (else its own pass).

    Yields:
        A :class:`KroneckerRecording`, filled after the block (deferred: after the backward).
    """
    recording = KroneckerRecording()
    watch = from_backward and quantity.fisher_type == "empirical"
    with capture(model, loss_fn, quantity, generator=generator, from_backward=watch) as session:
        session.watch_outlives_block = watch
        try:
            yield recording
        except BaseException:
            session.release_watch()
            raise
    if len(session.loss_calls) != 1:
        session.release_watch()
        raise RuntimeError(
            f"{owner}.capture(): loss_fn was not called inside the block; compute the loss "
            "there (loss = loss_fn(model(X), y))"
            if not session.loss_calls
            else f"{owner}.capture(): loss_fn was called more than once inside the block"
        )
    loss = session.loss_calls[-1][2]
    if watch:
        recording.deferred, recording._session = True, session
        session.on_backward_end = _after_backward(recording, loss, quantity, modules, compute_dtype)
    else:
        stats = session.statistics(loss, retain_graph=True)
        recording.sums = _layer_sums(stats, quantity, modules, compute_dtype)


def _after_backward(
    recording: KroneckerRecording,
    loss: Tensor,
    quantity: KFACQuantity,
    modules: Collection[str] | None,
    compute_dtype: torch.dtype | None,
) -> Callable[[], None]:
    """Runs when the watched backward has finished: the recording's sums from its gradients
    (none where they are not finite), then the session and its tensors are let go."""

    def finish() -> None:
        session, recording._session = recording._session, None
        if session is None:  # discarded meanwhile
            return
        recording.backpropagated = True
        try:
            stats = session.statistics(loss)
        except FloatingPointError:  # e.g. an overflowing GradScaler iteration
            return
        finally:
            session.release_watch()
        sums = _layer_sums(stats, quantity, modules, compute_dtype)
        if recording.sink is None:
            recording.sums = sums
        else:
            recording.sink(sums)

    return finish


def _layer_sums(
    stats: Statistics,
    quantity: KFACQuantity,
    modules: Collection[str] | None,
    compute_dtype: torch.dtype | None,
) -> dict[str, KroneckerSums]:
    """The sums over samples of every wanted layer with a Kronecker block."""
    out: dict[str, KroneckerSums] = {}
    for name in stats.modules:
        if (modules is None or name in modules) and stats.has_kronecker(name):
            sums = _sample_sums(stats, name, quantity, compute_dtype)
            if sums is not None:
                out[name] = sums
    return out


def _sample_sums(
    stats: Statistics, module: str, quantity: KFACQuantity, compute_dtype: torch.dtype | None
) -> KroneckerSums | None:
    """The engine's raw Kronecker sums of ``module`` as sums over the batch's ``N`` samples:
    ``A = N A_sum / count`` (the per-sample mean over shared positions, summed), ``B = N B_sum``
    (the vectors carry ``sqrt(R)``; the empirical Fisher's loss gradients carry ``R``, so its
    ``B_sum`` is divided by ``R`` once more)."""
    raw = stats.take_kronecker(  # scaled in place
        module, quantity.vectors, quantity.kfac_approx, compute_dtype
    )
    if raw is None:
        return None
    N = stats.num_samples
    A = raw.A_sum.mul_(N / raw.count)
    B = raw.B_sum.mul_(N)
    if quantity.fisher_type == "empirical":
        B = B.div_(stats.reduction_factor)
    if A.shape[0] == 1:  # no groups
        A, B = A[0], B[0]
    return KroneckerSums(A, B, N, raw.order, raw.weight_perm)


def to_factor_layout(
    weight_grad: Tensor,
    bias_grad: Tensor | None,
    order: str,
    weight_perm: tuple[int, ...] | None,
    groups: int,
) -> Tensor:
    """A layer's gradients as ``[G, rows, cols]`` in the layout of its Kronecker factors.

    Args:
        weight_grad: shaped like the weight.
        bias_grad: shaped like the bias (a joint bias becomes the last column), or None.
        order: the factors' order.
        weight_perm: the factors' weight permutation, or None.
        groups: the number of groups ``G``.

    Returns:
        ``[G, rows, cols]`` (rows: output side for ``"B kron A"``).
    """
    bias = None if bias_grad is None else bias_grad[None]
    return to_block_layout(weight_grad[None], bias, order, weight_perm, groups)[0]


def from_factor_layout(
    M: Tensor,
    weight_shape: tuple[int, ...],
    bias_shape: tuple[int, ...] | None,
    order: str,
    weight_perm: tuple[int, ...] | None,
    groups: int,
) -> tuple[Tensor, Tensor | None]:
    """Inverse of :func:`to_factor_layout`: ``[G, rows, cols]`` to ``(weight-shaped,
    bias-shaped or None)``."""
    W, b = from_block_layout(M[None], weight_shape, bias_shape, order, weight_perm, groups)
    return W[0], (None if b is None else b[0])
