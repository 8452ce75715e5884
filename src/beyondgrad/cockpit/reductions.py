"""The shared reductions of one tracked step: each computed once, whatever reads it.

An instrument declares the reductions it needs by name (the constants below); the Cockpit
gathers the union over its instruments and fills a :class:`StepData` with exactly those, then
every instrument's formula reads it. Notation as in :mod:`beyondgrad.cockpit.instruments`:
``g_n`` the per-sample gradients scaled so that the batch gradient is ``g = mean_n g_n``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ._engine import DenseLayer, Rows, dense_layers
from .workspace import Workspace

LOSS = "loss"  #: the mini-batch loss (always available)
LOSSES = "losses"  #: per-sample loss terms ``[B]`` (summing to the loss)
GRAD = "grad"  #: per layer the gradient ``g`` and its norm
BATCH_L2 = "batch_l2"  #: ``||g_n||^2`` summed over layers, ``[B]``
DOTS = "dots"  #: ``g_n . g`` summed over layers, ``[B]``
SGS = "sum_grad_squared"  #: ``sum_n g_n^2`` element-wise, flat ``[D]``
ENTRIES = "entries"  #: sampled per-sample gradient entries
ENTRY_PARAMS = "entry_params"  #: the parameter values at the sampled entries
DIRECTIONAL = "directional"  #: ``g_n . s`` along the previous update ``s``, ``[B]``
DISTANCE = "distance"  #: per layer ``||theta - theta_0||``
UPDATE = "update"  #: per layer the update ``theta_{t+1} - theta_t`` (after the step)
LR = "lr"  #: the optimizer's learning rate (first param group)
GGN_DIAG = "ggn_diag"  #: the GGN (or MC Fisher) diagonal, per parameter
GGN_SPECTRA = "ggn_spectra"  #: per layer the top GGN eigenvalues
HESS_MAX_EV = "hess_max_ev"  #: the largest Hessian eigenvalue (Hessian-vector products)

#: reductions that read the per-sample rows: undefined when the model couples its samples
PER_SAMPLE = frozenset({LOSSES, BATCH_L2, DOTS, SGS, ENTRIES, DIRECTIONAL, GGN_DIAG, GGN_SPECTRA})
#: per-row reductions (each reads every row once; rows are materialized if several do)
ROW_READS = (BATCH_L2, DOTS, SGS, DIRECTIONAL, ENTRIES)
#: computed before the ordinary backward pass, on the step's loss
CURVATURE = frozenset({GGN_DIAG, GGN_SPECTRA, HESS_MAX_EV})


@dataclass
class Settings:
    """The Cockpit's knobs that formulas and reductions read."""

    hist_bins: int = 40
    hist_entries: int = 2048
    hist_samples: int = 8
    hist_quantile: float = 0.99


@dataclass
class StepData:
    """The reductions of one tracked step (a field is None unless some instrument needs it).

    ``B``: batch size; ``c``: the factor from the loss terms to the per-sample gradients
    ``g_n`` (``B`` for ``reduction="mean"``, 1 for ``"sum"``); ``layers``: the parameter
    names of ``grads``/``grad_norms``; ``grads``: flat ``g`` per layer; ``grad_norms``:
    float64 ``||g||`` per layer; ``sgs``: flat ``sum_n g_n^2`` (in ``workspace``, reused
    across steps). ``alpha_start``: the start point of the last update when this step is
    its end point.
    """

    step: int
    settings: Settings
    B: int = 0
    c: float = 1.0
    loss: float = float("nan")
    eps: float = 1e-16
    lr: float | None = None
    losses: Tensor | None = None
    layers: list[str] = field(default_factory=list)
    grads: list[Tensor] = field(default_factory=list)
    grad_norms: Tensor | None = None
    batch_l2: Tensor | None = None
    dots: Tensor | None = None
    sgs: Tensor | None = None
    hist_values: Tensor | None = None
    hist_params: Tensor | None = None
    directional: Tensor | None = None
    alpha_start: dict[str, Any] | None = None
    distance: dict[str, float] | None = None
    update: dict[str, Tensor] | None = None
    update_norms: dict[str, float] | None = None
    ggn_diag: dict[str, Tensor] | None = None
    ggn_spectra: dict[str, list[float]] | None = None
    hess_max_ev: float | None = None
    workspace: Workspace = field(default_factory=Workspace)
    _memo: dict[str, Any] = field(default_factory=dict)

    @property
    def grad_sq(self) -> float:
        """``||g||^2`` over all layers."""
        assert self.grad_norms is not None
        return float((self.grad_norms**2).sum())

    def shared(self, key: str, fn: Callable[[], Any]) -> Any:
        """``fn()`` computed once per step for every formula that asks for ``key``."""
        if key not in self._memo:
            self._memo[key] = fn()
        return self._memo[key]


