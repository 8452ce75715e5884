"""SINGD: structured inverse-free natural gradient descent (Lin, Dangel et al., ICML 2024).

Per Linear / Conv1/2/3d layer (no groups; joint bias) with gradient ``G`` (``[O, I(+1)]``),
the preconditioner is ``(C C^T) kron (K K^T)`` with ``K`` (``[I(+1), I(+1)]``) and ``C``
(``[O, O]``) in a chosen :mod:`structure <beyondgrad.optim.structures>`; both start at ``I``.
Every ``T`` steps, from the engine's Kronecker statistics ``A`` (inputs) and ``B`` (output
gradients; the curvature of the loss is ``B kron A``, see :class:`~beyondgrad.KFAC`)::

    H_K = P(K^T A K)                 H_C = P(C^T B C)       (P: projection onto the structure)
    m_K <- alpha1 m_K + s [c_C H_K + damping d_C P(K^T K) - I]
    m_C <- alpha1 m_C + s [c_K H_C + damping d_K P(C^T C) - I]
    K <- K (I - lr_cov m_K)          C <- C (I - lr_cov m_C)

with ``c_C = tr(H_C)/O``, ``d_C = tr(C^T C)/O`` (and symmetrically), or ``c = d = 1`` for
the KFAC-like variant IKFAC (``kfac_like=True``, whose fixed point is ``K K^T = (A +
damping I)^{-1}``); ``s = 1/2`` (``(1 - alpha1)/2`` and ``lr_cov / max(1, max|m|)`` with
``normalize_lr_cov=True``). Only matrix products: no inverse, no decomposition, so factors may
be stored and updated in bfloat16 (``preconditioner_dtype=(dtype_K, dtype_C)``). Every step:
``direction = C C^T G K K^T``, then momentum and decoupled weight decay (``p <- p (1 - lr wd)
- lr buf``). Other parameters go to the AdamW fallback (``routing()``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from ..quantities import KFAC as KFACQuantity
from .base import CurvatureOptimizer, kronecker_layers
from .structures import Structure, structure

SINGD_RULES = ("linear", "conv")


def _accept(module: nn.Module) -> str | None:
    if getattr(module, "groups", 1) != 1:
        return "grouped convolution (SINGD factors are dense over all channels)"
    return None


def _pair(value: Any, what: str) -> tuple[Any, Any]:
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{what} must be one value or a pair (K, C), got {value!r}")
        return tuple(value)  # type: ignore[return-value]
    return (value, value)


class SINGD(CurvatureOptimizer):
    """``SINGD(model, loss_fn, params=None, lr=1e-3, ...)``; see the module docstring.

    Per param group: ``lr``, ``momentum`` (0.9), ``weight_decay`` (decoupled, 0), ``damping``
    (1e-3), ``alpha1`` (Riemannian momentum, 0.5), ``lr_cov`` (1e-2), ``structures`` (name or
    pair ``(K, C)``, ``"dense"``), ``preconditioner_dtype`` (dtype or pair, default the
    parameter's), ``kfac_like`` (False), ``normalize_lr_cov`` (False), the AdamW fallback's
    ``adam_lr``/``adam_betas``/``adam_eps`` and ``precondition``. Global: ``T`` (10: statistics
    and factor updates every T steps), ``fisher_type`` (``"empirical"`` as in the paper,
    ``"mc"`` or ``"type-2"``), ``mc_samples``, ``kfac_approx``, ``seed``.
    """

    method = "singd"

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
        normalize_lr_cov: bool = False,
        T: int = 10,
        fisher_type: str = "empirical",
        mc_samples: int = 1,
        kfac_approx: str = "expand",
        seed: int = 0,
        **adamw: Any,
    ):
        if not isinstance(T, int) or T < 1:
            raise ValueError(f"T must be a positive int, got {T!r}")
        if fisher_type == "forward-only":
            raise ValueError("fisher_type='forward-only' is not a curvature for an optimizer")
        self.quantity = KFACQuantity(
            fisher_type=fisher_type,
            kfac_approx=kfac_approx,
            mc_samples=mc_samples,
            diagonal_fallback=False,
        )
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}
        defaults |= {
            "damping": damping,
            "alpha1": alpha1,
            "lr_cov": lr_cov,
            "structures": structures,
            "preconditioner_dtype": preconditioner_dtype,
            "kfac_like": kfac_like,
            "normalize_lr_cov": normalize_lr_cov,
            **adamw,
        }
        super().__init__(model, params, defaults, loss_fn, seed)
        self.T = T
        for group in self.param_groups:
            group["structures"] = _pair(group["structures"], "structures")
            for name in group["structures"]:
                structure(name)  # raises on unknown names
            group["preconditioner_dtype"] = _pair(
                group["preconditioner_dtype"], "preconditioner_dtype"
            )
            if group["damping"] < 0:
                raise ValueError(f"damping must be non-negative, got {group['damping']}")
            if not 0 <= group["alpha1"] < 1:
                raise ValueError(f"alpha1 must be in [0, 1), got {group['alpha1']}")
            if group["lr_cov"] <= 0:
                raise ValueError(f"lr_cov must be positive, got {group['lr_cov']}")
        self._take_layers(*kronecker_layers(self.model, SINGD_RULES, _accept))
        named = dict(self.model.named_parameters())
        for state in self.layers.values():
            weight = named[state["params"][0]]
            group = self._group_of[id(weight)]
            dim_k = weight[0].numel() + (len(state["params"]) - 1)
            dim_c = weight.shape[0]
            sk, sc = (structure(n) for n in group["structures"])
            dk, dc = (d or weight.dtype for d in group["preconditioner_dtype"])
            state.update(
                dims=(dim_k, dim_c),
                K=sk.eye(dim_k, dk, weight.device),
                C=sc.eye(dim_c, dc, weight.device),
                m_K=sk.eye(dim_k, dk, weight.device) * 0,
                m_C=sc.eye(dim_c, dc, weight.device) * 0,
            )

    def _stats_quantity(self) -> KFACQuantity | None:
        return self.quantity if self.layers else None

    def _stats_due(self) -> bool:
        return self.steps % self.T == 0

    def _precondition_step(self, stats: dict[str, tuple[Tensor, Tensor]]) -> None:
        named = dict(self.model.named_parameters())
        for name, state in self.layers.items():
            members = [named[n] for n in state["params"]]
            group = self._group_of[id(members[0])]
            sk, sc = (structure(n) for n in group["structures"])
            if name in stats:
                self._update_factors(state, group, sk, sc, *stats[name])
            if members[0].grad is None:
                continue
            weight, bias = members[0], (members[1] if len(members) > 1 else None)
            G = weight.grad.reshape(weight.shape[0], -1)  # [O, I] (+ the bias column)
            if bias is not None:
                G = torch.cat([G, bias.grad[:, None]], 1)
            D = self._precondition(state, sk, sc, G)
            parts = [D[:, : weight[0].numel()].reshape(weight.shape)]
            if bias is not None:
                parts.append(D[:, -1])
            for p, d in zip(members, parts):
                self._apply(p, d, group)

    @staticmethod
    def _precondition(state: dict[str, Any], sk: Structure, sc: Structure, G: Tensor) -> Tensor:
        """``C C^T G K K^T`` for ``G [O, n]``."""
        K, C = state["K"], state["C"]
        X = sk.apply(K, G.T, transpose=True)  # K^T G^T
        X = sk.apply(K, X).T  # G K K^T
        return sc.apply(C, sc.apply(C, X, transpose=True))

    def _update_factors(
        self,
        state: dict[str, Any],
        group: dict[str, Any],
        sk: Structure,
        sc: Structure,
        A: Tensor,
        B: Tensor,
    ) -> None:
        (dim_k, dim_c), K, C = state["dims"], state["K"], state["C"]
        H_K = sk.inner(K, dim_k, A.to(K.dtype))
        H_C = sc.inner(C, dim_c, B.to(C.dtype))
        KtK, CtC = sk.inner(K, dim_k), sc.inner(C, dim_c)
        alpha1, damping = group["alpha1"], group["damping"]
        scale = 0.5 * ((1 - alpha1) if group["normalize_lr_cov"] else 1.0)
        if group["kfac_like"]:
            c_C = c_K = d_C = d_K = 1.0
        else:
            c_C, c_K = float(sc.trace(H_C, dim_c)) / dim_c, float(sk.trace(H_K, dim_k)) / dim_k
            d_C, d_K = float(sc.trace(CtC, dim_c)) / dim_c, float(sk.trace(KtK, dim_k)) / dim_k
        eye_k, eye_c = sk.eye(dim_k, K.dtype, K.device), sc.eye(dim_c, C.dtype, C.device)
        step_K = (H_K * c_C + KtK * (damping * d_C) - eye_k) * scale
        step_C = (H_C * c_K + CtC * (damping * d_K) - eye_c) * scale
        m_K = state["m_K"] * alpha1 + step_K
        m_C = state["m_C"] * alpha1 + step_C
        beta_K = beta_C = group["lr_cov"]
        if group["normalize_lr_cov"]:
            beta_K /= max(1.0, float(m_K.abs().max()))
            beta_C /= max(1.0, float(m_C.abs().max()))
        new_K = K - sk.mul(K, m_K, dim_k) * beta_K
        new_C = C - sc.mul(C, m_C, dim_c) * beta_C
        if not (bool(torch.isfinite(new_K).all()) and bool(torch.isfinite(new_C).all())):
            raise FloatingPointError(
                "SINGD: the factor update produced non-finite values (lower lr_cov or raise "
                "damping)"
            )
        state.update(K=new_K, C=new_C, m_K=m_K, m_C=m_C)


__all__ = ["SINGD"]
