"""The Cockpit's one door into the engine's internals.

Everything the Cockpit reads from the engine passes through this module: the per-row gradient
forms (``Statistics.forms`` and the form methods), the capture session
(``engine.compute.capture``, its recorded loss call and backward seed), the curvature
quantities computed before the ordinary backward, and the engine's verdict on whether the
samples of a model are independent. When the engine's public statistics object replaces the
forms, only this file changes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..buffers import BufferPool, pooled
from ..engine import GRAD, SamplesCoupledError, capture, check_samples_independent
from ..engine.losses import is_internal_loss_call
from ..forms import OuterForm, SampleForm
from ..quantities import DiagGGN, GGNSpectrum

#: per-sample gradients of a layer with positions (convolutions) are materialized once for all
#: statistics when they take at most this many elements (64 MiB in float32)
MATERIALIZE_BUDGET = 1 << 24


class SamplesCoupled(RuntimeError):
    """The model couples its samples (e.g. BatchNorm in train mode): per-sample statistics
    are undefined. The message names the module and the reason."""


def samples_coupled(model: nn.Module, loss_fn: nn.Module) -> str | None:
    """Why per-sample statistics of ``model`` are undefined (the engine's message), or None.

    Args:
        model: the monitored model, in the mode of the coming step.
        loss_fn: its loss module.

    Returns:
        The engine's reason (naming the module), or None when samples are independent.
    """
    try:
        check_samples_independent(model)
    except SamplesCoupledError as err:
        return str(err)
    return None


class Rows:
    """The per-sample gradient rows ``g_n`` of one parameter (as the engine's loss defines
    them: they sum to the gradient of the mini-batch loss), read through reductions only."""

    def __init__(self, form: Any, pool: BufferPool | None = None):
        self._form, self._pool = form, pool

    def provide_grad(self, grad: Tensor) -> None:
        """Hand over the already computed sum of the rows (the parameter's gradient)."""
        self._form.provide("grad", grad)

    def prepare(self, reductions: int) -> None:
        """Materialize the rows once (one GEMM for convolutions) when ``reductions`` per-row
        reductions will read them and they fit :data:`MATERIALIZE_BUDGET`, into a buffer of
        the step's pool when there is one (a fresh allocation of this size costs page faults,
        and its release an unmapping, every step)."""
        form = self._form
        if reductions <= 1 or not form.worth_materializing(MATERIALIZE_BUDGET):
            return
        if (
            self._pool is None
            or not (isinstance(form, OuterForm) and form.A.dtype == form.G.dtype)
            or form.G.device.type != "cpu"  # accelerators' caching allocators reuse memory
        ):
            form.batch_grad()
            return
        form.batch_grad(out=self._pool.empty((form.rows, *form.shape), form.G.dtype, form.G.device))

    def grad(self) -> Tensor:
        """``sum_n g_n``, parameter-shaped."""
        return self._form.grad()

    def batch_l2(self) -> Tensor:
        """``||g_n||^2``, ``[N]``."""
        return self._form.batch_l2()

    def dots_with_sum(self) -> Tensor:
        """``g_n . sum_m g_m``, ``[N]``."""
        return self._form.dots_with_sum()

    def sum_grad_squared(self) -> Tensor:
        """``sum_n g_n^2`` element-wise, parameter-shaped."""
        return self._form.sum_grad_squared()

    def entries(self, rows: Tensor, flat: Tensor) -> Tensor:
        """``g_{rows[i]}[flat[i]]`` (flat parameter index), ``[E]``."""
        return self._form.entries(rows, flat)

    def small_matrix(self, limit: int) -> Tensor | None:
        """The rows as a ``[N, D]`` matrix when the engine holds them materialized (biases,
        normalization layers: no computation), float32/64, with ``D <= limit``; else None."""
        form = self._form
        if not isinstance(form, SampleForm) or form.vectors != 1 or form.low_precision:
            return None
        if form.values[0].numel() > limit or not form.values.is_floating_point():
            return None
        return form.values.reshape(form.num_samples, -1)

    def projections(
        self, direction: Tensor | None, dots: bool
    ) -> tuple[Tensor | None, Tensor | None]:
        """``(g_n . sum_m g_m if dots, g_n . direction if direction is given)``, ``[N]`` each
        (None where not asked for). Materialized rows are read once for both: one product
        with the two vectors stacked (two products read the rows twice from memory)."""
        form = self._form
        if dots and direction is not None and (form.materialized or isinstance(form, SampleForm)):
            both = form.project(torch.stack([form.grad(), direction.to(form.grad().dtype)]))
            form.provide("dots_with_sum", both[:, 0])
            return both[:, 0], both[:, 1]
        return (
            self.dots_with_sum() if dots else None,
            None if direction is None else self.project(direction),
        )

    def project(self, direction: Tensor) -> Tensor:
        """``g_n . direction`` (``direction`` parameter-shaped), ``[N]``."""
        return self._form.project(direction[None])[:, 0]


@dataclass(eq=False)
class DenseLayer:
    """The rows of a dense layer applied once per sample (no positions): the weight's rows
    ``g_n = G_n a_n^T`` and, when the bias's rows are the very tensor ``G`` (a plain
    ``nn.Linear``), the bias's rows ``G_n``. All inner products of the layer's rows come from
    two Gram matrices: ``<g_n, h_m> = (a_n . b_m + [bias]) (G_n . H_m)``.

    Attributes:
        names: the weight's parameter name, then the bias's if it is included.
        A: the layer inputs ``[N, I]``.
        G: the output gradients ``[N, O]``.
        versions: ``(A._version, G._version)`` when :meth:`keep` was called.
    """

    names: tuple[str, ...]
    A: Tensor
    G: Tensor
    versions: tuple[int, int] | None = None

    def gram_is_cheaper(self, rows: int) -> bool:
        """Whether inner products with ``rows`` other rows cost less by the Gram matrices
        (``N rows (I + O)``) than by projecting on their sum (``N I O``)."""
        return rows * (self.A.shape[1] + self.G.shape[1]) < self.A.shape[1] * self.G.shape[1]

    def inner(self, other: DenseLayer | None = None) -> Tensor:
        """``[N, M]``: inner products of this layer's rows (weight and bias together) with
        those of ``other``, the same layer at another step (default: itself)."""
        o = self if other is None else other
        gram = self.A @ o.A.T
        if len(self.names) > 1:
            gram += 1
        return gram.mul_(self.G @ o.G.T)

    def keep(self) -> DenseLayer:
        """This layer, to be read again at a later step (its tensors' versions recorded)."""
        self.versions = (self.A._version, self.G._version)
        return self

    def unchanged(self) -> bool:
        """Whether no tensor of a kept layer was modified in place since :meth:`keep`."""
        return self.versions == (self.A._version, self.G._version)


def dense_layers(rows: dict[str, Rows]) -> list[DenseLayer]:
    """The dense layers without positions among ``rows`` (one vector per sample, float32 or
    float64, not materialized), each with its bias when the bias's rows are the layer's
    output gradients themselves."""
    biases: dict[tuple[int, tuple[int, ...], tuple[int, ...]], str] = {}
    for name, r in rows.items():
        f = r._form
        if isinstance(f, SampleForm) and f.vectors == 1 and f.values.ndim == 2:
            biases[(f.values.data_ptr(), tuple(f.values.shape), f.values.stride())] = name
    layers = []
    for name, r in rows.items():
        f = r._form
        if not (
            type(f) is OuterForm  # not a convolution's (its inputs are pooled unfold buffers)
            and f.vectors == 1
            and f.A.shape[1] == 1
            and f.A.dtype == f.G.dtype
            and f.A.dtype in (torch.float32, torch.float64)
            and not f.materialized
        ):
            continue
        N, _, I = f.A.shape
        A, G = f.A.reshape(N, I), f.G.reshape(N, f.G.shape[2])
        bias = biases.pop((G.data_ptr(), tuple(G.shape), G.stride()), None)
        layers.append(DenseLayer((name,) if bias is None else (name, bias), A, G))
    return layers


class StepWatch:
    """What one watched training step left: the loss call, the backward seed and, when
    requested, the per-sample rows (computed from the ordinary backward's layer-output
    gradients, with no backward pass of their own)."""

    def __init__(self, session: Any, rows: bool, pool: BufferPool | None = None):
        self._session, self._rows, self._pool = session, rows, pool

    def loss_call(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(output, target, loss)`` of the step's (last) ``loss_fn`` call."""
        if not self._session.loss_calls:
            raise RuntimeError(
                "Cockpit: loss_fn was not called inside the `with cockpit(...)` block"
            )
        return self._session.loss_calls[-1]

    def loss_scale(self) -> Tensor:
        """``d(backpropagated)/d(loss)`` of the ordinary backward (1, or a loss scale)."""
        if self._session.loss_scale is None:
            raise RuntimeError(
                "Cockpit: call loss.backward() inside the `with cockpit(step):` block"
            )
        return self._session.loss_scale

    def rows(self) -> dict[str, Rows]:
        """Per-sample rows of every parameter the engine serves (model order).

        Raises:
            SamplesCoupled: the engine found that the samples are coupled.
        """
        if not self._rows:
            raise RuntimeError("this step was watched without per-sample rows")
        loss = self.loss_call()[2]
        pool = self._pool
        if pool is not None:  # the previous step's rows and this step's curvature are read
            pool.new_round()  # no more
        try:
            with pooled(pool) if pool is not None else nullcontext():
                forms = self._session.statistics(loss).forms(GRAD, per_sample=True)
        except SamplesCoupledError as err:
            raise SamplesCoupled(str(err)) from err
        return {name: Rows(form, pool) for name, form in forms.items()}


class _LightSession:
    """Records the loss call and the backward seed only (no layer hooks)."""

    def __init__(self) -> None:
        self.loss_calls: list[tuple[Tensor, Tensor, Tensor]] = []
        self.loss_scale: Tensor | None = None

    def on_loss(self, module: nn.Module, args: tuple, loss: Tensor) -> None:
        if torch.is_grad_enabled() and not is_internal_loss_call():
            self.loss_calls.append((args[0], args[1], loss))
            if loss.requires_grad:
                loss.register_hook(self._on_seed)

    def _on_seed(self, grad: Tensor) -> None:
        self.loss_scale = grad.detach()


@contextmanager
def watch_step(
    model: nn.Module, loss_fn: nn.Module, rows: bool, pool: BufferPool | None = None
) -> Iterator[StepWatch]:
    """Watch the forward pass and the ordinary ``loss.backward()`` of one step.

    Args:
        model: the monitored model.
        loss_fn: its loss module.
        rows: also keep what per-sample rows need (layer inputs and output gradients).
        pool: scratch buffers for the rows' large intermediates on the CPU (unfolded
            convolution inputs, materialized rows), reused from step to step: reading the rows
            starts a new round of it, so the previous step's rows (and this step's curvature
            intermediates) must no longer be read by then.

    Yields:
        The :class:`StepWatch`, readable once the block has run.

    Raises:
        SamplesCoupled: ``rows=True`` on a model whose samples are coupled.
    """
    if not rows:
        light = _LightSession()
        handle = loss_fn.register_forward_hook(light.on_loss)
        try:
            yield StepWatch(light, False)
        finally:
            handle.remove()
        return
    with ExitStack() as stack:
        try:
            session = stack.enter_context(
                capture(model, loss_fn, vectors=[GRAD], per_sample=True, from_backward=True)
            )
        except SamplesCoupledError as err:
            raise SamplesCoupled(str(err)) from err
        yield StepWatch(session, True, pool)


@dataclass
class CurvatureResult:
    """Per parameter the GGN (or MC Fisher) diagonal; per layer group the top eigenvalues."""

    diag: dict[str, Tensor] | None = None
    spectra: dict[str, list[float]] | None = None


class CurvatureSession:
    """GGN diagonal and per-layer GGN spectra of the step's loss, computed by the engine's own
    backward pass before the ordinary one (the graph is kept for it)."""

    def __init__(
        self,
        session: Any,
        diag: DiagGGN | None,
        eigen: GGNSpectrum | None,
        groups: tuple[str, ...],
    ):
        self._session, self._diag, self._eigen, self._groups = session, diag, eigen, groups

    def compute(self, loss: Tensor) -> CurvatureResult:
        """Backpropagate the curvature vectors of ``loss`` (keeping its graph).

        Raises:
            SamplesCoupled: the engine found that the samples are coupled.
        """
        try:
            res = self._session.compute(loss, retain_graph=True)
        except SamplesCoupledError as err:
            raise SamplesCoupled(str(err)) from err
        out = CurvatureResult()
        if self._diag is not None:
            out.diag = {n: v.detach() for n, v in res[self._diag].items()}
        if self._eigen is not None:
            eig = res[self._eigen]
            out.spectra = (
                {self._groups[i]: ev.tolist() for i, ev in enumerate(eig.values())}
                if isinstance(eig, dict)
                else {}
            )
        return out


@contextmanager
def curvature_session(
    model: nn.Module,
    loss_fn: nn.Module,
    diagonal: bool,
    spectra: tuple[int, dict[str, tuple[str, ...]]] | None,
    mc_samples: int | None,
    generator: torch.Generator,
) -> Iterator[CurvatureSession]:
    """Record the forward pass for the curvature quantities.

    Args:
        model: the monitored model.
        loss_fn: its loss module.
        diagonal: compute the GGN diagonal.
        spectra: ``(top_k, {group name: parameter names})`` for the top GGN eigenvalues of
            each group, or None.
        mc_samples: Monte-Carlo samples of both (``None``: exact).
        generator: for the Monte-Carlo draws.

    Yields:
        The :class:`CurvatureSession`; call ``compute(loss)`` once the loss exists.
    """
    diag = DiagGGN(mc_samples=mc_samples) if diagonal else None
    eigen, groups = None, ()
    if spectra is not None:
        top_k, by_group = spectra
        groups = tuple(by_group)
        eigen = GGNSpectrum(
            mc_samples=mc_samples, top_k=top_k, param_groups=tuple(by_group.values())
        )
    quantities = [q for q in (diag, eigen) if q is not None]
    with capture(model, loss_fn, *quantities, generator=generator) as session:
        yield CurvatureSession(session, diag, eigen, groups)


__all__ = [
    "MATERIALIZE_BUDGET",
    "CurvatureResult",
    "CurvatureSession",
    "DenseLayer",
    "Rows",
    "SamplesCoupled",
    "StepWatch",
    "curvature_session",
    "dense_layers",
    "samples_coupled",
    "watch_step",
]
