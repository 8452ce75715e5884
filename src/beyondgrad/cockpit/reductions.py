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
    hess_residual: float | None = None
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
    generator: torch.Generator, settings: Settings, B: int, sizes: list[int], device: torch.device
) -> list[tuple[Tensor, Tensor]]:
    """Random ``(row, flat index)`` pairs per layer: for a layer of ``D`` entries per row,
    ``min(hist_entries, k D)`` entries from ``k = min(hist_samples, B)`` distinct random samples
    (each layer its own samples), taken in turn (entry ``e`` from the ``e mod k``-th: each
    sample gives the same number of entries, up to one), each at a uniformly random index.
    Drawn for all layers at once (two random calls per step instead of three per layer: on
    models with many small tensors the draws cost more than the entries)."""
    L, k, E = len(sizes), min(settings.hist_samples, B), settings.hist_entries
    samples = torch.rand(L, B, generator=generator).argsort(1)[:, :k]  # distinct, per layer
    rows = samples[:, torch.arange(E) % k]
    per_row = torch.tensor(sizes, dtype=torch.float64)[:, None]
    u = torch.rand(L, E, generator=generator, dtype=torch.float64)
    flat = torch.minimum((u * per_row).long(), per_row.long() - 1)  # uniform on 0..D-1
    rows, flat = rows.to(device), flat.to(device)
    counts = [min(E, k * D) for D in sizes]
    return [(rows[i, :n], flat[i, :n]) for i, n in enumerate(counts)]


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
    parts, done = _directional_by_gram(rows, earlier, lr)
    parts += [r.project(direction[name]) for name, r in rows.items() if name not in done]
    total = _layer_sum([p.double() for p in parts], 1.0)
    assert isinstance(total, Tensor)
    return total.cpu()


def _directional_by_gram(
    rows: dict[str, Rows], earlier: list[DenseLayer] | None, lr: float | None
) -> tuple[list[Tensor], set[str]]:
    """The parts of :func:`directional` read from the Gram matrices of dense layers with an
    earlier step (where cheaper), and the parameter names they cover."""
    parts: list[Tensor] = []
    done: set[str] = set()
    if earlier is None or lr is None:
        return parts, done
    before = {layer.names: layer for layer in earlier}
    for layer in dense_layers(rows):
        old = before.get(layer.names)
        if old is None or not old.unchanged() or not layer.gram_is_cheaper(len(old.A)):
            continue
        parts.append(layer.inner(old).sum(1).mul_(-lr))
        done.update(layer.names)
    return parts, done