def sample_entries(
    generator: torch.Generator, settings: Settings, B: int, D: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Random ``(row, flat index)`` pairs: ``hist_entries`` entries of one layer (``D``
    entries per row) from ``hist_samples`` random samples."""
    samples = torch.randperm(B, generator=generator)[: settings.hist_samples]
    E = min(settings.hist_entries, len(samples) * D)
    rows = samples[torch.randint(len(samples), (E,), generator=generator)]
    flat = torch.randint(D, (E,), generator=generator)
    return rows.to(device), flat.to(device)


def directional(
    rows: dict[str, Rows],
    direction: dict[str, Tensor],
    earlier: list[DenseLayer] | None = None,
    lr: float | None = None,
) -> Tensor:
    """``sum over layers of g_n . direction`` (unscaled rows), ``[B]`` float64 on the CPU.

    Args:
        rows: this step's rows per parameter.
        direction: per parameter the update ``s``.
        earlier: when ``s = -lr * sum_m h_m`` exactly (a plain gradient step on the rows
            ``h`` of an earlier step): that step's dense layers (:meth:`DenseLayer.keep`),
            read by their Gram matrices where that is cheaper than projecting on ``s``.
        lr: that step's learning rate.
    """
    parts: list[Tensor] = []
    done: set[str] = set()
    if earlier is not None and lr is not None:
        before = {layer.names: layer for layer in earlier}
        for layer in dense_layers(rows):
            old = before.get(layer.names)
            if old is None or not old.unchanged() or not layer.gram_is_cheaper(len(old.A)):
                continue
            parts.append(layer.inner(old).sum(1).mul_(-lr))
            done.update(layer.names)
    parts += [r.project(direction[name]) for name, r in rows.items() if name not in done]
    total = _layer_sum([p.double() for p in parts], 1.0)
    assert isinstance(total, Tensor)
    return total.cpu()


def gather_rows(
    data: StepData,
    needs: frozenset[str],
    rows: dict[str, Rows],
    grad_of_loss: dict[str, Tensor],
    params: dict[str, Tensor],
    generator: torch.Generator,
) -> None:
    """Fill ``data``'s per-layer reductions from the per-sample rows, one pass over layers.

    Args:
        data: the step's data (``B`` and ``c`` set); filled in place.
        needs: the reductions to compute.
        rows: per-sample rows per parameter.
        grad_of_loss: the ordinary backward's gradients (per unit of loss), handed to the
            rows so that ``g`` is not formed twice.
        params: the model's parameters by name (values for the 2-d histogram).
        generator: draws the sampled entries.
    """
    B, c = data.B, data.c
    reads = sum(key in needs for key in ROW_READS)
    l2: list[Tensor] = []
    dots: list[Tensor] = []
    fused: set[str] = set()
    if BATCH_L2 in needs or DOTS in needs:  # dense layers: norms and dots from one Gram pair
        for layer in dense_layers(rows):
            if layer.gram_is_cheaper(B):
                inner = layer.inner()
                l2.append(inner.diagonal())
                dots.append(inner.sum(1))
                fused.update(layer.names)
    sgs, values, thetas = [], [], []
    for name, r in rows.items():
        if name in grad_of_loss:  # the ordinary backward already formed it
            r.provide_grad(grad_of_loss[name])
        r.prepare(reads)
        g = r.grad()  # mean_n g_n (scaled below only for sum losses: no copy)
        if c != B:
            g = g * (c / B)
        data.layers.append(name)
        data.grads.append(g.reshape(-1))
        if BATCH_L2 in needs and name not in fused:
            l2.append(r.batch_l2())
        if DOTS in needs and name not in fused:
            dots.append(r.dots_with_sum())
        if SGS in needs:
            sgs.append(r.sum_grad_squared())
        if ENTRIES in needs:
            sel_rows, flat = sample_entries(generator, data.settings, B, g.numel(), g.device)
            v = r.entries(sel_rows, flat) * c
            values.append(v.detach())  # moved to the host together in _finish
            if ENTRY_PARAMS in needs:
                thetas.append(params[name].detach().reshape(-1)[flat])
    l2 = l2 if BATCH_L2 in needs else []
    dots = dots if DOTS in needs else []
    _finish(data, needs, _layer_sum(l2, c**2), _layer_sum(dots, c * c / B), sgs, values, thetas)


def _layer_sum(parts: list[Tensor], scale: float) -> Tensor | float:
    """``scale * sum(parts)`` (``[B]`` each) in two operations whatever the number of layers,
    in the promoted dtype; 0.0 for no parts."""
    if not parts:
        return 0.0
    total = parts[0] if len(parts) == 1 else torch.stack(torch.broadcast_tensors(*parts)).sum(0)
    return total * scale


def _finish(
    data: StepData,
    needs: frozenset[str],
    l2: Tensor | float,
    dots: Tensor | float,
    sgs: list[Tensor],
    values: list[Tensor],
    thetas: list[Tensor],
) -> None:
    norms = torch.stack(torch._foreach_norm(data.grads)) if data.grads else None
    host = _to_host(
        [
            norms,
            torch.as_tensor(l2) if BATCH_L2 in needs else None,
            torch.as_tensor(dots) if DOTS in needs else None,
        ]
    )
    data.grad_norms, batch_l2, batch_dots = host
    if BATCH_L2 in needs:
        data.batch_l2 = batch_l2
    if DOTS in needs:
        data.dots = batch_dots
    if SGS in needs and sgs:  # in a reused buffer, scaled by c^2 in place
        data.sgs = data.workspace.flat("sgs", sgs)
        if data.c != 1:
            data.sgs.mul_(data.c**2)
    if ENTRIES in needs and values:
        data.hist_values = torch.cat(values).cpu()
        data.hist_params = torch.cat(thetas).cpu() if thetas else None


def _to_host(parts: list[Tensor | None]) -> list[Tensor | None]:
    """The tensors as float64 on the CPU in one transfer per device (one host synchronisation
    instead of one each); ``None`` entries stay ``None``."""
    present = [t for t in parts if t is not None]
    if not present:
        return list(parts)
    device = present[0].device
    if any(t.device != device for t in present):  # e.g. a 0-d CPU zero next to CUDA rows
        return [None if t is None else t.double().cpu() for t in parts]
    flat = torch.cat([t.reshape(-1).double() for t in present]).cpu()
    out: list[Tensor | None] = []
    start = 0
    for t in parts:
        if t is None:
            out.append(None)
            continue
        out.append(flat[start : start + t.numel()].reshape(t.shape))
        start += t.numel()
    return out


def gather_grads(
    data: StepData, grad_of_loss: dict[str, Tensor], params: dict[str, Tensor]
) -> None:
    """``g`` per layer from autograd's gradient alone (no per-sample rows).

    Args:
        data: the step's data (``B`` and ``c`` set); filled in place.
        grad_of_loss: the ordinary backward's gradients (per unit of loss).
        params: the model's trainable parameters by name (order of the layers); those the
            loss did not reach (no gradient) are left out, as the per-sample rows leave them.
    """
    scale = data.c / data.B
    for name in params:
        g = grad_of_loss.get(name)
        if g is None:
            continue
        data.layers.append(name)
        data.grads.append((g * scale if scale != 1 else g).reshape(-1))
    _finish(data, frozenset({GRAD}), 0.0, 0.0, [], [], [])


def layer_norms(tensors: dict[str, Tensor]) -> dict[str, float]:
    """Per entry the Euclidean norm (one sync), float64 on the CPU."""
    names = list(tensors)
    norms = torch.stack(torch._foreach_norm([tensors[n] for n in names])).double().cpu()
    return dict(zip(names, norms.tolist()))


__all__ = [
    "BATCH_L2",
    "CURVATURE",
    "DIRECTIONAL",
    "DISTANCE",
    "DOTS",
    "ENTRIES",
    "ENTRY_PARAMS",
    "GGN_DIAG",
    "GGN_SPECTRA",
    "GRAD",
    "HESS_MAX_EV",
    "LOSS",
    "LOSSES",
    "LR",
    "PER_SAMPLE",
    "SGS",
    "UPDATE",
    "Settings",
    "StepData",
    "Workspace",
    "gather_grads",
    "gather_rows",
]
