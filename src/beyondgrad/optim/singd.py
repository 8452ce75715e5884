"""SINGD: structured inverse-free natural gradient descent (Lin, Dangel et al., ICML 2024).

Per Linear / Hugging Face ``Conv1D`` (weight stored ``[in, out]``; its gradient is used
transposed) / Conv1/2/3d layer (joint bias) with gradient ``G`` (``[O, I(+1)]``),
the preconditioner is ``(C C^T) kron (K K^T)`` with ``K`` (``[I(+1), I(+1)]``) and ``C``
(``[O, O]``) in a chosen :mod:`structure <beyondgrad.optim.structures>`; both start at ``I``.
A convolution with ``groups=G`` (depthwise included) is ``G`` independent blocks, one pair of
factors per group (``K``: ``[G, I/G*k(+1), ...]``, ``C``: ``[G, O/G, ...]``, the structure's
storage stacked over the groups), updated and applied group by group.
``max_block=b`` turns a ``dense`` factor wider than ``b`` into a block-diagonal one
(``ceil(d / b)`` equal diagonal blocks: the structure ``block{b'}diagonal``), whose update costs
``d b'^2`` instead of ``d^3``. Dense and block-diagonal factors are applied through
:func:`~.products.kronecker_solve`, one product per side (``C C^T`` and ``K K^T`` formed once per
refresh where that is cheaper), batched over layers of one shape.
Every ``refresh_every`` steps (a param-group setting; ``T`` is its deprecated spelling),
statistics are collected and, from the engine's Kronecker statistics ``A`` (inputs) and
``B`` (output gradients; the curvature of the loss is ``B kron A``, see :class:`~beyondgrad.KFAC`)::

    H_K = P(K^T A K)                 H_C = P(C^T B C)       (P: projection onto the structure)
    m_K <- alpha1 m_K + s [c_C H_K + damping d_C P(K^T K) - I]
    m_C <- alpha1 m_C + s [c_K H_C + damping d_K P(C^T C) - I]
    K <- K (I - lr_cov m_K)          C <- C (I - lr_cov m_C)

with ``c_C = tr(H_C)/O``, ``d_C = tr(C^T C)/O`` (and symmetrically), or ``c = d = 1`` for
the KFAC-like variant IKFAC (``kfac_like=True``, whose fixed point is ``K K^T = (A +
damping I)^{-1}``); ``s = 1/2`` (``(1 - alpha1)/2`` and ``lr_cov / max(1, max|m|)`` with
``normalize_lr_cov=True``). Only matrix products: no inverse, no decomposition, so factors may
be stored and updated in bfloat16 (``preconditioner_dtype=(dtype_K, dtype_C)``). Every step:
``direction = C C^T G K K^T``, then optional grafting and clipping, momentum and decoupled
weight decay (``p <- p (1 - lr wd) - lr buf``). Other parameters go to the AdamW fallback
(``routing()``).

Defaults that train without tuning (the paper's plain rule: ``grafting=None,
normalize_lr_cov=False, warmup=0``):

- ``grafting="adam"``: each direction takes the norm of Adam's step, so ``lr`` is an
  Adam-like learning rate whatever the scale of the curvature;
- ``normalize_lr_cov=True``: a factor step never moves ``K`` by more than ``lr_cov`` (inputs
  of variance 1e3 otherwise make ``I - lr_cov m`` indefinite and the factors diverge);
- ``warm_start`` (off by default: on the test problems it was slower than the identity
  start, which the Adam grafting already puts at the right step length): at the first
  statistics, ``K`` and ``C`` start from the structure's
  projection of ``diag(diag(A) + sqrt(damping))^{-1/2}`` (and of ``B``; IKFAC: ``+ damping``)
  instead of ``I``, so the first steps are a Jacobi-preconditioned (not a plain SGD) step at
  the curvature's scale, and the factor updates start near their fixed point (the app's
  factory, ``make_optimizer("singd")``, turns it on with ``lr_cov=0.1``: on the optimizer
  suite's minute-long runs the factors at ``lr_cov=1e-2`` barely move; ``docs/optim.md``);
- ``warmup=5`` steps of linear learning-rate warm-up with a damping that falls from 10x
  to 1x (:mod:`~beyondgrad.optim.schedule`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from ._engine import from_factor_layout, to_factor_layout
from .averages import decayed_sum
from .damping import check_damping, trace_coupled
from .kronecker import KroneckerOptimizer
from .ownership import defer_state_refresh, make_ownership
from .products import Side, block_shape, explicit_is_cheaper, make_side
from .routing import transposed_layers
from .schedule import check_every, deprecated_alias, is_due
from .statistics import finite_flags
from .structures import BlockDiagonal, Structure, structure

SINGD_RULES = ("linear", "transposed_linear", "conv")
ORDER = "B kron A"
TRANSPOSED = (1, 0)
"""The weight permutation of a transposed Linear (``[in, out]``) into the factor layout."""


def _pair(value: Any, what: str) -> tuple[Any, Any]:
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{what} must be one value or a pair (K, C), got {value!r}")
        return tuple(value)  # type: ignore[return-value]
    return (value, value)


class SINGD(KroneckerOptimizer):
    """``SINGD(model, loss_fn, params=None, lr=1e-3, ...)``; see the module docstring.

    Args:
        model: the network.
        loss_fn: the loss module (called inside ``capture()``).
        params: parameters or param groups (default: all trainable parameters of ``model``).
        lr, momentum, weight_decay: the parameter update (per group; decoupled decay).
        damping: non-negative (per group).
        alpha1: Riemannian momentum of the factor updates, in ``[0, 1)`` (per group).
        lr_cov: learning rate of the factor updates, positive (per group).
        structures: a structure name or a pair ``(K, C)`` (per group, see
            :mod:`~beyondgrad.optim.structures`).
        preconditioner_dtype: dtype or pair of the factors (default: the parameter's).
        kfac_like: the IKFAC variant (per group).
        normalize_lr_cov: scale ``lr_cov`` by ``1 / max(1, max|m|)`` (per group).
        refresh_every: statistics and factor updates every this many steps (per group).
            Cost: on the suite's char-GPT a step costs about 1.11 AdamW steps, a refresh
            (the engine's statistics pass and the factor update) about 1.8 more, so per step
            roughly ``1.11 + 1.8 / refresh_every`` (measured interleaved: 1.47 at 5, 1.22 at
            20; ``benchmarks/optim.py``).
        warm_start: start the factors from the first statistics' diagonals (per group).
        max_block: a ``dense`` factor wider than this is block-diagonal instead, with
            ``ceil(d / max_block)`` equal blocks of at most ``max_block`` rows (e.g. 1001 ->
            ``block251diagonal``): its update costs ``d b^2`` instead of ``d^3`` and its
            products ``d b`` instead of ``d^2`` per column (per group; None: whole factors).
        warmup: learning-rate warm-up steps (per group; 0: none).
        compile_update: ``torch.compile`` the preconditioning product (True, or a backend
            name); off by default.
        fisher_type: ``"empirical"`` (as in the paper), ``"mc"`` or ``"type-2"``.
        mc_samples: Monte-Carlo samples per data point (``"mc"``).
        kfac_approx: ``"expand"`` or ``"reduce"``.
        seed: seeds the Monte-Carlo draws.
        kl_clip, max_update_norm: clipping (global, off by default; see
            :mod:`~beyondgrad.optim.clipping`).
        grafting: None, ``"sgd"`` or ``"adam"`` (per group; default ``"adam"``).
        T: deprecated spelling of ``refresh_every``.
        ownership: ``None`` (every rank updates every layer's factors), ``"owner"`` or an
            :class:`~beyondgrad.optim.Ownership`: under ``torch.distributed`` each layer's
            factor update runs on one owner rank (cost-balanced) and ``K``, ``C`` and their
            momenta are broadcast (see :mod:`~beyondgrad.optim.ownership`).
        statistics_dtype: form the Kronecker statistics in this dtype (e.g.
            ``torch.bfloat16``; as :class:`~beyondgrad.optim.KFAC`); ``None``: exact.
        statistics_from_backward: with ``fisher_type="empirical"``, the statistics come from the
            ordinary ``loss.backward()`` (no pass of their own; everything backpropagated
            counts, e.g. an auxiliary loss added to ``loss``); ``False``: from ``loss_fn``'s
            output alone, by a backward pass of their own.
        **adamw: the fallback's ``adam_lr``, ``adam_betas``, ``adam_eps`` and ``precondition``.
    """

    method = "singd"
    rules = SINGD_RULES

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        params: Iterable[Any] | None = None,
        lr: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        damping: float = 1e-3,
        alpha1: float = 0.5,
        lr_cov: float = 1e-2,
        structures: str | tuple[str, str] = "dense",
        preconditioner_dtype: torch.dtype | tuple[Any, Any] | None = None,
        kfac_like: bool = False,
        normalize_lr_cov: bool = True,
        refresh_every: int = 10,
        fisher_type: str = "empirical",
        mc_samples: int = 1,
        kfac_approx: str = "expand",
        seed: int = 0,
        kl_clip: float | None = None,
        max_update_norm: float | None = None,
        grafting: str | None = "adam",
        warm_start: bool = False,
        warmup: int = 5,
        compile_update: bool | str = False,
        max_block: int | None = None,
        *,
        T: int | None = None,
        ownership: Any = None,
        statistics_dtype: torch.dtype | None = None,
        statistics_from_backward: bool = True,
        **adamw: Any,
    ):
        refresh_every = deprecated_alias("SINGD", "refresh_every", refresh_every, 10, "T", T)
        defaults = dict(
            lr=lr, momentum=momentum, weight_decay=weight_decay, damping=damping, alpha1=alpha1,
            lr_cov=lr_cov, structures=structures, preconditioner_dtype=preconditioner_dtype,
            kfac_like=kfac_like, normalize_lr_cov=normalize_lr_cov, refresh_every=refresh_every,
            grafting=grafting, warm_start=warm_start, warmup=warmup, max_block=max_block,
            **adamw,
        )  # fmt: skip
        engine = (fisher_type, kfac_approx, mc_samples, seed)
        engine += (statistics_dtype, statistics_from_backward)
        super().__init__(model, loss_fn, params, defaults, *engine)
        self._transposed = transposed_layers(self.model)
        self._set_compile(compile_update)
        self._product = self.compiled(self._precondition_matrix)
        self._set_clipping(kl_clip, max_update_norm)
        self.ownership = make_ownership(ownership)
        named = dict(self.model.named_parameters())
        for name, state in self.layers.items():
            groups = getattr(self.model.get_submodule(name), "groups", 1)
            self._init_factors(state, named, name in self._transposed, groups)
        self._stack_factors()

    @property
    def T(self) -> int:
        """Deprecated: the first group's ``refresh_every``."""
        warnings.warn(
            "SINGD.T is deprecated; read param_groups[i]['refresh_every']",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.param_groups[0]["refresh_every"]

    @T.setter
    def T(self, value: int) -> None:
        warnings.warn(
            "SINGD.T is deprecated; set param_groups[i]['refresh_every']",
            DeprecationWarning,
            stacklevel=2,
        )
        for group in self.param_groups:
            group["refresh_every"] = check_every("refresh_every", value)

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        group["structures"] = _pair(group["structures"], "structures")
        for name in group["structures"]:
            structure(name)  # raises on unknown names
        group["preconditioner_dtype"] = _pair(group["preconditioner_dtype"], "preconditioner_dtype")
        check_damping(group["damping"], positive=False, owner="SINGD")
        if not 0 <= group["alpha1"] < 1:
            raise ValueError(f"alpha1 must be in [0, 1), got {group['alpha1']}")
        if group["lr_cov"] <= 0:
            raise ValueError(f"lr_cov must be positive, got {group['lr_cov']}")
        if group.get("max_block") is not None:
            check_every("max_block", group["max_block"])

    def _init_factors(
        self,
        state: dict[str, Any],
        named: dict[str, Tensor],
        transposed: bool = False,
        groups: int = 1,
    ) -> None:
        """``K = I`` (``[I(+1), I(+1)]``), ``C = I`` (``[O, O]``), zero momenta; the layout
        of the layer's gradient (``weight_perm``: transposed Linear layers); with ``groups``
        > 1 (convolutions) one pair per group, stacked on a leading axis."""
        weight = named[state["params"][0]]
        group = self.group_of(weight)
        perm = TRANSPOSED if transposed else None
        oriented = weight.permute(perm) if perm is not None else weight
        dim_k = oriented[0].numel() + (len(state["params"]) - 1)
        dim_c = oriented.shape[0] // groups
        names = tuple(
            side_structure(n, d, group.get("max_block"))
            for n, d in zip(group["structures"], (dim_k, dim_c))
        )
        sk, sc = (structure(n) for n in names)
        dk, dc = (d or weight.dtype for d in group["preconditioner_dtype"])

        def eye(s: Structure, n: int, dtype: torch.dtype) -> Tensor:
            one = s.eye(n, dtype, weight.device)
            return one if groups == 1 else one.expand(groups, *one.shape).clone()

        state.update(
            structures=names,
            dims=(dim_k, dim_c),
            groups=groups,
            layout=perm,
            started=not group["warm_start"],
            K=eye(sk, dim_k, dk),
            C=eye(sc, dim_c, dc),
            m_K=eye(sk, dim_k, dk) * 0,
            m_C=eye(sc, dim_c, dc) * 0,
        )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As :meth:`CurvatureOptimizer.load_state_dict`, then the factors of one shape
        are stacked again (:meth:`_stack_factors`).

        Args:
            state_dict: what :meth:`state_dict` returned.
        """
        super().load_state_dict(state_dict)
        self._stack_factors()

    def _stack_factors(self) -> None:
        """Layers with dense or block-diagonal ``K`` and ``C`` (:func:`_plain_sides`) of the
        same sizes, structures, dtypes and layout keep their factors as views of one stacked
        tensor each (the factor updates write in place, so the views stay valid):
        :meth:`_precondition_all` applies them in one batched product."""
        batches: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
        for state in self.layers.values():
            if _plain_sides(state):
                key = (state["dims"], state["structures"], state["K"].dtype, state["C"].dtype)
                batches.setdefault((*key, state.get("layout")), []).append(state)
        for members in batches.values():
            if len(members) > 1:
                for key in ("K", "C"):
                    stacked = torch.stack([state[key] for state in members])
                    for state, view in zip(members, stacked.unbind(0)):
                        state[key] = view

    def _precondition_all(
        self, items: list[tuple[str, dict[str, Any], dict[str, Any], list[Tensor]]]
    ) -> list[list[Tensor]]:
        """Layers with dense or block-diagonal ``K`` and ``C``: ``C C^T G K K^T`` from sides
        prepared once per refresh (:meth:`_dense_sides`), several layers whose factors are
        views of one stack (and whose gradients have one shape) in one batched product; the
        others one by one with their structures' products."""
        out: list[list[Tensor] | None] = [None] * len(items)
        batches: dict[tuple[Any, ...], list[int]] = {}
        for i, (_, state, group, params) in enumerate(items):
            if not _plain_sides(state):
                continue
            K, C = state["K"], state["C"]
            shapes = tuple(p.shape for p in params)
            stacked = K._base is not None and C._base is not None
            key = (id(K._base), id(C._base), id(group), shapes) if stacked else (i,)
            batches.setdefault(key, []).append(i)
        for members in batches.values():
            for i, ds in zip(members, self._dense_products([items[i] for i in members])):
                out[i] = ds
        return [
            ds if ds is not None else self._preconditioned_gradients(s, g, ps)
            for ds, (_, s, g, ps) in zip(out, items)
        ]

    def _dense_products(
        self, items: list[tuple[str, dict[str, Any], dict[str, Any], list[Tensor]]]
    ) -> list[list[Tensor]]:
        """``C C^T G K K^T`` of one layer, or of several with factors of one shape
        (batched), with the sides of :meth:`_dense_sides`."""
        layouts = [(ORDER, s.get("layout"), 1) for _, s, _, _ in items]
        Gs = [
            to_factor_layout(ps[0].grad, ps[1].grad if len(ps) > 1 else None, *layout)
            for (_, _, _, ps), layout in zip(items, layouts)
        ]
        G = Gs[0] if len(Gs) == 1 else torch.cat(Gs)
        left, right = self._dense_sides([s for _, s, _, _ in items], items[0][2], G.dtype)
        D = self._solver()(G, left, right)
        out = []
        for (_, _, _, ps), layout, Di in zip(items, layouts, D):
            bias_shape = tuple(ps[1].shape) if len(ps) > 1 else None
            W, b = from_factor_layout(Di[None], tuple(ps[0].shape), bias_shape, *layout)
            out.append([W] if b is None else [W, b])
        return out

    def _dense_sides(
        self, states: list[dict[str, Any]], group: dict[str, Any], dtype: torch.dtype
    ) -> tuple[Side, Side]:
        """The two sides of ``C C^T G K K^T`` (stacked over the layers), in ``dtype``: per side
        the explicit ``C C^T`` (``K K^T``) when that is cheaper over the refresh period
        (:func:`~.products.explicit_is_cheaper`), else the factor itself (two products per
        step); kept until the factors change (:class:`~.products.ProductCache`)."""
        every = group["refresh_every"]
        dim_k, dim_c = states[0]["dims"]
        key = ("singd", *(",".join(s["params"]) for s in states))
        sources = [s[k] for s in states for k in ("K", "C")]

        def build() -> tuple[Side, Side]:
            K, C = (_from_stack([s[k] for s in states]).to(dtype) for k in ("K", "C"))
            # a block-diagonal side: b^2 per column and step vs n b^3 per refresh
            left = make_side(C, None, explicit_is_cheaper(C.shape[-1], dim_k, every), dtype)
            return left, make_side(K, None, explicit_is_cheaper(K.shape[-1], dim_c, every), dtype)

        return self._products.get(key, sources, (every, dtype), build)

    def _statistics_due(self) -> bool:
        return any(
            is_due(self.steps, g["refresh_every"]) for g in self.param_groups if g["precondition"]
        )

    def _update_preconditioner(
        self,
        state: dict[str, Any],
        group: dict[str, Any],
        stats: tuple[Tensor, Tensor] | None,
        params: list[Tensor],
    ) -> None:
        """The factor update from this step's statistics, when the group refreshes (on the
        layer's owner rank with ``ownership``)."""
        if stats is None or not self._refresh_due(group):
            return
        if self.ownership is None:
            self._refresh_factors(state, group, stats)
            return
        # a side's update costs d b^2 (b = d when dense): the owners' balance
        sides = zip(state["dims"], (state["K"], state["C"]))
        cost = sum(d * t.shape[-1] ** 2 for d, t in sides) * state.get("groups", 1)
        keys = ("K", "C", "m_K", "m_C")
        refresh = partial(self._refresh_factors, group=group, stats=stats)
        defer_state_refresh(self.ownership, ",".join(state["params"]), state, keys, refresh, cost)

    def _after_preconditioner_updates(self) -> None:
        if self.ownership is not None:
            self.ownership.flush()

    def _refresh_factors(
        self, state: dict[str, Any], group: dict[str, Any], stats: tuple[Tensor, Tensor]
    ) -> None:
        """Warm start (once, when asked) and one factor update, in ``state`` (group by group
        for a grouped convolution: :func:`_group_views`)."""
        sk, sc = (structure(n) for n in state["structures"])
        A, B = stats
        views = _group_views(state)
        if not state.get("started", True):
            for g, view in enumerate(views):
                self._warm_start(view, group, sk, sc, *_group_stats(state, A, B, g))
            state["started"] = True
        for g, view in enumerate(views):
            self._update_factors(view, group, sk, sc, *_group_stats(state, A, B, g))

    def _warm_start(
        self,
        state: dict[str, Any],
        group: dict[str, Any],
        sk: Structure,
        sc: Structure,
        A: Tensor,
        B: Tensor,
    ) -> None:
        """``K``, ``C`` from the diagonals of the first statistics (see the module docstring);
        only element-wise operations."""
        damping = self.damping(group)
        shift = damping if group["kfac_like"] else damping**0.5
        for key, s, S in (("K", sk, A), ("C", sc, B)):
            t = state[key]
            diag = torch.diagonal(S).to(torch.promote_types(t.dtype, torch.float32))
            start = s.project(torch.diag((diag.clamp(min=0) + shift).rsqrt()).to(t.dtype))
            t.copy_(start)
        state["started"] = True

    def _preconditioned_gradients(
        self, state: dict[str, Any], group: dict[str, Any], params: list[Tensor]
    ) -> list[Tensor]:
        """``C C^T G K K^T`` with ``G = [weight grad as [O, I], bias grad]``, split back."""
        weight, bias = params[0], (params[1] if len(params) > 1 else None)
        layout = (ORDER, state.get("layout"), state.get("groups", 1))
        Gs = to_factor_layout(weight.grad, None if bias is None else bias.grad, *layout)
        sk, sc = (structure(n) for n in state["structures"])
        D = torch.stack([self._product(v, sk, sc, G) for v, G in zip(_group_views(state), Gs)])
        bias_shape = None if bias is None else tuple(bias.shape)
        W, b = from_factor_layout(D, tuple(weight.shape), bias_shape, *layout)
        return [W] if b is None else [W, b]

    @staticmethod
    def _precondition_matrix(
        state: dict[str, Any], sk: Structure, sc: Structure, G: Tensor
    ) -> Tensor:
        """``C C^T G K K^T`` for ``G [O, n]``."""
        K, C = state["K"], state["C"]
        X = sk.matmul(K, G.T, transpose=True)  # K^T G^T
        X = sk.matmul(K, X).T  # G K K^T
        return sc.matmul(C, sc.matmul(C, X, transpose=True))

    def _update_factors(
        self,
        state: dict[str, Any],
        group: dict[str, Any],
        sk: Structure,
        sc: Structure,
        A: Tensor,
        B: Tensor,
    ) -> None:
        """One step of the factors ``K``, ``C`` and their momenta from ``A``, ``B`` (see the
        module docstring), written into the state's tensors in place; raises before changing
        the state when a result is not finite (the one host synchronization, on refresh steps
        only)."""
        (dim_k, dim_c), K, C = state["dims"], state["K"], state["C"]
        H_K = sk.inner(K, dim_k, A.to(K.dtype))
        H_C = sc.inner(C, dim_c, B.to(C.dtype))
        KtK, CtC = sk.inner(K, dim_k), sc.inner(C, dim_c)
        alpha1, damping = group["alpha1"], self.damping(group)
        scale = 0.5 * ((1 - alpha1) if group["normalize_lr_cov"] else 1.0)
        if group["kfac_like"]:
            c_C = c_K = 1.0
            damp_K, damp_C = trace_coupled([1.0, 1.0], damping)
        else:  # 0-d tensors: no host synchronization
            c_C, c_K = sc.trace(H_C, dim_c) / dim_c, sk.trace(H_K, dim_k) / dim_k
            d_C, d_K = sc.trace(CtC, dim_c) / dim_c, sk.trace(KtK, dim_k) / dim_k
            damp_K, damp_C = trace_coupled([d_K, d_C], damping)
        eye_k, eye_c = sk.eye(dim_k, K.dtype, K.device), sc.eye(dim_c, C.dtype, C.device)
        m_K = decayed_sum(state["m_K"], (H_K * c_C + KtK * damp_K - eye_k) * scale, alpha1)
        m_C = decayed_sum(state["m_C"], (H_C * c_K + CtC * damp_C - eye_c) * scale, alpha1)
        beta_K = beta_C = group["lr_cov"]
        if group["normalize_lr_cov"]:
            beta_K = beta_K / m_K.abs().max().clamp(min=1.0)
            beta_C = beta_C / m_C.abs().max().clamp(min=1.0)
        new_K = K - sk.mul(K, m_K, dim_k) * beta_K
        new_C = C - sc.mul(C, m_C, dim_c) * beta_C
        if not bool(finite_flags([new_K, new_C]).all()):
            raise FloatingPointError(
                "SINGD: the factor update produced non-finite values (lower lr_cov or raise "
                "damping)"
            )
        for key, value in (("K", new_K), ("C", new_C), ("m_K", m_K), ("m_C", m_C)):
            state[key].copy_(value)


FACTOR_KEYS = ("K", "C", "m_K", "m_C")


def side_structure(name: str, dim: int, max_block: int | None) -> str:
    """The structure of a ``dim``-wide factor asked to be ``name``: a ``dense`` one wider than
    ``max_block`` becomes block-diagonal with ``ceil(dim / max_block)`` blocks of equal size
    (the last one padded; e.g. 1001 with 256 -> ``block251diagonal``); others stay."""
    if name != "dense" or max_block is None or dim <= max_block:
        return name
    return f"block{block_shape(dim, max_block)[1]}diagonal"


def _plain_sides(state: dict[str, Any]) -> bool:
    """Whether a layer's ``K`` and ``C`` are dense or block-diagonal (one product per side
    and step through :func:`~.products.kronecker_solve`, batched with layers of one shape) and
    ungrouped; other structures apply their own products."""
    return state.get("groups", 1) == 1 and all(
        name == "dense" or isinstance(structure(name), BlockDiagonal)
        for name in state["structures"]
    )


def _group_views(state: dict[str, Any]) -> list[dict[str, Any]]:
    """``[state]`` for an ungrouped layer; for a convolution with ``G`` groups, ``G`` dicts
    whose factors and momenta are views of group ``g`` of the stacked storage (an in-place
    update of a view writes into the layer's state)."""
    groups = state.get("groups", 1)
    if groups == 1:
        return [state]
    return [
        {**state, **{key: state[key][g] for key in FACTOR_KEYS}, "groups": 1} for g in range(groups)
    ]


def _group_stats(state: dict[str, Any], A: Tensor, B: Tensor, g: int) -> tuple[Tensor, Tensor]:
    """Group ``g``'s statistics (``A``, ``B``: ``[G, d, d]`` with groups, else ``[d, d]``)."""
    return (A[g], B[g]) if state.get("groups", 1) > 1 else (A, B)


def _from_stack(views: list[Tensor]) -> Tensor:
    """``torch.stack(views)`` for views of one stacked tensor: the stack itself (no copy)
    when they are all of it in order, else the rows they view."""
    base = views[0]._base
    if len(views) == 1 and base is None:
        return views[0][None]
    size = views[0].numel()
    index = [v.storage_offset() // size for v in views]
    if base is not None and index == list(range(base.shape[0])):
        return base
    return torch.stack(views)


__all__ = ["SINGD"]
