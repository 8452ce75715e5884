"""Curvature reductions of a tracked step, computed on the loss before the ordinary backward.

When ``loss_fn`` returns inside the tracked block, a forward hook backpropagates the curvature
vectors (GGN diagonal, per-layer GGN spectra; one engine pass) and runs the Hessian-vector
products of HessMaxEV, keeping the graph for the user's ``loss.backward()``. A reduction that
cannot be formed exactly is left out and its reason kept in :attr:`Pending.dropped`.
"""

from __future__ import annotations

import warnings
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..buffers import BufferPool, pooled
from . import reductions as r
from ._engine import CurvatureResult, SamplesCoupled, curvature_session
from .hessian import HessianUnavailable, Warm, largest_eigenvalue, twice_differentiable_kernels


@dataclass
class Pending:
    """Filled by the loss hook: the curvature reductions and, per reduction left out, why."""

    result: CurvatureResult = field(default_factory=CurvatureResult)
    hess_max_ev: float | None = None
    hess_residual: float | None = None
    dropped: dict[str, str] = field(default_factory=dict)
    done: bool = False


@dataclass
class CurvatureSettings:
    """``spectra_k`` eigenvalues per layer, at most ``hess_iters`` Lanczos iterations to the
    relative residual ``hess_tol``, ``mc_samples`` Monte-Carlo samples of the GGN diagonal and
    spectra (None: exact)."""

    spectra_k: int = 4
    hess_iters: int = 20
    mc_samples: int | None = 1
    hess_tol: float = 1e-2
    #: HessMaxEV's warm start, carried from one tracked step to the next
    warm: Warm = field(default_factory=Warm)
    #: whether the Cockpit has warned that Lanczos stopped at ``hess_iters`` unconverged
    warned_unconverged: bool = False


def layer_groups(params: dict[str, Tensor]) -> dict[str, tuple[str, ...]]:
    """Parameter names grouped by the module that owns them (module name -> names)."""
    groups: dict[str, list[str]] = {}
    for name in params:
        module = name.rsplit(".", 1)[0] if "." in name else ""
        groups.setdefault(module, []).append(name)
    return {k: tuple(v) for k, v in groups.items()}


def attach(
    stack: ExitStack,
    model: nn.Module,
    loss_fn: nn.Module,
    params: dict[str, Tensor],
    needs: frozenset[str],
    settings: CurvatureSettings,
    generator: torch.Generator,
    pool: BufferPool | None = None,
) -> Pending:
    """Arrange for the curvature ``needs`` to be computed when ``loss_fn`` returns.

    Args:
        stack: closes the hooks (and the attention-kernel choice) when the step ends.
        model: the monitored model.
        loss_fn: its loss module.
        params: the trainable parameters by name.
        needs: among :data:`~beyondgrad.cockpit.reductions.CURVATURE`.
        settings: the curvature knobs.
        generator: for Monte-Carlo draws and Lanczos.
        pool: scratch buffers for the large intermediates (unfolded convolution inputs), taken
            in the round of the step's rows (nothing of them is read once the curvature is
            reduced).

    Returns:
        The :class:`Pending` results, filled once the loss has been computed.
    """
    pending = Pending()
    session = None
    if needs & {r.GGN_DIAG, r.GGN_SPECTRA}:
        spectra = (settings.spectra_k, layer_groups(params)) if r.GGN_SPECTRA in needs else None
        session = stack.enter_context(
            curvature_session(
                model, loss_fn, r.GGN_DIAG in needs, spectra, settings.mc_samples, generator
            )
        )
    if r.HESS_MAX_EV in needs:
        stack.enter_context(twice_differentiable_kernels())

    def on_loss(module: nn.Module, args: tuple, loss: Tensor) -> None:
        if not torch.is_grad_enabled() or pending.done:
            return
        pending.done = True
        if session is not None:
            try:
                with pooled(pool) if pool is not None else nullcontext():
                    pending.result = session.compute(loss)
            except SamplesCoupled as err:
                pending.dropped.update(dict.fromkeys(needs & r.PER_SAMPLE, str(err)))
        if r.HESS_MAX_EV in needs:
            _hess_max_ev(pending, loss, list(params.values()), settings, generator)

    handle = loss_fn.register_forward_hook(on_loss)
    stack.callback(handle.remove)
    return pending


def _hess_max_ev(
    pending: Pending,
    loss: Tensor,
    params: list[Tensor],
    settings: CurvatureSettings,
    generator: torch.Generator,
) -> None:
    try:
        value, residual = largest_eigenvalue(
            loss, params, settings.hess_iters, generator, settings.warm, settings.hess_tol
        )
    except HessianUnavailable as err:
        pending.dropped[r.HESS_MAX_EV] = str(err)
        return
    pending.hess_max_ev, pending.hess_residual = value, residual
    if residual > settings.hess_tol and not settings.warned_unconverged:
        settings.warned_unconverged = True
        warnings.warn(
            f"Cockpit: HessMaxEV stopped after hess_iters={settings.hess_iters} "
            f"Hessian-vector products with relative residual {residual:.2g} > hess_tol="
            f"{settings.hess_tol:g}: the logged value is a lower bound within that residual "
            "of some eigenvalue, perhaps not the largest (HessMaxEVResidual logs it at every "
            "step; raise hess_iters, or expect the warm start to converge on later steps). "
            "Warned once.",
            RuntimeWarning,
            stacklevel=2,
        )


def fill(data: Any, pending: Pending) -> None:
    """Copy the curvature reductions into the step's data."""
    data.ggn_diag = pending.result.diag
    data.ggn_spectra = pending.result.spectra
    data.hess_max_ev = pending.hess_max_ev
    data.hess_residual = pending.hess_residual


__all__ = ["CurvatureSettings", "Pending", "attach", "fill", "layer_groups"]
