"""SIRFShampoo: structured inverse-free root-free Shampoo (Lin, Dangel et al., ICML 2024:
"Can we remove the square-root in adaptive gradient methods?").

Gradients only, so every parameter of any shape is preconditioned (no hooks on layers; the
batch size is counted by a forward pre-hook on the model that exists only inside
``capture()``). A parameter of shape ``(d_1, ..., d_N)`` has one structured factor
``K_n`` (``[d_n, d_n]``) per dimension; the preconditioner is ``kron_n K_n K_n^T``, an
estimate of the inverse (not inverse root) of the gradients' second moment. With
``Ghat = sqrt(batch) G x_1 K_1^T ... x_N K_N^T`` (mode products; ``sqrt(batch)`` turns the
mean-loss gradient into per-sample scale) and ``Ghat_(n)`` its mode-``n`` unfolding, every
``refresh_every`` steps (a param-group setting; ``T`` is its deprecated spelling)::

    m_n <- alpha2 m_n + (1 - alpha2) / 2 [damping prod_{j!=n} (tr(K_j^T K_j)/d_j) P(K_n^T K_n)
                                          + P(Ghat_(n) Ghat_(n)^T) / prod_{j!=n} d_j - I]
    K_n <- K_n (I - lr_cov m_n / max(1, ||m_n||_F))

(``P``: projection onto the structure). Every step:
``direction = G x_1 K_1 K_1^T ... x_N K_N K_N^T``, then optional grafting and clipping,
momentum (``momentum``) and decoupled weight decay. 0-d parameters go to the AdamW
fallback; dimensions longer than ``max_dense`` get a diagonal factor whatever the structure
(a dense factor over a 50k vocabulary would not fit). Factors may be bfloat16
(``preconditioner_dtype``): only matrix products are used.

Defaults that train without tuning (the paper's plain rule: ``grafting=None, warmup=0,
refresh_every=1``):

- ``grafting="adam"``: each direction takes the norm of Adam's step, so ``lr`` is an
  Adam-like learning rate whatever the scale of the gradients;
- ``refresh_every=5``: the factor updates are amortized over 5 steps;
- ``warmup=5`` steps of learning-rate warm-up with a damping that falls from 10x to 1x
  (:mod:`~beyondgrad.optim.schedule`);
- ``warm_start=False``: with ``True``, at the first factor update ``K_n`` starts from the
  structure's projection of ``diag(u_n + 1e-8)^{-1/2} (s + damping)^{-1/(2N)}`` (``s``: the
  mean square of ``Ghat``, ``u_n``: its mean squares along dimension ``n`` over ``s``)
  instead of ``I``; on the test problems it was slower than the identity start, which the
  grafting already puts at the right step length.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from .averages import decayed_sum
from .base import CurvatureOptimizer
from .damping import check_damping, trace_coupled
from .ownership import defer_state_refresh, make_ownership
from .products import explicit_is_cheaper
from .schedule import deprecated_alias
from .statistics import BatchCounter, finite_flags
from .structures import Structure, structure


def _mode_product(s: Structure, t: Tensor, X: Tensor, n: int, transpose: bool) -> Tensor:
    """``K_n`` (or ``K_n^T``) multiplied along axis ``n`` of ``X``."""
    moved = X.movedim(n, 0)
    out = s.matmul(t, moved.reshape(moved.shape[0], -1), transpose=transpose)
    return out.reshape(moved.shape).movedim(0, n)


def _precondition(
    G: Tensor,
    Ks: tuple[Tensor, ...],
    structs: tuple[Structure, ...],
    explicit: tuple[bool, ...] | None = None,
) -> Tensor:
    """``G x_1 K_1 K_1^T ... x_N K_N K_N^T``; where ``explicit[n]``, ``Ks[n]`` is the product
    ``K_n K_n^T`` itself (one mode product instead of two)."""
    D = G
    for n, (s, K) in enumerate(zip(structs, Ks)):
        if explicit is not None and explicit[n]:
            D = _mode_product(s, K, D, n, transpose=False)
        else:
            D = _mode_product(s, K, _mode_product(s, K, D, n, transpose=True), n, False)
    return D


class SIRFShampoo(CurvatureOptimizer):
    """``SIRFShampoo(model, params=None, lr=1e-3, ...)``; see the module docstring.

    Args:
        model: the network (its forward calls inside ``capture()`` count the batch).
        params: parameters or param groups (default: all trainable parameters of ``model``).
        lr, momentum, weight_decay: the parameter update (per group; decoupled decay).
        damping: non-negative (per group).
        alpha2: Riemannian momentum of the factor updates, in ``[0, 1)`` (per group).
        lr_cov: learning rate of the factor updates, in ``(0, 2)`` (per group; the step is
            normalized by ``max(1, ||m||_F)``, so from 2 on it cannot shrink a factor).
        structures: one name for all factors, or a dict ``{order: name or tuple of names}``
            (per group).
        preconditioner_dtype: the factors' dtype (default: the parameter's; per group).
        max_dense: dimensions longer than this get a diagonal factor (per group).
        refresh_every: factor updates every this many steps (per group).
        warm_start: start the factors from the first gradient's mean squares (per group).
        warmup: learning-rate warm-up steps (per group; 0: none).
        compile_update: ``torch.compile`` the preconditioning product (True, or a backend
            name); off by default.
        kl_clip, max_update_norm: clipping (global, off by default; see
            :mod:`~beyondgrad.optim.clipping`).
        grafting: None, ``"sgd"`` or ``"adam"`` (per group; default ``"adam"``).
        T: deprecated spelling of ``refresh_every`` (also as a param-group key).
        ownership: ``None`` (every rank updates every factor), ``"owner"`` or an
            :class:`~beyondgrad.optim.Ownership`: under ``torch.distributed`` each parameter's
            factor update runs on one owner rank (cost-balanced) and its factors and momenta
            are broadcast (see :mod:`~beyondgrad.optim.ownership`).
        **adamw: the fallback's ``adam_lr``, ``adam_betas``, ``adam_eps`` and ``precondition``.

    The batch size (leading axis of the first tensor argument of the model's forward calls
    with gradients enabled) is counted only inside ``capture()``: a factor update without a
    counted batch raises. No hook stays on the model.
    """

    method = "sirfshampoo"

    def __init__(
        self,
        model: nn.Module,
        params: Iterable[Any] | None = None,
        lr: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        damping: float = 1e-3,
        alpha2: float = 0.5,
        lr_cov: float = 1e-2,
        structures: str | dict[int, Any] = "dense",
        preconditioner_dtype: torch.dtype | None = None,
        max_dense: int = 2048,
        refresh_every: int = 5,
        kl_clip: float | None = None,
        max_update_norm: float | None = None,
        grafting: str | None = "adam",
        warm_start: bool = False,
        warmup: int = 5,
        compile_update: bool | str = False,
        *,
        T: int | None = None,
        ownership: Any = None,
        **adamw: Any,
    ):
        refresh_every = deprecated_alias("SIRFShampoo", "refresh_every", refresh_every, 5, "T", T)
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}
        defaults |= {
            "damping": damping,
            "alpha2": alpha2,
            "lr_cov": lr_cov,
            "structures": structures,
            "preconditioner_dtype": preconditioner_dtype,
            "max_dense": max_dense,
            "refresh_every": refresh_every,
            "grafting": grafting,
            "warm_start": warm_start,
            "warmup": warmup,
            **adamw,
        }
        super().__init__(model, params, defaults, None, 0)
        self._set_clipping(kl_clip, max_update_norm)
        self._set_compile(compile_update)
        self._product = self.compiled(_precondition)
        self._batch = BatchCounter()
        self._batch_size = 0
        self.ownership = make_ownership(ownership)
        self._take_parameters()

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        if not 0 <= group["alpha2"] < 1:
            raise ValueError(f"alpha2 must be in [0, 1), got {group['alpha2']}")
        check_damping(group["damping"], positive=False, owner="SIRFShampoo")
        if not 0 < group["lr_cov"] < 2:
            # the step K (I - lr_cov m / ||m||_F) scales a factor's dominant direction (m rank-1
            # in it once damping K^T K dominates) by |1 - lr_cov|: no shrinking from 2 on, and
            # the factors grow without bound (kron-lsq at 2.0: max |K| 1e3 -> 5e15 in 16k steps)
            raise ValueError(
                f"lr_cov must be in (0, 2) (the normalized factor step cannot shrink a factor "
                f"at 2 or above), got {group['lr_cov']}"
            )

    def _take_parameters(self) -> None:
        """One factor per dimension for every parameter of a group with ``precondition=True``
        (0-d tensors go to the fallback)."""
        taken = {}
        for group in self.param_groups:
            if not group["precondition"]:
                continue
            for p in group["params"]:
                if p.ndim == 0:
                    continue
                names = self._structures(group, p)
                name = self.names[id(p)]
                dtype = group["preconditioner_dtype"] or p.dtype
                self.layers[name] = {
                    "params": (name,),
                    "structures": names,
                    "K": [structure(s).eye(d, dtype, p.device) for s, d in zip(names, p.shape)],
                    "m": [structure(s).eye(d, dtype, p.device) * 0 for s, d in zip(names, p.shape)],
                    "started": not group["warm_start"],
                }
                taken[name] = "factors " + " x ".join(f"{s}[{d}]" for s, d in zip(names, p.shape))
        self._refused = {
            self.names[id(p)]: "0-d tensor (no dimension to precondition)"
            for g in self.param_groups
            for p in g["params"]
            if p.ndim == 0
        }
        self._route(taken)

    @staticmethod
    def _structures(group: dict[str, Any], p: Tensor) -> tuple[str, ...]:
        spec = group["structures"]
        if isinstance(spec, dict):
            if p.ndim not in spec:
                raise ValueError(
                    f"structures has no entry for tensors of order {p.ndim} (keys: {sorted(spec)})"
                )
            spec = spec[p.ndim]
        names = (spec,) * p.ndim if isinstance(spec, str) else tuple(spec)
        if len(names) != p.ndim:
            raise ValueError(f"need {p.ndim} structures for a tensor of shape {tuple(p.shape)}")
        for s in names:
            structure(s)
        return tuple("diagonal" if d > group["max_dense"] else s for s, d in zip(names, p.shape))

    @contextmanager
    def _record(self) -> Iterator[None]:
        with self._batch.counting(self.model):
            yield

    def _collect_statistics(self) -> dict[str, Any]:
        """The batch size since the last step (over ranks); checked on refresh steps."""
        self._batch_size = self._batch.take()
        refreshing = any(
            self._refresh_due(self.group_of(p))
            for p in (dict(self.model.named_parameters())[n] for n in self.layers)
            if p.grad is not None
        )
        if refreshing and self._batch_size == 0:
            raise RuntimeError(
                "SIRFShampoo: no batch was counted for this step's factor update; wrap the "
                "forward pass in `with optimizer.capture():` (it counts the batch size)"
            )
        return {}

    def _update_preconditioner(
        self, state: dict[str, Any], group: dict[str, Any], stats: Any, params: list[Tensor]
    ) -> None:
        """The factor update from the gradient, when the group refreshes (on the
        parameter's owner rank with ``ownership``)."""
        p = params[0]
        if p.grad is None or not self._refresh_due(group):
            return
        refresh = partial(self._refresh_factors, group=group, grad=p.grad, batch=self._batch_size)
        if self.ownership is None:
            refresh(state)
            return
        cost = sum(d**3 for d in p.shape) + p.numel() * sum(p.shape)
        defer_state_refresh(self.ownership, state["params"][0], state, ("K", "m"), refresh, cost)

    def _after_preconditioner_updates(self) -> None:
        if self.ownership is not None:
            self.ownership.flush()

    def _refresh_factors(
        self, state: dict[str, Any], group: dict[str, Any], grad: Tensor, batch: int
    ) -> None:
        """Warm start (once, when asked) and one factor update, in ``state``."""
        structs = [structure(s) for s in state["structures"]]
        if not state.get("started", True):
            self._warm_start(state, group, structs, grad, batch)
        self._update_factors(state, group, structs, grad, batch)

    def _warm_start(
        self,
        state: dict[str, Any],
        group: dict[str, Any],
        structs: list[Structure],
        grad: Tensor,
        batch: int,
    ) -> None:
        """The factors' diagonal start from the first gradient (see the module docstring)."""
        work = torch.promote_types(grad.dtype, torch.float32)
        sq = (grad.to(work) * batch**0.5).square()
        mean = sq.mean()
        order = grad.ndim
        root = (mean + self.damping(group)) ** (-0.5 / order)
        for n, (s, K) in enumerate(zip(structs, state["K"])):
            profile = sq.movedim(n, 0).reshape(sq.shape[n], -1).mean(1) / mean.clamp(min=1e-30)
            diag = (profile + 1e-8).rsqrt() * root
            K.copy_(s.project(torch.diag(diag).to(K.dtype)))
        state["started"] = True

    def _preconditioned_gradients(
        self, state: dict[str, Any], group: dict[str, Any], params: list[Tensor]
    ) -> list[Tensor]:
        """``G x_1 K_1 K_1^T ... x_N K_N K_N^T`` (with the sides of :meth:`_sides`)."""
        structs = tuple(structure(name) for name in state["structures"])
        grad = params[0].grad
        Ks, explicit = self._sides(state, group, structs, grad)
        return [self._product(grad, Ks, structs, explicit)]

    def _sides(
        self, state: dict[str, Any], group: dict[str, Any], structs: tuple[Structure, ...],
        grad: Tensor,
    ) -> tuple[tuple[Tensor, ...], tuple[bool, ...]]:  # fmt: skip
        """Per dimension ``n`` the factor ``K_n``, or for a dense one where that is cheaper
        over the refresh period (:func:`~.products.explicit_is_cheaper`: ``d_n^3`` once
        against ``d_n^2 * numel / d_n`` per step) the product ``K_n K_n^T`` in the gradient's
        dtype; kept until the factors change (:class:`~.products.ProductCache`)."""
        every, dtype = group["refresh_every"], grad.dtype

        def build() -> tuple[tuple[Tensor, ...], tuple[bool, ...]]:
            Ks, flags = [], []
            for s, K, d in zip(structs, state["K"], grad.shape):
                flag = s.name == "dense" and explicit_is_cheaper(d, grad.numel() // d, every)
                Kd = K.to(dtype)
                Ks.append(Kd @ Kd.T if flag else K)
                flags.append(flag)
            return tuple(Ks), tuple(flags)

        key = ("sirfshampoo", state["params"][0])
        return self._products.get(key, state["K"], (every, dtype), build)

    def _update_factors(
        self,
        state: dict[str, Any],
        group: dict[str, Any],
        structs: list[Structure],
        grad: Tensor,
        batch: int,
    ) -> None:
        """One step of every factor and its momentum (see the module docstring); raises
        before changing the state when a result is not finite."""
        dims = grad.shape
        Ks, ms = state["K"], state["m"]
        Ghat = grad * batch**0.5
        for n, (s, K) in enumerate(zip(structs, Ks)):
            Ghat = _mode_product(s, K, Ghat.to(K.dtype), n, transpose=True)
        avg_tr = [s.trace(s.inner(K, d), d) / d for s, K, d in zip(structs, Ks, dims)]
        damp = trace_coupled(avg_tr, self.damping(group))
        total = grad.numel()
        new_K, new_m = [], []
        for n, (s, K, m, d) in enumerate(zip(structs, Ks, ms, dims)):
            unfolded = Ghat.movedim(n, 0).reshape(d, -1).to(K.dtype)
            step = (
                s.inner(K, d) * damp[n]
                + s.gram(unfolded) / (total // d)
                - s.eye(d, K.dtype, K.device)
            ) * 0.5
            m = decayed_sum(m, step, group["alpha2"], 1 - group["alpha2"])
            beta = group["lr_cov"] / s.frobenius(m, d).clamp(min=1.0).to(m.dtype)
            new_K.append(K - s.mul(K, m, d) * beta)
            new_m.append(m)
        if not bool(finite_flags(new_K).all()):  # the one host synchronization of a refresh
            raise FloatingPointError(
                "SIRFShampoo: the factor update produced non-finite values (lower lr_cov or "
                "raise damping)"
            )
        for old, new in zip((*state["K"], *state["m"]), (*new_K, *new_m)):
            old.copy_(new)  # in place


__all__ = ["SIRFShampoo"]
