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

from ..factors import DiagonalFactors, KroneckerFactors
from ..quantities import KFAC, BatchGrad, DiagHessian, GGNEigen, Grad, Quantity, ReduceContext
from ..rules import Form, generic_forms, merge_forms, uses_batch_statistics
from ..vivit import GGNEigenResult, ggn_eigen
from .attribution import _region as _region_of
from .attribution import attribute
from .capture import Call, Recorder, Unit, plan_units
from .hessian import hesscale, residual_sites
from .losses import (
    check_loss_fn,
    check_target,
    is_internal_loss_call,
    loss_vectors,
    reduction_factor,
)


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
        self.watch_backward = False
        self._seen: dict[tuple[int, int], Tensor] = {}
        self.backward_seed: Tensor | None = None  # d(backpropagated)/d(loss), watched backward
        self._node_kinds: set[str] | None = None
        self._node_handles: list[Any] = []

    # -- forward ------------------------------------------------------------------------------
    def _loss_hook(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        if torch.is_grad_enabled() and self.recorder.enabled and not is_internal_loss_call():
            self.loss_calls.append((args[0], args[1], output))
            if self.watch_backward and output.requires_grad:
                self._watch(output)

    def _watch(self, loss: Tensor) -> None:
        """Record every layer-output gradient of the next ordinary ``loss.backward()`` (node
        pre-hooks at the recorded gradient edges), so that first-order quantities need no
        backward pass of their own. Attribution runs when that backward starts."""
        nodes: dict[int, tuple[Any, set[int]]] = {}
        for unit in self.units:
            for call in unit.calls:
                for edge in call.edges:
                    if edge is not None:
                        nodes.setdefault(id(edge.node), (edge.node, set()))[1].add(edge.output_nr)
        for key, (node, nrs) in nodes.items():

            def pre(grad_outputs: tuple, key: int = key, nrs: set[int] = nrs) -> None:
                for nr in nrs:
                    if grad_outputs[nr] is not None:
                        self._seen[(key, nr)] = grad_outputs[nr]

            self._node_handles.append(node.register_prehook(pre))
        names = {id(p): n for n, p in self.model.named_parameters()}

        def on_loss(grad: Tensor) -> None:
            self.backward_seed = grad.detach()
            self._node_kinds = attribute(loss, self.units, names)

        loss.register_hook(on_loss)

    def __enter__(self) -> Session:
        self.recorder.__enter__()
        self._loss_handle = self.loss_fn.register_forward_hook(self._loss_hook)
        return self

    def __exit__(self, *exc: object) -> None:
        self.recorder.remove()
        for handle in self._node_handles:
            handle.remove()
        self._node_handles.clear()
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

    def compute(
        self, loss: Tensor, out: Result | None = None, retain_graph: bool = False
    ) -> Result:
        """Backpropagate once and reduce every requested quantity. ``out``: a previous result
        whose per-sample tensors (``BatchGrad``) may be overwritten to save allocation.
        ``retain_graph``: keep the forward graph so that ``loss.backward()`` can still run
        (optimizers collect statistics this way before the ordinary backward pass)."""
        self.__exit__()
        output, target = self._loss_record(loss)
        check_target(self.loss_fn, output, target)
        if not bool(torch.isfinite(loss)):
            raise FloatingPointError(f"the loss is not finite ({loss.item()})")
        N = output.shape[0]
        names = {id(p): n for n, p in self.model.named_parameters()}
        want_grad = Grad() in self.quantities
        only_grad = self.quantities == [Grad()]
        node_kinds: set[str] = set()
        watched = self.backward_seed is not None  # the layer-output gradients of loss.backward()
        if watched:
            node_kinds = self._node_kinds or set()
        elif not only_grad:  # a plain gradient needs no attribution to layer calls
            node_kinds = attribute(loss, self.units, names)
        index = _index(self.subsampling, N, loss.device) if self.per_sample else None
        kinds = list(dict.fromkeys(q.vectors for q in self.quantities if not isinstance(q, Grad)))
        second_order = any(kind[0] != "grad" for kind in kinds)
        wants_grad_vectors = want_grad or any(isinstance(q, GGNEigen) for q in self.quantities)
        if second_order and wants_grad_vectors and ("grad", 1) not in kinds:
            kinds.insert(0, ("grad", 1))

        if watched and want_grad and ("grad", 1) not in kinds:
            kinds.insert(0, ("grad", 1))
        calls = [] if only_grad and not watched else [(u, c) for u in self.units for c in u.calls]
        if all(isinstance(q, KFAC) and not q.diagonal_fallback for q in self.quantities):
            # Kronecker blocks only: layers without a Kronecker rule need no backward
            calls = [(u, c) for u, c in calls if _has_kronecker(u)]
        edges = [(u, c, i) for u, c in calls for i, e in enumerate(c.edges) if e is not None]
        targets = [c.edges[i] for _, c, i in edges]
        where = [u.name for u, _, _ in edges]
        if watched:
            if second_order:
                raise RuntimeError(
                    "second-order quantities need their own backward pass: compute them before "
                    "loss.backward()"
                )
            seed = self.backward_seed
            unit = bool((seed == 1).all())  # once, not per layer output
            grads = tuple(
                None
                if (g := self._seen.get((id(e.node), e.output_nr))) is None
                else (g if unit else g / seed)
                for e in targets
            )
            _check_finite(grads, where)
            param_grads, residual = {}, {}
            per_kind = (
                {kinds[0]: [None if g is None else g.unsqueeze(0) for g in grads]} if kinds else {}
            )
        elif not second_order:
            # one backward pass of the loss: to every recorded layer output, and to the
            # parameters only when the gradient itself is requested (autograd forms it at
            # the cost of a plain backward)
            params = _served_parameters(self.units) if want_grad else []
            grads = torch.autograd.grad(
                loss, targets + params, allow_unused=True, retain_graph=retain_graph
            )
            # layer-output gradients suffice (parameter gradients are products of them with
            # finite inputs); without layer outputs, the parameter gradients are checked
            if edges:
                _check_finite(grads[: len(edges)], where)
            else:
                _check_finite(grads, [names[id(p)] for p in params])
            param_grads = {id(p): g for p, g in zip(params, grads[len(edges) :])}
            residual = {}
            per_kind = (
                {kinds[0]: [None if g is None else g.unsqueeze(0) for g in grads[: len(edges)]]}
                if kinds
                else {}
            )
        else:
            residual = {}
            for q in self.quantities:
                if isinstance(q, DiagHessian) and q.method == "hesscale":
                    raise NotImplementedError("DiagHessian(method='hesscale') needs bg.compute")
                if isinstance(q, DiagHessian):  # before the main pass frees the graph
                    residual = self._hessian_residuals(q, loss, output, calls, edges, node_kinds, N)
            # one vectorized backward pass of all output-space vectors from the model output
            blocks = [self._vectors(kind, output, target) for kind in kinds]
            stacked = torch.cat(blocks, 0)
            grads = _backprop_vectors(output, targets, stacked, node_kinds, retain_graph)
            _check_finite(grads, where)
            param_grads = {}
            per_kind, start = {}, 0
            for kind, block in zip(kinds, blocks):
                K = block.shape[0]
                per_kind[kind] = [None if g is None else g[start : start + K] for g in grads]
                start += K

        forms: dict[tuple[str, int], dict[int, list[Form]]] = {}
        call_grads: dict[tuple[str, int], dict[int, list[Tensor | None]]] = {}
        for kind, kind_grads in per_kind.items():
            call_grads[kind], forms[kind] = self._forms(calls, edges, kind_grads, N)

        values: dict[Quantity, dict[str, Tensor]] = {q: {} for q in self.quantities}
        # per-sample gradients first: once materialized, the other reductions read them
        order = [q for q in self.quantities if not isinstance(q, (Grad, KFAC, GGNEigen))]
        ctx = ReduceContext(N, self.loss_fn.reduction)  # type: ignore[arg-type]
        order.sort(key=lambda q: not isinstance(q, BatchGrad))
        rules = _rules_by_name(self.units, names)
        for name, param in self.model.named_parameters():
            if name not in rules:
                continue
            merged: dict[tuple[str, int], Form | None] = {}
            for kind, kind_forms in forms.items():
                form_list = kind_forms.get(id(param))
                merged[kind] = merge_forms(form_list) if form_list else None
            if want_grad:
                if second_order or watched:
                    form = merged.get(("grad", 1))
                    g = form.grad() if form is not None else None
                else:
                    g = param_grads.get(id(param))
                values[Grad()][name] = g if g is not None else torch.zeros_like(param)
            selected: dict[tuple[str, int], Form | None] = {}
            for q in order:
                form = merged.get(q.vectors)
                if form is None:
                    S = N if index is None or not q.per_sample else len(index)
                    values[q][name] = _zeros(q, param, S, ctx)
                    continue
                if want_grad and index is None and q.vectors == ("grad", 1):
                    form.seed("grad", values[Grad()][name])
                if q.per_sample and index is not None:
                    if q.vectors not in selected:
                        selected[q.vectors] = form.select(index)
                    form = selected[q.vectors]
                buffer = _buffer(out, q, name, (form.rows, *param.shape), param)
                values[q][name] = q.reduce(form, ctx, buffer)
            for q in order:
                if isinstance(q, DiagHessian) and id(param) in residual:
                    values[q][name] = values[q][name] + residual[id(param)]
        R = reduction_factor(self.loss_fn, output, target)
        for q in self.quantities:
            if isinstance(q, KFAC):
                values[q] = self._kfac(q, call_grads[q.vectors], forms[q.vectors], names, N, R)
            if isinstance(q, GGNEigen):
                values[q] = self._eigen(q, forms, names, index)
        return Result(loss.detach(), output.detach(), values, rules, index)

    def _forms(
        self,
        calls: list[tuple[Unit, Call]],
        edges: list[tuple[Unit, Call, int]],
        grads: Sequence[Tensor | None],
        N: int,
    ) -> tuple[dict[int, list[Tensor | None]], dict[int, list[Form]]]:
        """Per call, the output gradients ``[K, *shape]`` of one set of vectors, and per
        parameter (by id) the forms of all its calls."""
        out_grads: dict[int, list[Tensor | None]] = {
            id(c): [None] * len(c.outputs) for _, c in calls
        }
        for (_, c, i), g in zip(edges, grads):
            if g is not None:
                shape = c.edge_shapes[i]
                out_grads[id(c)][i] = g.view(g.shape[0], *shape) if shape is not None else g
        forms: dict[int, list[Form]] = {}
        for unit, call in calls:
            gs = out_grads[id(call)]
            if all(g is None for g in gs):
                continue
            for local, form in self._call_forms(unit, call, gs, N).items():
                forms.setdefault(id(unit.params[local]), []).append(form)
        return out_grads, forms

    def _hessian_residuals(
        self,
        q: DiagHessian,
        loss: Tensor,
        output: Tensor,
        calls: list[tuple[Unit, Call]],
        edges: list[tuple[Unit, Call, int]],
        node_kinds: set[str],
        N: int,
    ) -> dict[int, Tensor]:
        """Per parameter (by id), the residual part of the Hessian diagonal (see
        :mod:`beyondgrad.engine.hessian`); runs before the main backward pass."""
        params = {id(p) for u in self.units for p in u.params.values()}
        regions = [(u.name, _region_of(c)) for u, c in calls]

        def where(node: Any) -> str:
            inside = [(len(r), name) for name, r in regions if node in r]
            return (
                f"module '{min(inside)[1]}'"
                if inside
                else "the model (outside any layer with parameters)"
            )

        sites = residual_sites(output, params, where)
        if not sites:
            return {}
        deltas = torch.autograd.grad(loss, [s.output_edge for s in sites], retain_graph=True)
        targets = [c.edges[i] for _, c, i in edges]
        residual: dict[int, Tensor] = {}
        for site, delta in zip(sites, deltas):
            d = (delta * site.second).reshape(N, -1)  # [N, units]
            K = d.shape[1]
            if 2 * K > q.max_vectors:
                raise RuntimeError(
                    f"DiagHessian: the element-wise nonlinearity {site.name} has {K} units per "
                    f"sample; its exact residual term backpropagates {2 * K} vectors (limit "
                    f"max_vectors={q.max_vectors}). Raise max_vectors explicitly, or use DiagGGN."
                )
            eye = torch.eye(K, dtype=d.dtype, device=d.device)
            signed = []
            for part in (d.clamp_min(0), (-d).clamp_min(0)):
                vectors = (eye.unsqueeze(1) * part.sqrt().unsqueeze(0)).reshape(K, *delta.shape)
                grads = _backprop_vectors(
                    site.input_edge, targets, vectors, node_kinds, retain=True
                )
                _, part_forms = self._forms(calls, edges, grads, N)
                signed.append(
                    {pid: merge_forms(f).sum_grad_squared() for pid, f in part_forms.items()}
                )
            for pid in signed[0].keys() | signed[1].keys():
                value = signed[0].get(pid, 0) - signed[1].get(pid, 0)
                residual[pid] = residual[pid] + value if pid in residual else value
        return residual

    def _kfac(
        self,
        q: KFAC,
        grads: dict[int, list[Tensor | None]],
        forms: dict[int, list[Form]],
        names: dict[int, str],
        N: int,
        R: float,
    ) -> dict[str, Any]:
        """One block per module: Kronecker factors where the rule has them, else the
        diagonal of the same curvature (see :mod:`beyondgrad.factors`)."""
        blocks: dict[str, Any] = {}
        for unit in self.units:
            if not unit.params:
                continue
            kron = unit.rule.kronecker if unit.rule is not None else None
            param_names = tuple(names[id(p)] for p in unit.params.values())
            if not _has_kronecker(unit) and not q.diagonal_fallback:
                continue
            if kron is not None and "weight" in unit.params:
                stats = None
                for call in unit.calls:
                    g = grads.get(id(call), [None])[0]
                    if g is None:
                        continue
                    K = g.shape[0]
                    part = kron(
                        unit.module,
                        call.x.detach(),
                        g.reshape(K * N, *g.shape[2:]),
                        K,
                        q.kfac_approx,
                    )
                    stats = part if stats is None else stats + part
                if stats is None:
                    continue
                blocks[unit.name] = _kronecker_factors(q, stats, unit, param_names, N, R)
                continue
            if q.fisher_type == "forward-only":
                raise NotImplementedError(
                    f"KFAC(fisher_type='forward-only') has no fallback for module "
                    f"'{unit.name}' ({type(unit.module).__name__}, rule {unit.rule_name}); "
                    "use another fisher_type"
                )
            diag = {}
            for _local, p in unit.params.items():
                form_list = forms.get(id(p))
                value = (
                    merge_forms(form_list).sum_grad_squared() if form_list else torch.zeros_like(p)
                )
                diag[names[id(p)]] = value / R if q.fisher_type == "empirical" else value
            blocks[unit.name] = DiagonalFactors(diag, q.fisher_type, R, N)
        return blocks

    def _eigen(
        self,
        q: GGNEigen,
        forms: dict[tuple[str, int], dict[int, list[Form]]],
        names: dict[int, str],
        index: Tensor | None,
    ) -> dict[str, GGNEigenResult]:
        params = dict(self.model.named_parameters())
        served = {names[id(p)] for u in self.units for p in u.params.values()}
        groups = q.param_groups or (tuple(n for n in params if n in served),)
        out: dict[str, GGNEigenResult] = {}
        for i, group in enumerate(groups):
            curvature, gradient = {}, {}
            for name in group:
                if name not in params:
                    raise KeyError(f"GGNEigen: unknown parameter {name!r}")
                pid = id(params[name])
                c_list, g_list = forms[q.vectors].get(pid), forms[("grad", 1)].get(pid)
                if not c_list or not g_list:
                    continue
                c, g = merge_forms(c_list), merge_forms(g_list)
                if index is not None:
                    c, g = c.select(index), g.select(index)
                curvature[name], gradient[name] = c, g
            if not curvature:
                raise ValueError(f"GGNEigen: no parameter of group {i} reaches the loss")
            key = "model" if q.param_groups is None else f"group{i}"
            out[key] = ggn_eigen(curvature, gradient, q.top_k)
        return out

    def _vectors(self, kind: tuple[str, int], output: Tensor, target: Tensor) -> Tensor:
        """The output-space vectors of ``kind`` (``("grad", 1)``, ``("exact", 0)``,
        ``("mc", M)``), after checking that exact ones stay affordable."""
        name, M = kind
        if name == "exact":
            per_sample = output[0].numel()
            limit = min(q.max_vectors for q in self.quantities if q.vectors == kind)  # type: ignore[attr-defined]
            if per_sample > limit:
                raise RuntimeError(
                    f"exact (type-2) curvature backpropagates one vector per model output per "
                    f"sample: {per_sample} here (e.g. classes x positions), i.e. about "
                    f"{per_sample} backward passes. Use the Monte-Carlo variant "
                    f"(e.g. mc_samples=1) or raise max_vectors (now {limit}) explicitly."
                )
        return loss_vectors(self.loss_fn, output, target, name, max(M, 1), self.generator)

    def _call_forms(
        self, unit: Unit, call: Call, gs: list[Tensor | None], N: int
    ) -> dict[str, Form]:
        """Forms of one call; ``gs[i]``: ``[K, *outputs[i].shape]`` gradients of K vectors."""
        _check_versions(unit, call)
        K = next(g.shape[0] for g in gs if g is not None)
        if unit.rule is not None:
            g = gs[0]
            if g is None or not unit.params:
                return {}
            if call.x.ndim == 0 or call.x.shape[0] != N or g.shape[1] != N:
                raise RuntimeError(
                    f"module '{unit.name}': expected the sample axis (length {N}) first, got "
                    f"input {tuple(call.x.shape)} and output {tuple(g.shape[1:])}. beyondgrad "
                    "treats the leading axis of every layer's input as the sample axis."
                )
            g = g.reshape(K * N, *g.shape[2:])
            local = unit.rule.forms(unit.module, call.x.detach(), g, K)
            return {k: v for k, v in local.items() if k in unit.params}
        with self.recorder.paused(), torch.enable_grad():
            return generic_forms(
                unit.module, unit.params, call.args, call.kwargs, call.output, gs, N, K
            )


def _kronecker_factors(
    q: KFAC, stats: Any, unit: Unit, param_names: tuple[str, ...], N: int, R: float
) -> KroneckerFactors:
    A = stats.A_sum / stats.count
    B = stats.B_sum
    if q.fisher_type == "empirical":  # the loss-gradient vectors carry R twice
        B = B / R
    elif q.fisher_type == "forward-only":
        B = torch.eye(B.shape[-1], dtype=B.dtype, device=B.device).expand_as(B).clone()
    has_bias = "bias" in unit.params
    bias_mode: str | None = q.bias if has_bias else None
    bias_block = None
    if bias_mode == "separate":
        bias_block = B * A[:, -1:, -1:]
        A = A[:, :-1, :-1]
    squeeze = A.shape[0] == 1
    return KroneckerFactors(
        A[0] if squeeze else A,
        B[0] if squeeze else B,
        stats.order,
        param_names,
        bias_mode,
        q.fisher_type,
        q.kfac_approx,
        R,
        N,
        (bias_block[0] if squeeze else bias_block) if bias_block is not None else None,
        stats.weight_perm,
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


# autograd nodes without a vmap batching rule (torch 2.13): vectorized backward passes through
# them fall back to a slow per-vector loop plus concatenation, slower than plain passes
_UNBATCHED_NODES = frozenset({"ConvolutionBackward0", "ConvolutionBackwardBackward0"})


def _has_kronecker(unit: Unit) -> bool:
    return unit.rule is not None and unit.rule.kronecker is not None and "weight" in unit.params


def _backprop_vectors(
    output: Any, targets: list[Any], vectors: Tensor, node_kinds: set[str], retain: bool = False
) -> tuple[Tensor | None, ...]:
    """Gradients ``[K, *target.shape]`` of ``<vectors[k], output>`` (a tensor or gradient
    edge) w.r.t. every target: one vectorized backward pass, or one pass per vector where vmap
    has no batching rule."""
    if not targets:
        return ()
    K = vectors.shape[0]
    if K > 1 and not (node_kinds & _UNBATCHED_NODES):
        return torch.autograd.grad(
            [output],
            targets,
            grad_outputs=[vectors],
            is_grads_batched=True,
            allow_unused=True,
            retain_graph=retain,
        )
    per_vector = [
        torch.autograd.grad(
            [output],
            targets,
            grad_outputs=[v],
            retain_graph=retain or k < K - 1,
            allow_unused=True,
        )
        for k, v in enumerate(vectors)
    ]
    return tuple(
        None if parts[0] is None else torch.stack(parts)  # type: ignore[misc]
        for parts in zip(*per_vector)
    )


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
    from_backward: bool = False,
) -> Iterator[Session]:
    """Record an ordinary forward pass, then compute quantities from its loss::

        with bg.capture(model, loss_fn, bg.BatchL2()) as session:
            loss = loss_fn(model(X), y)
        res = session.compute(loss)

    The loss must be the tensor ``loss_fn`` returned (not scaled or modified afterwards). Hooks
    are removed when the block exits, also on errors.

    ``from_backward=True``: the block also runs the ordinary ``loss.backward()`` (or
    ``(c * loss).backward()`` for a constant ``c``, e.g. a gradient scaler's scale), and
    first-order quantities are then computed from the layer-output gradients of that backward
    pass, with no backward pass of their own::

        with bg.capture(model, loss_fn, bg.BatchL2(), from_backward=True) as session:
            loss = loss_fn(model(X), y)
            loss.backward()
        res = session.compute(loss)
    """
    check_loss_fn(loss_fn)
    session = Session(model, loss_fn, _check_quantities(quantities), subsampling, generator)
    session.watch_backward = from_backward
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
    approximate = [q for q in quantities if isinstance(q, DiagHessian) and q.method == "hesscale"]
    if approximate:  # a separate recursion, not the engine's exact backward
        rest = [q for q in quantities if q not in approximate]
        result = (
            compute(
                model,
                loss_fn,
                X,
                y,
                *rest,
                subsampling=subsampling,
                generator=generator,
                accumulate_grad=accumulate_grad,
                out=out,
            )
            if rest
            else None
        )
        check_loss_fn(loss_fn)
        values = hesscale(model, loss_fn, X, y)
        if result is None:
            with torch.no_grad():
                output = _call_model(model, X)
                loss = loss_fn(output, y)
            result = Result(loss, output, {}, {n: "hesscale" for n in values}, None)
        for q in approximate:
            result._values[q] = values
        return result
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
