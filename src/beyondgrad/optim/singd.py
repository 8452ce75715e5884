"""SINGD: structured inverse-free natural gradient descent (Lin, Dangel et al., ICML 2024).

Per Linear / Conv1/2/3d layer (no groups; joint bias) with gradient ``G`` (``[O, I(+1)]``),
the preconditioner is ``(C C^T) kron (K K^T)`` with ``K`` (``[I(+1), I(+1)]``) and ``C``
(``[O, O]``) in a chosen :mod:`structure <beyondgrad.optim.structures>`; both start at ``I``.
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
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .averages import decayed_sum
from .damping import check_damping, trace_coupled
from .kronecker import KroneckerOptimizer
from .schedule import check_every, deprecated_alias, is_due
from .structures import Structure, structure

SINGD_RULES = ("linear", "conv")


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
        fisher_type: ``"empirical"`` (as in the paper), ``"mc"`` or ``"type-2"``.
        mc_samples: Monte-Carlo samples per data point (``"mc"``).
        kfac_approx: ``"expand"`` or ``"reduce"``.
        seed: seeds the Monte-Carlo draws.
        kl_clip, max_update_norm: clipping (global, off by default; see
            :mod:`~beyondgrad.optim.clipping`).
        grafting: None, ``"sgd"`` or ``"adam"`` (per group).
        T: deprecated spelling of ``refresh_every``.
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
        normalize_lr_cov: bool = False,
        refresh_every: int = 10,
        fisher_type: str = "empirical",
        mc_samples: int = 1,
        kfac_approx: str = "expand",
        seed: int = 0,
        kl_clip: float | None = None,
        max_update_norm: float | None = None,
        grafting: str | None = None,
        *,
        T: int | None = None,
        **adamw: Any,
    ):
        refresh_every = deprecated_alias("SINGD", "refresh_every", refresh_every, 10, "T", T)
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}
        defaults |= {
            "damping": damping,
            "alpha1": alpha1,
            "lr_cov": lr_cov,
            "structures": structures,
            "preconditioner_dtype": preconditioner_dtype,
            "kfac_like": kfac_like,
            "normalize_lr_cov": normalize_lr_cov,
            "refresh_every": refresh_every,
            "grafting": grafting,
            **adamw,
        }
        super().__init__(
            model, loss_fn, params, defaults, fisher_type, kfac_approx, mc_samples, seed
        )
        self._set_clipping(kl_clip, max_update_norm)
        named = dict(self.model.named_parameters())
        for state in self.layers.values():
            self._init_factors(state, named)

    @staticmethod
    def _accept(module: nn.Module) -> str | None:
        if getattr(module, "groups", 1) != 1:
            return "grouped convolution (SINGD factors are dense over all channels)"
        return None

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

    def _init_factors(self, state: dict[str, Any], named: dict[str, Tensor]) -> None:
        """``K = I`` (``[I(+1), I(+1)]``), ``C = I`` (``[O, O]``), zero momenta."""
        weight = named[state["params"][0]]
        group = self.group_of(weight)
        dim_k = weight[0].numel() + (len(state["params"]) - 1)
        dim_c = weight.shape[0]
        sk, sc = (structure(n) for n in group["structures"])
        dk, dc = (d or weight.dtype for d in group["preconditioner_dtype"])
        state.update(
            structures=tuple(group["structures"]),
            dims=(dim_k, dim_c),
            K=sk.eye(dim_k, dk, weight.device),
            C=sc.eye(dim_c, dc, weight.device),
            m_K=sk.eye(dim_k, dk, weight.device) * 0,
            m_C=sc.eye(dim_c, dc, weight.device) * 0,
        )

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
        """The factor update from this step's statistics, when the group refreshes."""
        if stats is not None and self._refresh_due(group):
            sk, sc = (structure(n) for n in state["structures"])
            self._update_factors(state, group, sk, sc, *stats)

    def _preconditioned_gradients(
        self, state: dict[str, Any], group: dict[str, Any], params: list[Tensor]
    ) -> list[Tensor]:
        """``C C^T G K K^T`` with ``G = [weight grad as [O, I], bias grad]``, split back."""
        weight, bias = params[0], (params[1] if len(params) > 1 else None)
        G = weight.grad.reshape(weight.shape[0], -1)  # [O, I] (+ the bias column)
        if bias is not None:
            G = torch.cat([G, bias.grad[:, None]], 1)
        sk, sc = (structure(n) for n in state["structures"])
        D = self._precondition_matrix(state, sk, sc, G)
        parts = [D[:, : weight[0].numel()].reshape(weight.shape)]
        if bias is not None:
            parts.append(D[:, -1])
        return parts

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
        module docstring); raises before changing the state when a result is not finite."""
        (dim_k, dim_c), K, C = state["dims"], state["K"], state["C"]
        H_K = sk.inner(K, dim_k, A.to(K.dtype))
        H_C = sc.inner(C, dim_c, B.to(C.dtype))
        KtK, CtC = sk.inner(K, dim_k), sc.inner(C, dim_c)
        alpha1 = group["alpha1"]
        scale = 0.5 * ((1 - alpha1) if group["normalize_lr_cov"] else 1.0)
        if group["kfac_like"]:
            c_C = c_K = 1.0
            damp_K, damp_C = trace_coupled([1.0, 1.0], group["damping"])
        else:
            c_C, c_K = float(sc.trace(H_C, dim_c)) / dim_c, float(sk.trace(H_K, dim_k)) / dim_k
            d_C, d_K = float(sc.trace(CtC, dim_c)) / dim_c, float(sk.trace(KtK, dim_k)) / dim_k
            damp_K, damp_C = trace_coupled([d_K, d_C], group["damping"])
        eye_k, eye_c = sk.eye(dim_k, K.dtype, K.device), sc.eye(dim_c, C.dtype, C.device)
        m_K = decayed_sum(state["m_K"], (H_K * c_C + KtK * damp_K - eye_k) * scale, alpha1)
        m_C = decayed_sum(state["m_C"], (H_C * c_K + CtC * damp_C - eye_c) * scale, alpha1)
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