def gather_rows(
    data: StepData,
    needs: frozenset[str],
    rows: dict[str, Rows],
    grad_of_loss: dict[str, Tensor],
    params: dict[str, Tensor],
    generator: torch.Generator,
    start: dict[str, Any] | None = None,
) -> None:
    """Fill ``data``'s per-layer reductions from the per-sample rows, one pass over layers.

    Layers whose rows are held as a small matrix (biases, normalization layers) are read
    together, as one concatenated matrix (per-layer reductions of many small tensors cost
    more in dispatch than in arithmetic); dense layers without positions by their Gram
    matrices where cheaper; the others layer by layer.

    Args:
        data: the step's data (``B`` and ``c`` set); filled in place.
        needs: the reductions to compute.
        rows: per-sample rows per parameter.
        grad_of_loss: the ordinary backward's gradients (per unit of loss), handed to the
            rows so that ``g`` is not formed twice.
        params: the model's parameters by name (values for the 2-d histogram).
        generator: draws the sampled entries.
        start: Alpha's start point (the previous step's update ``direction``, and for a
            gradient step its dense layers ``rows`` and ``lr``) when ``DIRECTIONAL`` is
            needed: ``data.directional`` is then filled too, each materialized layer
            projected on ``g`` and on the update in one product.
    """
    B, c = data.B, data.c
    reads = sum(key in needs for key in ROW_READS) + (start is not None)
    acc = _Sums(l2=[], dots=[], along=[], sgs={})
    fused = _dense_grams(rows, needs, B, acc)
    projected: set[str] = set()
    if start is not None:
        acc.along, projected = _directional_by_gram(rows, start.get("rows"), start.get("lr"))
    small: dict[str, Tensor] = {}
    for name, r in rows.items():
        if name in grad_of_loss:  # the ordinary backward already formed it
            r.provide_grad(grad_of_loss[name])
        g = r.grad()  # mean_n g_n (scaled below only for sum losses: no copy)
        data.layers.append(name)
        data.grads.append((g * (c / B) if c != B else g).reshape(-1))
        matrix = None if name in fused or name in projected else r.small_matrix(SMALL_ROWS)
        if matrix is not None and _joins(small, matrix):
            small[name] = matrix
            continue
        direction = None if start is None or name in projected else start["direction"][name]
        _layer(r, name, needs, reads, name in fused, direction, acc)
    grouped = _small_layers(small, data, needs, start, acc)
    values, thetas = (
        _entries(data, needs, rows, params, generator, grouped) if ENTRIES in needs else ([], [])
    )
    sgs = [acc.sgs[name] for name in data.layers] if SGS in needs else []
    sums = (_layer_sum(acc.l2 if BATCH_L2 in needs else [], c**2),
            _layer_sum(acc.dots if DOTS in needs else [], c * c / B))  # fmt: skip
    derivatives = None if start is None else _layer_sum([p.double() for p in acc.along], c)
    _finish(data, needs, *sums, sgs, values, thetas, derivatives)


#: layers whose rows are held as a matrix with at most this many entries per row are reduced
#: together, as one concatenated matrix
SMALL_ROWS = 1 << 12


@dataclass
class _Sums:
    """The per-layer parts of one step's reductions, summed over layers at the end."""

    l2: list[Tensor]
    dots: list[Tensor]
    along: list[Tensor]
    sgs: dict[str, Tensor]


def _layer(
    r: Rows,
    name: str,
    needs: frozenset[str],
    reads: int,
    fused: bool,
    direction: Tensor | None,
    acc: _Sums,
) -> None:
    """The reductions of one layer read on its own (its rows materialized first when
    ``reads`` reductions read them); ``fused``: its norms and dots came from Gram matrices;
    ``direction``: the last update, when Alpha's end-point slopes are formed here."""
    r.prepare(reads)
    if BATCH_L2 in needs and not fused:
        acc.l2.append(r.batch_l2())
    dot, derivative = r.projections(direction, DOTS in needs and not fused)
    acc.dots.extend([] if dot is None else [dot])
    acc.along.extend([] if derivative is None else [derivative])
    if SGS in needs:
        acc.sgs[name] = r.sum_grad_squared()


def _joins(small: dict[str, Tensor], matrix: Tensor) -> bool:
    """Whether ``matrix`` can be concatenated with the small matrices gathered so far (same
    dtype and device as the first)."""
    first = next(iter(small.values()), matrix)
    return matrix.dtype == first.dtype and matrix.device == first.device


def _dense_grams(rows: dict[str, Rows], needs: frozenset[str], B: int, acc: _Sums) -> set[str]:
    """Norms and dots of the dense layers (no positions) whose Gram matrices are cheaper than
    their rows, into ``acc``; returns the parameter names they cover."""
    fused: set[str] = set()
    if BATCH_L2 in needs or DOTS in needs:
        for layer in dense_layers(rows):
            if layer.gram_is_cheaper(B):
                inner = layer.inner()
                acc.l2.append(inner.diagonal())
                acc.dots.append(inner.sum(1))
                fused.update(layer.names)
    return fused


