"""KFAC: natural gradient with exponential moving averages of Kronecker factors.

Per layer with a Kronecker rule (Linear, Conv1/2/3d, ConvTranspose1/2/3d, Embedding; joint
bias), the engine's factors ``B kron A`` (:class:`~beyondgrad.KFAC`: type-2, MC or empirical,
expand or reduce) approximate the curvature of the loss as ``loss_fn`` reduces it. The
optimizer keeps ``A <- ema A + (1 - ema) A_batch`` (same for ``B``; the first batch
initializes; with statistics every ``stats_every`` steps the decay per update is
``ema ** stats_every``, so that ``ema`` is the decay per step whatever the interval),
refreshes the eigendecompositions every ``refresh_every`` steps (a param-group setting; in
float32 at least) and preconditions the gradient ``G`` (``[O, I(+1)]``) with

- ``damping_mode="eigen"`` (exact): ``(B kron A + damping I)^{-1} vec(G)``
  ``= Q_B [(Q_B^T G Q_A) / (l_B l_A^T + damping)] Q_A^T``;
- ``damping_mode="pi"`` (factored Tikhonov, Martens & Grosse 2015):
  ``(B + sqrt(damping)/pi I)^{-1} G (A + pi sqrt(damping) I)^{-1}`` with
  ``pi = sqrt((tr A / dim A) / (tr B / dim B))``.

Per step the solve costs a few matrix products, prepared once per refresh
(:mod:`~beyondgrad.optim.products`): with eigenvalue damping four (rotate into the eigenbases,
scale, rotate back); with pi damping, whose inverse is a product of one inverse per side, each
side is applied as one product with its explicit inverse, computed at the refresh by a Cholesky
factorization (no eigendecomposition: a fifth of its time, e.g. 33 vs 161 ms for a 1001 x 1001
factor with its explicit inverse, one CPU thread) -- half the products of the eigenbasis route.
Where the factorization fails the side is eigendecomposed, and applied as ``Q diag(1/l) Q^T``
explicitly when ``d < refresh_every * (other side's size)``, else as two products with ``Q``.
``max_block=b`` preconditions every factor side wider than ``b`` block-diagonally: its diagonal
blocks of at most ``b`` rows (:func:`~.products.diagonal_blocks`; e.g. 513 -> three of 171),
each inverted (or eigendecomposed) on its own; the coupling between blocks is dropped. A
``d``-wide side then costs ``d b`` instead of ``d^2`` per gradient column at every step and
``d b^2`` instead of ``d^3`` at a refresh (pi damping's ``pi`` still comes from the whole
factor's trace). Wide layers of transformers and autoencoders (a 512- or 1000-wide side next to
a 128-wide one) spend most of the solve there.
``preconditioner_dtype=torch.bfloat16`` keeps and applies the prepared preconditioner in
bfloat16 (opt-in approximation).

Cost per step, amortized over ``stats_every`` and ``refresh_every``: a step is the forward
and backward pass plus the solve (four products per layer; on the suite's char-GPT about 0.15
of an AdamW step with the rest of the update, half of that with ``damping_mode="pi"``). A
statistics step adds the engine's backward of the curvature vectors and the Kronecker sums
(there about 1.1 AdamW steps of work, half each; a conv net's unfolded inputs make it ~4;
``fisher_type="empirical"`` skips the backward, ``statistics_dtype=torch.bfloat16`` cuts the
sums about 4x on hardware with bf16 units), a
refresh the eigendecompositions (1-1.5 AdamW steps): per step roughly ``1.15 + 1.1 /
stats_every + 1.5 / refresh_every`` AdamW steps. Measured on char-GPT (CPU time, one thread,
interleaved in one process, machine shared; ``benchmarks/optim.py`` and
``benchmarks/optim_profile.py`` time it): 2.4 at the defaults (``stats_every=1,
refresh_every=10``), 1.96 at 2/10, 1.22-1.31 at 20/20, 1.13 at 20/40, 1.04 at 20/20 with
``damping_mode="pi"``. Sparse statistics cost little
quality when the average keeps its per-step decay: on the deep autoencoder (200 steps, one
seed) ``stats_every=10`` reached a validation error of 0.0035 against 0.0034 at
``stats_every=1``, where a decay of 0.95 per update (an average over 200 steps of older data)
ended at 0.0043. The defaults (``stats_every=1``, ``refresh_every=10``) keep the per-step
statistics; models whose statistics pass costs more than the solve want 10-20.
A due refresh without new statistics since the last one keeps the eigendecomposition (the
factors did not change).

Then optional grafting (:mod:`~beyondgrad.optim.grafting`), ``kl_clip`` scales all
preconditioned directions by ``min(1, sqrt(kl_clip / |sum lr^2 d . g|))`` and
``max_update_norm`` caps ``lr * ||d||`` (:mod:`~beyondgrad.optim.clipping`); momentum and
decoupled weight decay follow (``p <- p (1 - lr wd) - lr buf``). Parameters without a
Kronecker rule, and tied weights, go to the AdamW fallback (``routing()``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from ..linalg.eigenbasis import kronecker_eigenvalues, symmetric_eigh
from ._engine import from_factor_layout, to_factor_layout
from .averages import ema_
from .damping import check_damping
from .kronecker import KroneckerOptimizer, check_dtype
from .ownership import defer_eigen_refresh, make_ownership
from .products import Side, diagonal_blocks, explicit_is_cheaper, make_side, side_size
from .routing import MAX_FACTOR_DIM, factor_width_refusal
from .schedule import check_every, is_due

EXPLICIT_INVERSE = -1.0
"""The stored "eigenvalues" of a pi-damped side kept as its explicit inverse (see
:meth:`KFAC._decompose_stacked`); never an eigenvalue of a damped factor."""

KFAC_RULES = ("linear", "transposed_linear", "conv", "conv_transpose", "embedding")


class KFAC(KroneckerOptimizer):
    """``KFAC(model, loss_fn, params=None, lr=0.1, ...)``; see the module docstring.

    Args:
        model: the network.
        loss_fn: the loss module (called inside ``capture()``).
        params: parameters or param groups (default: all trainable parameters of ``model``).
        lr: learning rate (per group).
        momentum: heavy-ball momentum (per group).
        weight_decay: decoupled weight decay (per group).
        damping: added to the curvature, positive (per group; 1e-2 by default: 1e-3 let the
            first steps of the digits MLP and of small-batch transformers diverge).
        fisher_type: ``"mc"``, ``"type-2"`` or ``"empirical"`` statistics (the empirical
            Fisher's come from the ordinary ``loss.backward()``: no backward pass of their
            own; on char-GPT a statistics step's extra time 115 -> 80 ms, CPU).
        mc_samples: Monte-Carlo samples per data point (``"mc"``).
        kfac_approx: ``"expand"`` or ``"reduce"``.
        ema: decay per step of the moving averages of the factors, in ``[0, 1)`` (per
            statistics update: ``ema ** stats_every``).
        stats_every: collect statistics every this many steps (each costs one extra backward
            of the curvature vectors and the Kronecker sums); global. See "Cost per step"
            in the module docstring.
        refresh_every: recompute the eigendecompositions every this many steps (per
            group); best a multiple of ``stats_every``.
        damping_mode: ``"eigen"`` (exact) or ``"pi"`` (factored Tikhonov).
        kl_clip: KL trust-region bound, or None.
        max_update_norm: bound on ``lr * ||d||`` over all preconditioned directions, or None.
        seed: seeds the Monte-Carlo draws (reproducible across resumes).
        grafting: None, ``"sgd"`` or ``"adam"`` (per group; see
            :mod:`~beyondgrad.optim.grafting`).
        ownership: ``None`` (every rank refreshes every layer), ``"owner"`` or an
            :class:`~beyondgrad.optim.Ownership`: under ``torch.distributed`` each layer's
            eigendecompositions run on one owner rank (cost-balanced) and are broadcast
            (see :mod:`~beyondgrad.optim.ownership`).
        warmup: learning-rate warm-up steps, with a raised damping (per group; 0: none;
            see :mod:`~beyondgrad.optim.schedule`).
        compile_update: ``torch.compile`` the damped solve (True, or a backend name);
            off by default.
        preconditioner_dtype: the dtype in which the prepared preconditioner is kept and
            applied at every step (e.g. ``torch.bfloat16``: faster products where the hardware
            has them, an approximation of about 3 significant digits); default ``None``: the
            eigendecomposition's (float32 at least). The factors and their eigenpairs stay in
            float32 at least.
        max_block: precondition factor sides wider than this block-diagonally, with blocks of
            at most ``max_block`` (see the module docstring); None (default): whole factors.
        max_factor_dim: a layer with a factor side wider than this (default 8192) goes to the
            AdamW fallback, with the reason in ``routing()``: an untied language-model head over
            a 32,000-token vocabulary would need a 4 GB factor and its eigendecomposition; None:
            no limit.
        statistics_dtype: form the Kronecker statistics in this dtype (e.g.
            ``torch.bfloat16``: on char-GPT's statistics step the products are about 4x
            faster on a CPU with bf16 units, the factors' entries rounded to about 3
            significant digits before the moving average); default ``None``: exact.
        statistics_from_backward: with ``fisher_type="empirical"``, the statistics come from the
            ordinary ``loss.backward()`` (no pass of their own; everything backpropagated
            counts, e.g. an auxiliary loss added to ``loss``); ``False``: from ``loss_fn``'s
            output alone, by a backward pass of their own.
        **adamw: the fallback's ``adam_lr``, ``adam_betas``, ``adam_eps`` and ``precondition``
            (per group).
    """

    method = "kfac"
    rules = KFAC_RULES

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        params: Iterable[Any] | None = None,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        damping: float = 1e-2,
        fisher_type: str = "mc",
        mc_samples: int = 1,
        kfac_approx: str = "expand",
        ema: float = 0.95,
        stats_every: int = 1,
        refresh_every: int = 10,
        damping_mode: str = "eigen",
        kl_clip: float | None = 1e-3,
        max_update_norm: float | None = None,
        seed: int = 0,
        grafting: str | None = None,
        ownership: Any = None,
        warmup: int = 0,
        compile_update: bool | str = False,
        preconditioner_dtype: torch.dtype | None = None,
        max_block: int | None = None,
        max_factor_dim: int | None = MAX_FACTOR_DIM,
        statistics_dtype: torch.dtype | None = None,
        statistics_from_backward: bool = True,
        **adamw: Any,
    ):
        if max_factor_dim is not None:
            check_every("max_factor_dim", max_factor_dim)
        if max_block is not None:
            check_every("max_block", max_block)
        self.max_block = max_block
        self.max_factor_dim = max_factor_dim
        self.preconditioner_dtype = check_dtype("preconditioner_dtype", preconditioner_dtype)
        if damping_mode not in ("eigen", "pi"):
            raise ValueError(f"damping_mode must be 'eigen' or 'pi', got {damping_mode!r}")
        if not 0 <= ema < 1:
            raise ValueError(f"ema must be in [0, 1), got {ema}")
        check_every("stats_every", stats_every)
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}
        defaults |= {"damping": damping, "refresh_every": refresh_every, "grafting": grafting}
        defaults |= {"warmup": warmup}
        self.ema, self.stats_every, self.damping_mode = ema, stats_every, damping_mode
        engine = (fisher_type, kfac_approx, mc_samples, seed)
        engine += (statistics_dtype, statistics_from_backward)
        super().__init__(model, loss_fn, params, defaults | adamw, *engine)
        self._set_clipping(kl_clip, max_update_norm)
        self._stale: dict[int, tuple[dict[str, Any], float, int]] = {}
        self._eig_stamps: dict[int, tuple[Any, ...]] = {}  # id(state) -> _factor_stamp
        self.ownership = make_ownership(ownership)
        self._set_compile(compile_update)

    def _accept(self, module: nn.Module) -> str | None:  # type: ignore[override]
        """Refuse layers whose factors would be wider than ``max_factor_dim``."""
        return factor_width_refusal(module, self.max_factor_dim)

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        check_damping(group["damping"], positive=True, owner="KFAC")

    def _statistics_due(self) -> bool:
        return is_due(self.steps, self.stats_every)

    def _update_preconditioner(
        self,
        state: dict[str, Any],
        group: dict[str, Any],
        stats: tuple[Tensor, Tensor] | None,
        params: list[Tensor],
    ) -> None:
        """Moving averages of the factors (in place); marks the layer for the batched
        eigendecomposition of :meth:`_finish_refresh` when due (or missing)."""
        if stats is not None:
            decay = self.ema**self.stats_every  # ema is per step (module docstring)
            state["A"] = ema_(state.get("A"), stats[0], decay)
            state["B"] = ema_(state.get("B"), stats[1], decay)
        if "A" in state and (self._refresh_due(group) or "eig" not in state):
            stamp = self._factor_stamp(state, group)
            if "eig" in state and self._eig_stamps.get(id(state)) == stamp:
                return  # nothing changed since the last eigendecomposition: keep it
            self._eig_stamps[id(state)] = stamp
            if self.ownership is None:
                self._stale[id(state)] = (state, self.damping(group), id(group))
            else:  # on one owner rank, at the end of the updates (see .ownership)
                defer_eigen_refresh(
                    self.ownership, state, self._decompose, self.damping(group), self.max_block
                )

    def _factor_stamp(self, state: dict[str, Any], group: dict[str, Any]) -> tuple[Any, ...]:
        """What a layer's eigendecomposition depends on: its factor tensors (identity and
        in-place version, which the moving average bumps) and, for pi damping, the damping."""
        A, B = state["A"], state["B"]
        damping = self.damping(group) if self.damping_mode == "pi" else None
        return (id(A), _version(A), id(B), _version(B), damping)

    def _after_preconditioner_updates(self) -> None:
        if self.ownership is not None:
            self.ownership.flush()

    def _finish_refresh(self) -> None:
        """Eigendecompose the factors of every layer marked this step: layers whose factors
        have the same shapes, order, dtype, group and damping share one batched ``eigh`` per
        side; their eigenpairs are kept stacked (each layer holds views) so that
        :meth:`_precondition_all` solves them in one batched product."""
        batches: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
        for state, damping, index in self._stale.values():
            key = (state["A"].shape, state["B"].shape, state["A"].dtype, state["order"])
            batches.setdefault((*key, damping, index), []).append(state)
        self._stale = {}
        try:
            self._decompose_batches(batches)
        except Exception:  # a failed decomposition is retried at the next refresh
            for members in batches.values():
                for state in members:
                    self._eig_stamps.pop(id(state), None)
            raise

    def _decompose_batches(self, batches: dict[tuple[Any, ...], list[dict[str, Any]]]) -> None:
        """One batched eigendecomposition per key of ``batches`` (see :meth:`_finish_refresh`);
        each member state gets views of the stacked eigenpairs."""
        for key, members in batches.items():
            sizes = [self._groups(state) for state in members]
            A = torch.cat([_grouped(state["A"]) for state in members])
            B = torch.cat([_grouped(state["B"]) for state in members])
            eig = self._decompose_stacked(A, B, key[3], key[4])
            parts = [t.split(sizes) for t in eig]
            for i, state in enumerate(members):
                state["eig"] = tuple(part[i] for part in parts)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As :meth:`CurvatureOptimizer.load_state_dict`; the next due refresh decomposes the
        loaded factors whatever was decomposed before.

        Args:
            state_dict: what :meth:`state_dict` returned.
        """
        super().load_state_dict(state_dict)
        self._eig_stamps = {}

    def _precondition_all(
        self, items: list[tuple[str, dict[str, Any], dict[str, Any], list[Tensor]]]
    ) -> list[list[Tensor]]:
        """Layers whose eigenpairs are views of one stack (refreshed together) and whose
        gradient layouts agree are solved in one batched product; the others one by one."""
        batches: dict[tuple[Any, ...], list[int]] = {}
        for i, (_, state, group, params) in enumerate(items):
            self._check_statistics(state)
            base = state["eig"][1]._base
            layout = (state["order"], state["weight_perm"], tuple(p.shape for p in params))
            key = (id(base), id(group), layout) if base is not None else (i,)
            batches.setdefault(key, []).append(i)
        out: list[list[Tensor]] = [[] for _ in items]
        for members in batches.values():
            for i, ds in zip(members, self._solve_layers([items[i] for i in members])):
                out[i] = ds
        return out

    def _solve_layers(
        self, items: list[tuple[str, dict[str, Any], dict[str, Any], list[Tensor]]]
    ) -> list[list[Tensor]]:
        """The damped solve of one layer, or of several of one shape in one batched product
        (their operator, :meth:`_operator`, is prepared once per refresh)."""
        group = items[0][2]
        layouts = [(s["order"], s["weight_perm"], self._groups(s)) for _, s, _, _ in items]
        Ms = [
            to_factor_layout(ps[0].grad, ps[1].grad if len(ps) > 1 else None, *layout)
            for (_, _, _, ps), layout in zip(items, layouts)
        ]
        M = Ms[0] if len(Ms) == 1 else torch.cat(Ms)
        states = [s for _, s, _, _ in items]
        D = self._solve_stacked(M, states, group).split([m.shape[0] for m in Ms])
        out = []
        for (_, _, _, ps), layout, Di in zip(items, layouts, D):
            bias_shape = tuple(ps[1].shape) if len(ps) > 1 else None
            W, b = from_factor_layout(Di, tuple(ps[0].shape), bias_shape, *layout)
            out.append([W] if b is None else [W, b])
        return out

    def _solve_stacked(
        self, M: Tensor, states: list[dict[str, Any]], group: dict[str, Any]
    ) -> Tensor:
        """The directions of the layers ``states`` from their stacked gradients ``M``
        (``[L, r, c]`` in the layout of their factors): the damped solve."""
        left, right, values = self._operator(states, group)
        return self._solver()(M, left, right, values)

    def _operator(
        self, states: list[dict[str, Any]], group: dict[str, Any]
    ) -> tuple[Side, Side, Tensor | None]:
        """The layers' preconditioner as two sides (and joint values for eigenvalue damping),
        stacked over the layers; rebuilt only when their eigenpairs, the damping, the
        refresh period or the dtype change (:class:`~.products.ProductCache`).

        ``damping_mode="eigen"``: both sides the eigenbases, ``values = 1 / (l_L l_R^T +
        damping)``. ``"pi"``: per side the explicit inverse ``Q diag(1/l) Q^T`` of the
        pi-damped factor where that is cheaper over the refresh period
        (:func:`~.products.explicit_is_cheaper`), else ``(Q, 1/l)``."""
        eigs = [s["eig"] for s in states]
        delta = self.damping(group) if self.damping_mode == "eigen" else 0.0
        every = group["refresh_every"]
        dtype = self.preconditioner_dtype or eigs[0][1].dtype
        key = tuple(",".join(s["params"]) for s in states)
        sources = [t for e in eigs for t in e]

        def build() -> tuple[Side, Side, Tensor | None]:
            stacked = [torch.cat(parts) for parts in zip(*eigs)] if len(eigs) > 1 else eigs[0]
            l_left, q_left, l_right, q_right = stacked
            if self.damping_mode == "eigen":
                joint = kronecker_eigenvalues(_flat(l_left, q_left), _flat(l_right, q_right))
                values = 1.0 / (joint + delta)
                left = make_side(q_left, None, False, dtype)
                right = make_side(q_right, None, False, dtype)
                return left, right, values.to(dtype)
            r, c = side_size(q_left, 3), side_size(q_right, 3)
            left = _pi_side(l_left, q_left, c, every, dtype)
            return left, _pi_side(l_right, q_right, r, every, dtype), None

        return self._products.get(key, sources, (delta, every, dtype), build)

    @staticmethod
    def _check_statistics(state: dict[str, Any]) -> None:
        if "A" not in state:
            raise RuntimeError(
                f"KFAC has no curvature statistics for {', '.join(state['params'])} yet: wrap "
                "the forward pass of the first step in `with optimizer.capture():`"
            )

    def _preconditioned_gradients(
        self, state: dict[str, Any], group: dict[str, Any], params: list[Tensor]
    ) -> list[Tensor]:
        """``(B kron A + damping I)^{-1} vec(G)`` (or the pi-damped factors' inverse)."""
        self._check_statistics(state)
        return self._solve_layers([("", state, group, params)])[0]

    @staticmethod
    def _groups(state: dict[str, Any]) -> int:
        return state["A"].shape[0] if state["A"].ndim == 3 else 1

    def _decompose(self, state: dict[str, Any], damping: float) -> tuple[Tensor, ...]:
        """Eigenpairs of one layer's (pi-damped) factors, ``[G, d]`` and ``[G, d, d]``, in
        the order (left, right) of the gradient matrix."""
        A, B = _grouped(state["A"]), _grouped(state["B"])
        return self._decompose_stacked(A, B, state["order"], damping)

    def _decompose_stacked(
        self, A: Tensor, B: Tensor, order: str, damping: float
    ) -> tuple[Tensor, ...]:
        """Eigenpairs of the (pi-damped) factors ``A [L, a, a]``, ``B [L, b, b]`` (batched),
        ``[L, d]`` and ``[L, d, d]``, in the order (left, right) of the gradient matrix; a side
        wider than ``max_block``: of its diagonal blocks, ``[L, n, b]`` and ``[L, n, b, b]``.

        With pi damping only the damped inverses are needed: they come from a Cholesky
        factorization (:func:`_damped_inverse`, values :data:`EXPLICIT_INVERSE`), and the
        eigendecomposition only where that fails."""
        work = torch.promote_types(A.dtype, torch.float32)
        A, B = A.to(work), B.to(work)
        if self.damping_mode == "pi":
            dim_a, dim_b = A.shape[-1], B.shape[-1]
            tr_a = torch.diagonal(A, dim1=1, dim2=2).sum(-1) / dim_a
            tr_b = torch.diagonal(B, dim1=1, dim2=2).sum(-1) / dim_b
            pi = (tr_a / tr_b).clamp(min=1e-12).sqrt().nan_to_num(1.0)
            root = damping**0.5
            eye_a = torch.eye(dim_a, dtype=work, device=A.device)
            eye_b = torch.eye(dim_b, dtype=work, device=B.device)
            A = self._blocks(A + (pi * root)[:, None, None] * eye_a)
            B = self._blocks(B + (root / pi)[:, None, None] * eye_b)
            inverse = (_damped_inverse(A), _damped_inverse(B))
            if inverse[0] is not None and inverse[1] is not None:
                (la, qa), (lb, qb) = inverse
                return (la, qa, lb, qb) if order == "A kron B" else (lb, qb, la, qa)
        la, qa = symmetric_eigh(self._blocks(A))
        lb, qb = symmetric_eigh(self._blocks(B))
        la, lb = la.clamp(min=0), lb.clamp(min=0)
        if order == "A kron B":
            return (la, qa, lb, qb)
        return (lb, qb, la, qa)

    def _blocks(self, factor: Tensor) -> Tensor:
        """``factor`` ``[L, d, d]``, or its diagonal blocks ``[L, n, b, b]`` where ``d`` exceeds
        ``max_block`` (an already blocked factor is returned as is)."""
        if factor.ndim == 4 or self.max_block is None or factor.shape[-1] <= self.max_block:
            return factor
        return diagonal_blocks(factor, self.max_block)


