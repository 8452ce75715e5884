"""SIRFShampoo: structured inverse-free root-free Shampoo (Lin, Dangel et al., ICML 2024:
"Can we remove the square-root in adaptive gradient methods?").

Gradients only, so every parameter of any shape is preconditioned (no hooks on layers beyond
counting the batch size). A parameter of shape ``(d_1, ..., d_N)`` has one structured factor
``K_n`` (``[d_n, d_n]``) per dimension; the preconditioner is ``kron_n K_n K_n^T``, an
estimate of the inverse (not inverse root) of the gradients' second moment. With
``Ghat = sqrt(batch) G x_1 K_1^T ... x_N K_N^T`` (mode products; ``sqrt(batch)`` turns the
mean-loss gradient into per-sample scale) and ``Ghat_(n)`` its mode-``n`` unfolding, every
``T`` steps::

    m_n <- alpha2 m_n + (1 - alpha2) / 2 [damping prod_{j!=n} (tr(K_j^T K_j)/d_j) P(K_n^T K_n)
                                          + P(Ghat_(n) Ghat_(n)^T) / prod_{j!=n} d_j - I]
    K_n <- K_n (I - lr_cov m_n / max(1, ||m_n||_F))

(``P``: projection onto the structure). Every step:
``direction = G x_1 K_1 K_1^T ... x_N K_N K_N^T``, then momentum (``momentum``) and decoupled
weight decay. 0-d parameters go to the AdamW fallback; dimensions longer than ``max_dense``
get a diagonal factor whatever the structure (a dense factor over a 50k vocabulary would not
fit). Factors may be bfloat16 (``preconditioner_dtype``): only matrix products are used.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .base import CurvatureOptimizer, distributed_world
from .structures import Structure, structure


def _mode_apply(s: Structure, t: Tensor, X: Tensor, n: int, transpose: bool) -> Tensor:
    """``K_n`` (or ``K_n^T``) applied along axis ``n`` of ``X``."""
    moved = X.movedim(n, 0)
    out = s.apply(t, moved.reshape(moved.shape[0], -1), transpose=transpose)
    return out.reshape(moved.shape).movedim(0, n)


class SIRFShampoo(CurvatureOptimizer):
    """``SIRFShampoo(model, params=None, lr=1e-3, ...)``; see the module docstring.

    Per param group: ``lr``, ``momentum`` (0.9), ``weight_decay`` (decoupled, 0), ``damping``
    (1e-3), ``alpha2`` (Riemannian momentum, 0.5), ``lr_cov`` (0.01), ``structures`` (one
    name for all factors, or a dict ``{order: name or tuple of names}``, default
    ``"dense"``), ``preconditioner_dtype``, ``max_dense`` (2048), ``T`` (1), the AdamW
    fallback's ``adam_*`` and ``precondition``. The batch size is counted by a forward
    pre-hook on ``model`` (leading axis of the first tensor argument).
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
        T: int = 1,
        **adamw: Any,
    ):
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}
        defaults |= {
            "damping": damping,
            "alpha2": alpha2,
            "lr_cov": lr_cov,
            "structures": structures,
            "preconditioner_dtype": preconditioner_dtype,
            "max_dense": max_dense,
            "T": T,
            **adamw,
        }
        super().__init__(model, params, defaults, None, 0)
        taken = {}
        for group in self.param_groups:
            if not isinstance(group["T"], int) or group["T"] < 1:
                raise ValueError(f"T must be a positive int, got {group['T']!r}")
            if not 0 <= group["alpha2"] < 1:
                raise ValueError(f"alpha2 must be in [0, 1), got {group['alpha2']}")
            if group["damping"] < 0 or group["lr_cov"] <= 0:
                raise ValueError("damping must be non-negative and lr_cov positive")
            if not group["precondition"]:
                continue
            for p in group["params"]:
                if p.ndim == 0:
                    continue
                names = self._structures(group, p)
                name = self.names[id(p)]
                dtype = group["preconditioner_dtype"] or p.dtype
                self.layers[name] = {
                    "structures": names,
                    "K": [structure(s).eye(d, dtype, p.device) for s, d in zip(names, p.shape)],
                    "m": [structure(s).eye(d, dtype, p.device) * 0 for s, d in zip(names, p.shape)],
                }
                taken[name] = "factors " + " x ".join(f"{s}[{d}]" for s, d in zip(names, p.shape))
        self._refused = {
            self.names[id(p)]: "0-d tensor (no dimension to precondition)"
            for g in self.param_groups
            for p in g["params"]
            if p.ndim == 0
        }
        self._route(taken)
        self._batch = 0
        self._hook = model.register_forward_pre_hook(self._count, with_kwargs=True)

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

    def _count(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not torch.is_grad_enabled():
            return
        for value in (*args, *kwargs.values()):
            if isinstance(value, Tensor) and value.ndim > 0:
                self._batch += value.shape[0]
                return

    def _precondition_step(self, stats: dict[str, tuple[Tensor, Tensor]]) -> None:
        batch = self._batch
        self._batch = 0
        if distributed_world() > 1:
            import torch.distributed as dist

            count = torch.tensor(float(batch), dtype=torch.float64)
            dist.all_reduce(count)
            batch = int(count.item())
        named = dict(self.model.named_parameters())
        for name, state in self.layers.items():
            p = named[name]
            if p.grad is None:
                continue
            group = self._group_of[id(p)]
            structs = [structure(s) for s in state["structures"]]
            if self.steps % group["T"] == 0:
                self._update_factors(state, group, structs, p.grad, max(batch, 1))
            D = p.grad
            for n, (s, K) in enumerate(zip(structs, state["K"])):
                D = _mode_apply(s, K, _mode_apply(s, K, D, n, transpose=True), n, False)
            self._apply(p, D, group)

    def _update_factors(
        self,
        state: dict[str, Any],
        group: dict[str, Any],
        structs: list[Structure],
        grad: Tensor,
        batch: int,
    ) -> None:
        dims = grad.shape
        Ks, ms = state["K"], state["m"]
        Ghat = grad * batch**0.5
        for n, (s, K) in enumerate(zip(structs, Ks)):
            Ghat = _mode_apply(s, K, Ghat.to(K.dtype), n, transpose=True)
        avg_tr = [float(s.trace(s.inner(K, d), d)) / d for s, K, d in zip(structs, Ks, dims)]
        total = 1
        for d in dims:
            total *= d
        new_K, new_m = [], []
        for n, (s, K, m, d) in enumerate(zip(structs, Ks, ms, dims)):
            others = 1.0
            for j, tr in enumerate(avg_tr):
                if j != n:
                    others *= tr
            unfolded = Ghat.movedim(n, 0).reshape(d, -1).to(K.dtype)
            step = (
                s.inner(K, d) * (group["damping"] * others)
                + s.gram(unfolded) / (total // d)
                - s.eye(d, K.dtype, K.device)
            ) * 0.5
            m = m * group["alpha2"] + step * (1 - group["alpha2"])
            beta = group["lr_cov"] / max(1.0, float(s.frobenius(m, d)))
            new_K.append(K - s.mul(K, m, d) * beta)
            new_m.append(m)
        if not all(bool(torch.isfinite(K).all()) for K in new_K):
            raise FloatingPointError(
                "SIRFShampoo: the factor update produced non-finite values (lower lr_cov or "
                "raise damping)"
            )
        state["K"], state["m"] = new_K, new_m


__all__ = ["SIRFShampoo"]
