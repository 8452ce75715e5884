"""The forward Laplacian and its backward in closed form, without autograd.

:meth:`~beyondgrad.pinn.PINNLoss.evaluate` needs, per linear layer, the ``S`` inputs ``Z`` of
every point (bias column appended) and the gradients ``g`` of the point's residual in the
layer's ``S`` outputs. :func:`residual_pass` computes both with one hand-written forward and
one hand-written backward:

* the first linear layer's Taylor inputs are ``(x, e_1 .. e_d, 0)``, so its derivative outputs
  are the weight's columns (one broadcast view for all points) and its Laplacian output is zero:
  only the value row is multiplied;
* an activation writes its ``S`` outputs into one buffer ``[N, S, w + 1]`` whose last column is
  the bias column (``1`` for the value, ``0`` otherwise): the next linear layer is one matrix
  product with ``[W | b]`` and the buffer is that layer's ``Z`` as is (no copy);
* the backward through an activation ``h_0 = s(z_0)``, ``h_i = s'(z_0) z_i``,
  ``h_L = s'(z_0) z_L + s''(z_0) sum_{i in I} z_i^2`` uses ``s'``, ``s''``, ``s'''`` in closed
  form (an activation without a closed-form ``s'''`` gets it from autograd of ``s''``);
* the residual's gradient in the network's ``S`` outputs comes from autograd of the (affine,
  per-point) residual on those ``[N, S, 1]`` outputs only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .taylor import ACTIVATIONS, TaylorResult, _mask, layers_of

Derivs3 = tuple[Tensor, Tensor, Tensor, Tensor]
Mask = Tensor | slice | None


def _tanh3(_: nn.Module, z: Tensor) -> Derivs3:
    h = torch.tanh(z)
    h2 = h * h
    d1 = 1 - h2
    return h, d1, -2 * h * d1, 2 * d1 * (3 * h2 - 1)


def _sigmoid3(_: nn.Module, z: Tensor) -> Derivs3:
    s = torch.sigmoid(z)
    d1 = s * (1 - s)
    return s, d1, d1 * (1 - 2 * s), d1 * (1 - 6 * d1)


def _softplus3(module: nn.Module, z: Tensor) -> Derivs3:
    beta = float(module.beta)  # type: ignore[arg-type]
    s = torch.sigmoid(beta * z)
    d2 = beta * s * (1 - s)
    return nn.functional.softplus(z, beta=beta), s, d2, beta * d2 * (1 - 2 * s)


def _silu3(_: nn.Module, z: Tensor) -> Derivs3:
    s = torch.sigmoid(z)
    q = s * (1 - s)
    a = 1 - 2 * s
    return z * s, s * (1 + z * (1 - s)), q * (2 + z * a), q * (a * (3 + z * a) - 2 * z * q)


def _identity3(_: nn.Module, z: Tensor) -> Derivs3:
    zero = torch.zeros_like(z)
    return z, torch.ones_like(z), zero, zero


#: closed-form (s, s', s'', s''') of the built-in activations
THIRD: dict[type[nn.Module], Callable[[nn.Module, Tensor], Derivs3]] = {
    nn.Tanh: _tanh3,
    nn.Sigmoid: _sigmoid3,
    nn.Softplus: _softplus3,
    nn.SiLU: _silu3,
    nn.Identity: _identity3,
}


def derivatives3(module: nn.Module, z: Tensor) -> Derivs3:
    """``(s, s', s'', s''')`` of an element-wise activation at ``z``.

    Args:
        module: a supported activation (a key of :data:`~beyondgrad.pinn.ACTIVATIONS`).
        z: pre-activations (any shape).

    Returns:
        Four tensors shaped like ``z``; ``s'''`` by autograd of ``s''`` for an activation
        without a closed form here.
    """
    if type(module) in THIRD:
        return THIRD[type(module)](module, z)
    with torch.enable_grad():
        leaf = z.detach().requires_grad_(True)
        h, d1, d2 = ACTIVATIONS[type(module)](module, leaf)
        (d3,) = torch.autograd.grad(d2.sum(), leaf)
    return h.detach(), d1.detach(), d2.detach(), d3


@dataclass
class _Act:
    """What the backward through one activation needs (order 2; ``zd`` may broadcast over
    points, ``zl`` is ``None`` when zero)."""

    d1: Tensor
    d2: Tensor | None
    d3: Tensor | None
    zd: Tensor | None
    zl: Tensor | None
    sq: Tensor | None


@dataclass
class ResidualPass:
    """The result of :func:`residual_pass`.

    Attributes:
        r: ``[N]`` residuals.
        Z: per linear layer ``[N, S, in + 1]`` inputs, bias column appended (``[N, S, in]``
            without bias).
        g: per linear layer ``[N, S, out]`` gradients of ``r_n`` in the layer's outputs.
    """

    r: Tensor
    Z: list[Tensor]
    g: list[Tensor]


def _augmented_initial(X: Tensor, order: int, bias: bool) -> Tensor:
    """``[N, S, d (+1)]``: value, unit derivatives, zero Laplacian, bias column."""
    N, d = X.shape
    S = 1 if order == 0 else d + 2
    Z = X.new_zeros(N, S, d + int(bias))
    Z[:, 0, :d] = X
    if order:
        Z[:, 1 : d + 1, :d] = torch.eye(d, dtype=X.dtype, device=X.device)
    if bias:
        Z[:, 0, d] = 1.0
    return Z


def _weight(layer: nn.Linear) -> Tensor:
    W = layer.weight.detach()
    return W if layer.bias is None else torch.cat([W, layer.bias.detach()[:, None]], 1)


def _buffer(N: int, S: int, w: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``[N, S, w + 1]`` with the bias column (``1`` in the value row, ``0`` elsewhere)."""
    H = torch.empty(N, S, w + 1, dtype=dtype, device=device)
    H[:, :, w] = 0.0
    H[:, 0, w] = 1.0
    return H


def _act_forward(
    module: nn.Module, parts: tuple[Tensor, Tensor | None, Tensor | None, Tensor | None], mask: Mask
) -> tuple[Tensor, _Act]:
    """Activation on ``(z0 [N, w], zd [N or 1, d, w] | None, zl [N, w] | None, sq)``: the output
    buffer ``[N, S, w + 1]`` and the saved tensors (``sq``: ``sum_{i in I} zd_i^2`` if known)."""
    z0, zd, zl, sq = parts
    N, w = z0.shape
    if zd is None:  # value only
        h, d1, _ = ACTIVATIONS[type(module)](module, z0)
        H = _buffer(N, 1, w, z0.dtype, z0.device)
        H[:, 0, :w] = h
        return H, _Act(d1, None, None, None, None, None)
    h, d1, d2, d3 = derivatives3(module, z0)
    d = zd.shape[1]
    H = _buffer(N, d + 2, w, z0.dtype, z0.device)
    H[:, 0, :w] = h
    torch.mul(d1[:, None], zd, out=H[:, 1 : d + 1, :w])
    if sq is None:
        sel = zd if mask is None else zd[:, mask]
        sq = (sel * sel).sum(1)
    lap = d2 * sq
    H[:, d + 1, :w] = lap if zl is None else lap + d1 * zl
    return H, _Act(d1, d2, d3, zd, zl, sq)


def _act_backward(a: _Act, G: Tensor, mask: Mask) -> Tensor:
    """``d r / d z`` ``[N, S, w]`` from ``d r / d h`` ``G [N, S, w]`` (closed form)."""
    if a.zd is None:
        return G * a.d1[:, None]
    assert a.d2 is not None and a.d3 is not None and a.sq is not None
    d = a.zd.shape[1]
    G0, Gd, GL = G[:, 0], G[:, 1 : d + 1], G[:, d + 1]
    out = torch.empty_like(G)
    torch.mul(GL, a.d1, out=out[:, d + 1])
    torch.mul(Gd, a.d1[:, None], out=out[:, 1 : d + 1])
    t = 2 * a.d2 * GL  # [N, w]
    if mask is None:
        out[:, 1 : d + 1] += a.zd * t[:, None]
    else:
        sel = out[:, 1 : d + 1]
        sel[:, mask] += a.zd[:, mask] * t[:, None]
    c = a.d3 * a.sq if a.zl is None else a.d3 * a.sq + a.d2 * a.zl
    out[:, 0] = a.d1 * G0 + a.d2 * (a.zd * Gd).sum(1) + GL * c
    return out


def _top_gradient(
    T: Tensor, X: Tensor, order: int, residual: Callable[[Tensor, TaylorResult], Tensor] | None
) -> tuple[Tensor, Tensor]:
    """The residual ``[N]`` and its gradient in the network's outputs ``T [N, S, 1]``."""
    if residual is None:  # boundary: r = u - data is handled by the caller
        return T[:, 0, 0], torch.ones_like(T)
    with torch.enable_grad():
        leaf = T.detach().requires_grad_(True)
        res = TaylorResult(leaf[:, 0], leaf[:, 1:-1, 0], leaf[:, -1]) if order else None
        assert res is not None
        r = residual(X, res)[:, 0]
        (G,) = torch.autograd.grad(r.sum(), leaf)
    return r.detach(), G


def residual_pass(
    model: nn.Module,
    X: Tensor,
    residual: Callable[[Tensor, TaylorResult], Tensor] | None,
    laplace_dims: Sequence[int] | None = None,
) -> ResidualPass:
    """Residuals, layer inputs and output gradients of an MLP in closed form (no autograd
    through the network).

    Args:
        model: an MLP accepted by :func:`~beyondgrad.pinn.forward_laplacian`.
        X: ``[N, d]`` points.
        residual: ``(X, TaylorResult) -> [N, 1]``, affine per point in (value, gradient,
            Laplacian); ``None`` for a value-only pass whose residual is ``u`` itself
            (``S = 1``; subtract the data from ``r`` afterwards, ``g`` is unchanged).
        laplace_dims: the coordinates the Laplacian sums over (``None``: all).

    Returns:
        A :class:`ResidualPass` (all tensors detached).
    """
    order = 0 if residual is None else 2
    mask = _mask(X.shape[1], laplace_dims, X.device)
    modules = layers_of(model)
    with torch.no_grad():
        T, Zs, saved = _forward(modules, X, order, mask)
        if T.shape[2] != 1:
            raise ValueError(f"the network must have one output, it has {T.shape[2]}")
        r, G = _top_gradient(T, X, order, residual)
        gs = _backward(modules, G, saved, mask)
    return ResidualPass(r, Zs, gs)


def _split(T: Tensor, order: int) -> tuple:
    """``(z0, zd, zl, sq)`` views of a stacked ``[N, S, w]`` (``zd`` ``None`` for order 0)."""
    if not order:
        return (T[:, 0], None, None, None)
    return (T[:, 0], T[:, 1:-1], T[:, -1], None)


def _forward(modules: list[nn.Module], X: Tensor, order: int, mask: Mask) -> tuple:
    """The closed-form forward: network output ``[N, S, out]``, linear inputs, saved tensors.

    Between modules the state is either ``parts`` (the un-stacked output of the first linear
    layer, whose derivative rows broadcast over points), ``T`` (a linear layer's stacked
    output) or ``H`` (an activation's buffer with the bias column)."""
    Zs: list[Tensor] = []
    saved: list[_Act | None] = []
    parts: tuple | None = None
    T: Tensor | None = None
    H: Tensor | None = None
    for k, module in enumerate(modules):
        if isinstance(module, nn.Linear):
            has_b = module.bias is not None
            if k == 0:
                Z = _augmented_initial(X, order, has_b)
            elif H is not None and has_b:
                Z = H
            else:
                prev = H[..., :-1] if H is not None else (T if T is not None else _stack(parts))
                Z = torch.cat([prev, _bias_col(prev)], 2) if has_b else prev
            Zs.append(Z)
            saved.append(None)
            H, parts, T = None, None, None
            if k == 0 and order:  # derivative outputs: the weight's columns; Laplacian: 0
                W = module.weight.detach()
                z0 = X @ W.T if not has_b else torch.addmm(module.bias.detach(), X, W.T)
                parts = (z0, W.T[None], None, None)
            else:
                T = (Z.reshape(-1, Z.shape[2]) @ _weight(module).T).reshape(*Z.shape[:2], -1)
        else:
            if parts is None:
                src = T if T is not None else H[..., :-1]  # type: ignore[index]
                parts = _split(src, order)
            H, act = _act_forward(module, parts, mask)
            parts, T = None, None
            saved.append(act)
    if T is None:
        T = H[..., :-1] if H is not None else _stack(parts)
    return T, Zs, saved


def _bias_col(T: Tensor) -> Tensor:
    col = torch.zeros(*T.shape[:2], 1, dtype=T.dtype, device=T.device)
    col[:, 0] = 1.0
    return col


def _stack(parts: tuple | None) -> Tensor:
    """The stacked ``[N, S, w]`` form of the first linear layer's un-stacked output."""
    assert parts is not None
    z0, zd, zl, _ = parts
    N = z0.shape[0]
    zd = zd.expand(N, *zd.shape[1:])
    return torch.cat([z0[:, None], zd, (torch.zeros_like(z0) if zl is None else zl)[:, None]], 1)


def _backward(modules: list[nn.Module], G: Tensor, saved: list, mask: Mask) -> list[Tensor]:
    """The closed-form backward: per linear layer the output gradients ``[N, S, out]``."""
    gs: list[Tensor] = []
    for k in range(len(modules) - 1, -1, -1):
        module = modules[k]
        if isinstance(module, nn.Linear):
            gs.append(G)
            if k > 0:
                N, S, out = G.shape
                G = (G.reshape(-1, out) @ module.weight.detach()).reshape(N, S, -1)
        else:
            G = _act_backward(saved[k], G, mask)
    return gs[::-1]