def _small_layers(
    small: dict[str, Tensor],
    data: StepData,
    needs: frozenset[str],
    start: dict[str, Any] | None,
    acc: _Sums,
) -> tuple[Tensor, dict[str, int]] | None:
    """The reductions of the layers held as small row matrices ``[B, D_i]``, from one
    concatenated ``[B, sum D_i]`` matrix: norms, one product with ``g`` and the update
    stacked, the sums of squares split back per layer. Returns that matrix and each layer's
    column offset in it (None without such layers)."""
    if not small:
        return None
    names = list(small)
    widths = [small[n].shape[1] for n in names]
    R = torch.cat(list(small.values()), 1) if len(small) > 1 else small[names[0]]
    grads = {n: g for n, g in zip(data.layers, data.grads)}
    scale = data.B / data.c  # data.grads are mean_n g_n: back to the rows' sum
    vectors = []
    if DOTS in needs:
        vectors.append(torch.cat([grads[n] for n in names]).to(R.dtype) * scale)
    if start is not None:
        vectors.append(torch.cat([start["direction"][n].reshape(-1) for n in names]).to(R.dtype))
    if vectors:
        both = R @ torch.stack(vectors, 1)
        acc.dots.extend([both[:, 0]] if DOTS in needs else [])
        acc.along.extend([both[:, -1]] if start is not None else [])
    if BATCH_L2 in needs:
        acc.l2.append(torch.linalg.vector_norm(R, dim=1).square())
    if SGS in needs:
        acc.sgs.update(zip(names, R.square().sum(0).split(widths)))  # flat, as data.grads
    offsets = [sum(widths[:i]) for i in range(len(names))]
    return R, dict(zip(names, offsets))


def _entries(
    data: StepData,
    needs: frozenset[str],
    rows: dict[str, Rows],
    params: dict[str, Tensor],
    generator: torch.Generator,
    small: tuple[Tensor, dict[str, int]] | None,
) -> tuple[list[Tensor], list[Tensor]]:
    """The sampled per-sample gradient entries of every layer (scaled as ``g_n``) and, when
    ``ENTRY_PARAMS`` is needed, the parameter values at them (in the same order). ``small``:
    the concatenated matrix of the small layers and each one's column offset in it (their
    entries are gathered from it in one indexing)."""
    if not data.grads:
        return [], []
    sizes = [g.numel() for g in data.grads]
    picks = sample_entries(generator, data.settings, data.B, sizes, data.grads[0].device)
    values, thetas, together, small_thetas = [], [], [], []
    offsets = {} if small is None else small[1]
    for (sel_rows, flat), name in zip(picks, data.layers):
        if name in offsets:
            together.append((sel_rows, flat + offsets[name]))
        else:
            values.append(rows[name].entries(sel_rows, flat).detach() * data.c)
        if ENTRY_PARAMS in needs:
            theta = params[name].detach().reshape(-1)[flat]
            (small_thetas if name in offsets else thetas).append(theta)
    if together:
        assert small is not None
        at_rows, at_cols = (torch.cat(t) for t in zip(*together))
        values.append(small[0][at_rows, at_cols] * data.c)
    return values, thetas + small_thetas


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
    derivatives: Tensor | float | None = None,
) -> None:
    norms = torch.stack(torch._foreach_norm(data.grads)) if data.grads else None
    entries = ENTRIES in needs and bool(values)
    host = _to_host(  # one transfer for all (float64)
        [
            norms,
            torch.as_tensor(l2) if BATCH_L2 in needs else None,
            torch.as_tensor(dots) if DOTS in needs else None,
            None if derivatives is None else torch.as_tensor(derivatives),
            torch.cat(values) if entries else None,
            torch.cat(thetas) if entries and thetas else None,
        ]
    )
    data.grad_norms, batch_l2, batch_dots, data.directional = host[:4]
    if entries:
        data.hist_values, data.hist_params = host[4:]
    if BATCH_L2 in needs:
        data.batch_l2 = batch_l2
    if DOTS in needs:
        data.dots = batch_dots
    if SGS in needs and sgs:  # in a reused buffer, scaled by c^2 in place
        data.sgs = data.workspace.flat("sgs", sgs)
        if data.c != 1:
            data.sgs.mul_(data.c**2)


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