def _flat(values: Tensor, matrix: Tensor) -> Tensor:
    """A side's eigenvalues over its (padded) coordinates: ``[L, n b]`` of a block-diagonal
    side's ``[L, n, b]``."""
    return values.flatten(-2) if matrix.ndim == 4 else values


def _damped_inverse(M: Tensor) -> tuple[Tensor, Tensor] | None:
    """``(-1 [..., d], M^{-1} [..., d, d])`` for positive definite ``M`` ``[..., d, d]`` by Cholesky
    (about a fifth of an eigendecomposition's time, and no ``Q diag(1/l) Q^T`` to form
    afterwards), or None where the factorization fails (the caller then eigendecomposes).
    The values ``-1`` (:data:`EXPLICIT_INVERSE`; a damped factor's eigenvalues are positive)
    mark the matrix as the inverse itself (:func:`_pi_side`)."""
    if not bool(torch.isfinite(M).all()):
        return None
    chol, info = torch.linalg.cholesky_ex((M + M.mT) / 2)
    if bool((info != 0).any()):
        return None
    marker = torch.full(M.shape[:-1], EXPLICIT_INVERSE, dtype=M.dtype, device=M.device)
    return marker, torch.cholesky_inverse(chol)


def _pi_side(values: Tensor, matrix: Tensor, other: int, every: int, dtype: torch.dtype) -> Side:
    """One side of the pi-damped solve from its stored pair: the explicit inverse as is
    (:func:`_damped_inverse`), or eigenpairs ``(l, Q)`` as ``Q diag(1/l) Q^T``, explicit when
    that is cheaper over the refresh period (:func:`~.products.explicit_is_cheaper`)."""
    if bool((values[..., :1] == EXPLICIT_INVERSE).all()):
        return matrix.to(dtype), None, False
    explicit = explicit_is_cheaper(matrix.shape[-1], other, every)
    return make_side(matrix, 1.0 / values, explicit, dtype)


def _version(t: Tensor) -> object:
    """``t``'s in-place version counter; an inference tensor has none: a fresh object, equal
    to nothing (its layer is then decomposed at every due refresh)."""
    try:
        return t._version
    except RuntimeError:
        return object()


def _grouped(t: Tensor) -> Tensor:
    """A factor as ``[G, d, d]`` (a leading group axis of 1 added when it has none)."""
    return t if t.ndim == 3 else t[None]


__all__ = ["KFAC"]
