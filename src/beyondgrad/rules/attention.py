"""``nn.MultiheadAttention`` re-expressed as Linear calls while beyondgrad watches it.

Torch's attention applies its packed in-projection (``in_proj_weight`` ``[3E, E]``,
``in_proj_bias`` ``[3E]``) and its ``out_proj`` functionally: no layer call records their
inputs and output gradients, so they would only get the generic rule (exact per-sample
gradients, but no Kronecker block). Here, while any forward hook of beyondgrad is registered on
the in-projection (a capture, a probe), the attention module computes the same function as
Linear *module calls*:

1. ``InProjection(query)`` (and of ``key``/``value`` when they are other tensors) — an
   ``nn.Linear`` view whose weight and bias are the attention's ``in_proj_weight`` and
   ``in_proj_bias`` (read at call time, never copied), called on the samples-first layout
   ``[N, L, E]``; its output ``[N, L, 3E]`` is split into ``q``, ``k``, ``v``;
2. torch's own ``F.multi_head_attention_forward`` on the projected ``q, k, v`` with identity
   projections and no biases (masks, causal hint, ``add_zero_attn``, dropout and the returned
   weights stay torch's own; multiplying by an identity matrix is exact);
3. ``out_proj(core)`` as a module call on ``[N, L, E]``.

So both weight matrices are served by the Linear rule (per-sample gradients, diagonals and
Kronecker factors of the Linear layer they are). With ``query``, ``key`` and ``value`` three
different tensors (cross-attention) the in-projection is called once per input; the rows of
``q`` only reach the loss through the first ``E`` outputs of its call, so the sum over the
calls is exact, and the KFAC-expand statistics treat the calls like any layer called several
times.

Served: the stock module with ``_qkv_same_embed_dim`` (no ``kdim``/``vdim``), no
``add_bias_kv`` parameters, a stock ``out_proj`` and no instance-level ``forward`` of the
user's. Any other configuration keeps the generic rule.

While re-expressed the module carries an instance attribute ``forward`` (removed with the
last hook); torch's fused fast path is not taken then.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["InProjection", "in_projection_unit"]


def _serves(attention: nn.Module) -> bool:
    """Whether the stock attention module ``attention`` can be re-expressed (module docstring)."""
    if type(attention).forward is not nn.MultiheadAttention.forward:
        return False
    own = getattr(attention, "forward", None)
    if "forward" in attention.__dict__ and not getattr(own, "_beyondgrad_reexpressed", False):
        return False
    out_proj = getattr(attention, "out_proj", None)
    return (
        attention._qkv_same_embed_dim  # type: ignore[union-attr]
        and attention.in_proj_weight is not None
        and attention.bias_k is None
        and attention.bias_v is None
        and isinstance(out_proj, nn.Linear)
        and type(out_proj).forward is nn.Linear.forward
    )


class InProjection(nn.Linear):
    """The packed in-projection of an ``nn.MultiheadAttention`` as an ``nn.Linear`` module.

    It owns no parameters: ``weight`` (``[3E, E]``) and ``bias`` (``[3E]`` or ``None``) are the
    attention's ``in_proj_weight`` and ``in_proj_bias``, read at each call (so
    ``torch.func.functional_call`` on the model reaches them). It is not registered in the
    model. Registering a forward hook on it re-expresses the attention module (module
    docstring) until the last such hook is removed.

    Args:
        attention: the attention module (held by a weak reference).
    """

    def __init__(self, attention: nn.MultiheadAttention):
        nn.Module.__init__(self)
        self.in_features = attention.embed_dim
        self.out_features = 3 * attention.embed_dim
        self.__dict__["_attention"] = weakref.ref(attention)
        self.__dict__["_hooks_out"] = 0

    @property
    def attention(self) -> nn.MultiheadAttention:
        """The attention module whose in-projection this is."""
        module = self.__dict__["_attention"]()
        if module is None:
            raise RuntimeError("the attention module of this in-projection no longer exists")
        return module

    @property  # type: ignore[override]
    def weight(self) -> Tensor:
        return self.attention.in_proj_weight

    @property  # type: ignore[override]
    def bias(self) -> Tensor | None:  # type: ignore[override]
        return self.attention.in_proj_bias

    def register_forward_hook(self, hook: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        """``nn.Module.register_forward_hook``; the attention computes through this module
        until the returned handle is removed."""
        handle = super().register_forward_hook(hook, **kwargs)
        self._reroute(+1)
        return _ReroutingHandle(handle, self)

    def _reroute(self, delta: int) -> None:
        count = self.__dict__["_hooks_out"] + delta
        self.__dict__["_hooks_out"] = count
        attention = self.__dict__["_attention"]()
        if attention is None:
            return
        if count == 1 and delta > 0:
            forward = functools.partial(reexpressed_forward, attention, self)
            forward._beyondgrad_reexpressed = True  # type: ignore[attr-defined]
            attention.__dict__["forward"] = forward
        elif count == 0:
            attention.__dict__.pop("forward", None)


class _ReroutingHandle:
    """A hook handle that also releases the attention's re-expression when removed."""

    def __init__(self, handle: Any, projection: InProjection):
        self.handle = handle
        self.projection = projection
        self.removed = False

    @property
    def id(self) -> int:
        return self.handle.id

    def remove(self) -> None:
        self.handle.remove()
        if not self.removed:
            self.removed = True
            self.projection._reroute(-1)

    def __enter__(self) -> _ReroutingHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


_PROJECTIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def in_projection_unit(
    module: nn.Module, own: dict[str, nn.Parameter]
) -> tuple[nn.Module, dict[str, nn.Parameter]]:
    """The module and parameters (local names) that serve ``module``'s own parameters ``own``:
    for a served ``nn.MultiheadAttention``, its :class:`InProjection` (one per attention
    module) with ``{"weight": in_proj_weight, "bias": in_proj_bias}`` (trainable ones); for
    every other module, ``(module, own)`` unchanged."""
    if not isinstance(module, nn.MultiheadAttention) or not _serves(module):
        return module, own
    if set(own) - {"in_proj_weight", "in_proj_bias"}:
        return module, own
    projection = _PROJECTIONS.get(module)
    if projection is None:
        projection = _PROJECTIONS[module] = InProjection(module)
    local = {"in_proj_weight": "weight", "in_proj_bias": "bias"}
    return projection, {local[n]: p for n, p in own.items()}


def _project(
    projection: InProjection, query: Tensor, key: Tensor, value: Tensor, first: Any
) -> tuple[Tensor, Tensor, Tensor]:
    """``q, k, v`` ``[N, L, E]`` (samples first) from one in-projection call per distinct
    input tensor (``first`` puts an input's samples first)."""
    E = projection.in_features
    if query is key and key is value:
        return projection(first(query)).chunk(3, -1)  # type: ignore[return-value]
    q = projection(first(query))[..., :E]
    kv = projection(first(key))
    if key is value:
        return q, kv[..., E : 2 * E], kv[..., 2 * E :]
    return q, kv[..., E : 2 * E], projection(first(value))[..., 2 * E :]


def reexpressed_forward(
    attention: nn.MultiheadAttention,
    projection: InProjection,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Tensor | None = None,
    need_weights: bool = True,
    attn_mask: Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """``attention(query, key, value, ...)`` computed through ``projection`` and
    ``attention.out_proj`` module calls (module docstring); same signature and results as
    ``nn.MultiheadAttention.forward``."""
    batched = query.dim() == 3
    swap = batched and not attention.batch_first  # inputs [L, N, E]

    def first(t: Tensor) -> Tensor:  # samples first: [N, L, E]
        return t.transpose(0, 1) if swap else t

    def core_layout(t: Tensor) -> Tensor:  # torch's functional layout: [L, N, E]
        return t.transpose(0, 1) if batched else t

    q, k, v = _project(projection, query, key, value, first)
    E = attention.embed_dim
    eye = torch.eye(E, dtype=q.dtype, device=q.device)
    core, weights = F.multi_head_attention_forward(
        core_layout(q),
        core_layout(k),
        core_layout(v),
        E,
        attention.num_heads,
        None,
        None,
        None,
        None,
        attention.add_zero_attn,
        attention.dropout,
        eye,
        None,
        training=attention.training,
        key_padding_mask=key_padding_mask,
        need_weights=need_weights,
        attn_mask=attn_mask,
        use_separate_proj_weight=True,
        q_proj_weight=eye,
        k_proj_weight=eye,
        v_proj_weight=eye,
        average_attn_weights=average_attn_weights,
        is_causal=is_causal,
    )
    out = attention.out_proj(core_layout(core))  # [N, L, E]
    return (first(out) if batched else out), weights
