"""KFAC: natural gradient with exponential moving averages of Kronecker factors.

Per layer with a Kronecker rule (Linear, Conv1/2/3d, ConvTranspose1/2/3d, Embedding; joint
bias), the engine's factors ``B kron A`` (:class:`~beyondgrad.KFAC`: type-2, MC or empirical,
expand or reduce) approximate the curvature of the loss as ``loss_fn`` reduces it. The
optimizer keeps ``A <- ema A + (1 - ema) A_batch`` (same for ``B``; the first batch
initializes), refreshes the eigendecompositions every ``refresh_every`` steps (in float32 at
least) and preconditions the gradient ``G`` (``[O, I(+1)]``) with

- ``damping_mode="eigen"`` (exact): ``(B kron A + damping I)^{-1} vec(G)``
  ``= Q_B [(Q_B^T G Q_A) / (l_B l_A^T + damping)] Q_A^T``;
- ``damping_mode="pi"`` (factored Tikhonov, Martens & Grosse 2015):
  ``(B + sqrt(damping)/pi I)^{-1} G (A + pi sqrt(damping) I)^{-1}`` with
  ``pi = sqrt((tr A / dim A) / (tr B / dim B))``.

Then ``kl_clip`` scales all preconditioned directions by
``min(1, sqrt(kl_clip / |sum lr^2 d . g|))`` and ``max_update_norm`` caps ``lr * ||d||``;
momentum and decoupled weight decay follow (``p <- p (1 - lr wd) - lr buf``). Parameters
without a Kronecker rule, and tied weights, go to the AdamW fallback (``routing()``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from ..factors import from_block_layout, to_block_layout
from ..quantities import KFAC as KFACQuantity
from .base import CurvatureOptimizer, kronecker_layers

KFAC_RULES = ("linear", "conv", "conv_transpose", "embedding")


def _accept(module: nn.Module) -> str | None:
    return None


class KFAC(CurvatureOptimizer):
    """``KFAC(model, loss_fn, params=None, lr=0.1, ...)``; see the module docstring.

    Per param group: ``lr``, ``momentum`` (0.9), ``weight_decay`` (decoupled, 0), ``damping``
    (1e-3), ``adam_lr``/``adam_betas``/``adam_eps`` (fallback), ``precondition``. Global:
    ``fisher_type`` (``"mc"``, ``"type-2"``, ``"empirical"``), ``mc_samples``, ``kfac_approx``
    (``"expand"``/``"reduce"``), ``ema`` (0.95), ``stats_every`` (1: statistics on every
    step; each costs one extra backward of the curvature vectors), ``refresh_every`` (10),
    ``damping_mode`` (``"eigen"``/``"pi"``), ``kl_clip`` (1e-3 or None), ``max_update_norm``,
    ``seed`` (MC sampling, reproducible across resumes).
    """

    method = "kfac"

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        params: Iterable[Any] | None = None,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        damping: float = 1e-3,
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
        **adamw: Any,
    ):
        if damping_mode not in ("eigen", "pi"):
            raise ValueError(f"damping_mode must be 'eigen' or 'pi', got {damping_mode!r}")
        if not 0 <= ema < 1:
            raise ValueError(f"ema must be in [0, 1), got {ema}")
        for key, value in (("stats_every", stats_every), ("refresh_every", refresh_every)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be a positive int, got {value!r}")
        if kl_clip is not None and kl_clip <= 0:
            raise ValueError(f"kl_clip must be positive or None, got {kl_clip}")
        self.quantity = KFACQuantity(
            fisher_type=fisher_type,
            kfac_approx=kfac_approx,
            mc_samples=mc_samples,
            diagonal_fallback=False,
        )
        if fisher_type == "forward-only":
            raise ValueError("fisher_type='forward-only' is not a curvature for an optimizer")
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}
        defaults |= {"damping": damping, **adamw}
        super().__init__(model, params, defaults, loss_fn, seed)
        for group in self.param_groups:
            if group["damping"] <= 0:
                raise ValueError(f"damping must be positive, got {group['damping']}")
        self.ema, self.stats_every, self.refresh_every = ema, stats_every, refresh_every
        self.damping_mode, self.kl_clip, self.max_update_norm = (
            damping_mode,
            kl_clip,
            max_update_norm,
        )
        self._take_layers(*kronecker_layers(self.model, KFAC_RULES, _accept))

    def _stats_quantity(self) -> KFACQuantity | None:
        return self.quantity if self.layers else None

    def _stats_due(self) -> bool:
        return self.steps % self.stats_every == 0

    def _precondition_step(self, stats: dict[str, tuple[Tensor, Tensor]]) -> None:
        params = dict(self.model.named_parameters())
        for name, (A, B) in stats.items():
            state = self.layers[name]
            if "A" not in state:
                state["A"], state["B"] = A.clone(), B.clone()
            else:
                state["A"].lerp_(A, 1 - self.ema)
                state["B"].lerp_(B, 1 - self.ema)
        refresh = self.steps % self.refresh_every == 0
        directions: list[tuple[Tensor, Tensor, dict[str, Any]]] = []
        for name, state in self.layers.items():
            members = [params[n] for n in state["params"]]
            if members[0].grad is None:
                continue
            if "A" not in state:
                raise RuntimeError(
                    f"KFAC has no curvature statistics for layer '{name}' yet: wrap the "
                    "forward pass of the first step in `with optimizer.capture():`"
                )
            group = self._group_of[id(members[0])]
            if refresh or "eig" not in state:
                state["eig"] = self._decompose(state, group["damping"])
            weight, bias = members[0], (members[1] if len(members) > 1 else None)
            layout = (state["order"], state["weight_perm"], self._groups(state))
            grad_bias = None if bias is None else bias.grad[None]
            M = to_block_layout(weight.grad[None], grad_bias, *layout)[0]
            D = self._solve(state["eig"], M, group["damping"])
            bias_shape = None if bias is None else tuple(bias.shape)
            W, b = from_block_layout(D[None], tuple(weight.shape), bias_shape, *layout)
            parts = [W[0]] if b is None else [W[0], b[0]]
            for p, d in zip(members, parts):
                directions.append((p, d, group))
        scale = 1.0
        if self.kl_clip is not None and directions:  # one synchronization
            vg = float(sum((d * p.grad).sum() * group["lr"] ** 2 for p, d, group in directions))
            if vg != 0:
                scale = min(1.0, (self.kl_clip / abs(vg)) ** 0.5)
        if self.max_update_norm is not None and directions:
            norm = float(sum(d.square().sum() * group["lr"] ** 2 for _, d, group in directions))
            norm = scale * norm**0.5
            if norm > self.max_update_norm:
                scale *= self.max_update_norm / norm
        for p, d, group in directions:
            self._apply(p, d * scale if scale != 1.0 else d, group)

    @staticmethod
    def _groups(state: dict[str, Any]) -> int:
        return state["A"].shape[0] if state["A"].ndim == 3 else 1

    def _decompose(self, state: dict[str, Any], damping: float) -> tuple[Tensor, ...]:
        """Eigenpairs of the (pi-damped) factors, ``[G, d]`` and ``[G, d, d]``, in the order
        (left, right) of the gradient matrix."""
        A, B = state["A"], state["B"]
        work = torch.promote_types(A.dtype, torch.float32)
        A, B = (A if A.ndim == 3 else A[None]).to(work), (B if B.ndim == 3 else B[None]).to(work)
        if self.damping_mode == "pi":
            dim_a, dim_b = A.shape[-1], B.shape[-1]
            tr_a = torch.diagonal(A, dim1=1, dim2=2).sum(-1) / dim_a
            tr_b = torch.diagonal(B, dim1=1, dim2=2).sum(-1) / dim_b
            pi = (tr_a / tr_b).clamp(min=1e-12).sqrt().nan_to_num(1.0)
            root = damping**0.5
            eye_a = torch.eye(dim_a, dtype=work, device=A.device)
            eye_b = torch.eye(dim_b, dtype=work, device=B.device)
            A = A + (pi * root)[:, None, None] * eye_a
            B = B + (root / pi)[:, None, None] * eye_b
        la, qa = torch.linalg.eigh(A)
        lb, qb = torch.linalg.eigh(B)
        la, lb = la.clamp(min=0), lb.clamp(min=0)
        if state["order"] == "A kron B":
            return (la, qa, lb, qb)
        return (lb, qb, la, qa)

    def _solve(self, eig: tuple[Tensor, ...], M: Tensor, damping: float) -> Tensor:
        l_left, q_left, l_right, q_right = eig
        delta = damping if self.damping_mode == "eigen" else 0.0
        rot = q_left.transpose(1, 2) @ M.to(q_left.dtype) @ q_right
        rot = rot / (l_left.unsqueeze(2) * l_right.unsqueeze(1) + delta)
        return (q_left @ rot @ q_right.transpose(1, 2)).to(M.dtype)


__all__ = ["KFAC"]
