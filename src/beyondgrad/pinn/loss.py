"""The PINN loss, its gradient, its Gauss-Newton matrix (Gramian) and KFAC factors.

The loss of a network ``u_theta`` on interior points ``x_n`` (``N``) and boundary points ``x_b``
(``N_b``) is

``L = 1/(2 N) sum_n r_n^2 + 1/(2 N_b) sum_b (u_theta(x_b) - g(x_b))^2``

with the interior residual ``r_n`` of the :class:`~beyondgrad.pinn.PDE`. Its Gramian is
``G = 1/N J^T J + 1/N_b J_b^T J_b`` (``J``, ``J_b``: the Jacobians of the residuals in the
parameters).

**Parameter layout.** Vectors over the parameters are lists of *blocks*, one
``[out, in + 1]`` matrix ``[W | b]`` per linear layer in forward order (``[out, in]`` without
bias); flat vectors concatenate the row-major flattened blocks.

**Taylor-axis factorization.** Every linear layer sees ``S`` input vectors ``Z_{n,s}``
(bias column appended) and produces ``S`` outputs; with ``g_{n,s} = d r_n / d z_{n,s}`` the
layer's Jacobian row is ``J_n = sum_s g_{n,s} Z_{n,s}^T``. One backward of ``sum_n r_n`` gives
every ``g_{n,s}`` (point ``n``'s residual only depends on point ``n``), hence the gradient,
Jacobian-vector products, the exact Gramian and the KFAC factors (:class:`Evaluation`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, jvp, vjp

from .fused import residual_pass
from .problems import PDE
from .taylor import linear_layers, taylor_forward

Blocks = list[Tensor]


@dataclass
class Evaluation:
    """One forward-Laplacian pass and one backward at the current parameters.

    Attributes:
        loss: the loss value (float).
        r: ``[N]`` interior residuals.
        r_b: ``[N_b]`` boundary residuals.
        Z: per linear layer ``[N, S, in + 1]`` interior inputs (bias column appended).
        g: per linear layer ``[N, S, out]`` gradients of ``r_n`` in the layer's outputs.
        Z_b: per linear layer ``[N_b, 1, in + 1]`` boundary inputs.
        g_b: per linear layer ``[N_b, 1, out]`` gradients of the boundary residuals.
        initial: ``Z[0]`` holds the network's Taylor inputs (``x``, the unit vectors, a zero
            Laplacian; :func:`~beyondgrad.pinn.fused.residual_pass`): the first layer's
            products then skip the unit and zero rows (same results, less work).
    """

    loss: float
    r: Tensor
    r_b: Tensor
    Z: Blocks
    g: Blocks
    Z_b: Blocks
    g_b: Blocks
    initial: bool = False

    def _terms(self) -> list[tuple[Blocks, Blocks, int]]:
        return [(self.Z, self.g, self.r.shape[0]), (self.Z_b, self.g_b, self.r_b.shape[0])]

    def gradient(self) -> Blocks:
        """The loss gradient.

        Returns:
            Blocks ``[out, in + 1]`` per layer.
        """
        return self.transpose_product(self.r, self.r_b)

    def transpose_product(self, w: Tensor, w_b: Tensor) -> Blocks:
        """``1/N J^T w + 1/N_b J_b^T w_b``.

        Args:
            w: ``[N]`` weights of the interior residuals.
            w_b: ``[N_b]`` weights of the boundary residuals.

        Returns:
            Blocks ``[out, in + 1]`` per layer.
        """
        out = [
            torch.zeros(g.shape[2], Z.shape[2], dtype=w.dtype, device=w.device)
            for Z, g in zip(self.Z, self.g)
        ]
        for (Zs, gs, n), weights in zip(self._terms(), (w, w_b)):
            scale = (weights / n)[:, None, None]
            for k, (Z, g) in enumerate(zip(Zs, gs)):
                if k == 0 and self.initial and Z.shape[1] > 1:
                    out[k] = out[k] + _initial_transpose(Z, g, weights / n)
                    continue
                if Z.shape[2] <= g.shape[2]:  # weight the smaller of the two tensors
                    g2, Z2 = g.reshape(-1, g.shape[2]), (Z * scale).reshape(-1, Z.shape[2])
                else:
                    g2, Z2 = (g * scale).reshape(-1, g.shape[2]), Z.reshape(-1, Z.shape[2])
                out[k] = out[k] + g2.T @ Z2
        return out

    def jvp(self, v: Blocks) -> tuple[Tensor, Tensor]:
        """Jacobian-vector products of the residuals.

        Args:
            v: blocks ``[out, in + 1]`` per layer.

        Returns:
            ``(J v [N], J_b v [N_b])``.
        """
        Jv, Jbv = self.jvps([v])
        return Jv[0], Jbv[0]

    def jvps(self, vs: Sequence[Blocks]) -> tuple[Tensor, Tensor]:
        """Jacobian-vector products of the residuals for several vectors at once.

        Args:
            vs: ``k`` vectors, each blocks ``[out, in + 1]`` per layer.

        Returns:
            ``(J V [k, N], J_b V [k, N_b])``.
        """
        per_layer = self.layer_jvps(vs)
        return sum(p[0] for p in per_layer), sum(p[1] for p in per_layer)  # type: ignore[return-value]

    def layer_jvps(self, vs: Sequence[Blocks]) -> list[tuple[Tensor, Tensor]]:
        """Each layer's term of the Jacobian-vector products: ``J_l v_l`` (the Jacobian's
        columns of layer ``l`` times ``v``'s block ``l``), summing to :meth:`jvps`.

        Args:
            vs: ``k`` vectors, each blocks ``[out, in + 1]`` per layer.

        Returns:
            Per layer ``(J_l V [k, N], J_{b,l} V [k, N_b])``.
        """
        out = []
        for layer in range(len(self.Z)):
            V = torch.stack([v[layer] for v in vs])  # [k, out, in + 1]
            inner = _initial_jvps if layer == 0 and self.initial else _layer_jvps
            out.append(
                (
                    inner(self.Z[layer], self.g[layer], V),
                    _layer_jvps(self.Z_b[layer], self.g_b[layer], V),
                )
            )
        return out

    def gramian_vector_product(self, v: Blocks) -> Blocks:
        """``G v = 1/N J^T J v + 1/N_b J_b^T J_b v`` (exact, all layers coupled).

        Args:
            v: blocks ``[out, in + 1]`` per layer.

        Returns:
            Blocks ``[out, in + 1]`` per layer.
        """
        return self.transpose_product(*self.jvp(v))

    def jacobians(self) -> tuple[Tensor, Tensor]:
        """The residuals' Jacobians in the flat parameter layout.

        Returns:
            ``(J [N, P], J_b [N_b, P])``.
        """
        J = [torch.einsum("nso,nsi->noi", g, Z).flatten(1) for Z, g in zip(self.Z, self.g)]
        Jb = [torch.einsum("nso,nsi->noi", g, Z).flatten(1) for Z, g in zip(self.Z_b, self.g_b)]
        return torch.cat(J, 1), torch.cat(Jb, 1)

    def gramian(self) -> Tensor:
        """The dense Gramian ``1/N J^T J + 1/N_b J_b^T J_b`` (small networks only).

        Returns:
            ``[P, P]``.
        """
        J, Jb = self.jacobians()
        return J.T @ J / J.shape[0] + Jb.T @ Jb / Jb.shape[0]

    def kfac_factors(self, approx: str = "expand") -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
        """KFAC factors per layer: KFAC-expand (or -reduce) over the Taylor axis for the
        interior term, standard KFAC for the boundary term.

        ``approx="expand"``: ``A = 1/(N S) sum_{n,s} Z Z^T``, ``B = 1/N sum_{n,s} g g^T``;
        ``approx="reduce"``: ``A = 1/(N S^2) sum_n z z^T``, ``B = 1/N sum_n h h^T`` with the
        Taylor-axis sums ``z = sum_s Z_{n,s}``, ``h = sum_s g_{n,s}`` (both exact for ``S = 1``).
        Boundary: ``A_b = 1/N_b sum_b z z^T``, ``B_b = 1/N_b sum_b g g^T``. The layer's Gramian
        block is approximated by ``B kron A + B_b kron A_b`` (row-major ``[W | b]``).

        Args:
            approx: ``"expand"`` or ``"reduce"`` (the interior term's Taylor axis).

        Returns:
            Per layer ``(A [in+1, in+1], B [out, out], A_b [in+1, in+1], B_b [out, out])``.

        Raises:
            ValueError: an unknown ``approx``.
        """
        if approx not in ("expand", "reduce"):
            raise ValueError(f"approx must be 'expand' or 'reduce', got {approx!r}")
        out = []
        for Z, g, Zb, gb in zip(self.Z, self.g, self.Z_b, self.g_b):
            N, S = Z.shape[:2]
            if approx == "expand":
                A, B = _gram(Z) / (N * S), _gram(g) / N
            else:
                A, B = _gram(Z.sum(1, keepdim=True)) / (N * S**2), _gram(g.sum(1, keepdim=True)) / N
            out.append((A, B, _gram(Zb) / Zb.shape[0], _gram(gb) / gb.shape[0]))
        return out


def _layer_jvps(Z: Tensor, g: Tensor, V: Tensor) -> Tensor:
    """``sum_{s,o,i} g[n,s,o] V[k,o,i] Z[n,s,i]`` as ``[k, N]``, through the smaller of the
    intermediates ``Z V^T`` ``[N, S, k out]`` and ``g V`` ``[N, S, k in]``."""
    N, S, o = g.shape
    k, i = V.shape[0], Z.shape[2]
    if o <= i:
        ZV = (Z.reshape(-1, i) @ V.reshape(k * o, i).T).reshape(N, S, k, o)
        return torch.einsum("nsko,nso->kn", ZV, g)
    gV = (g.reshape(-1, o) @ V.transpose(0, 1).reshape(o, k * i)).reshape(N, S, k, i)
    return torch.einsum("nski,nsi->kn", gV, Z)


def _initial_transpose(Z: Tensor, g: Tensor, w: Tensor) -> Tensor:
    """``sum_{n,s} w_n g[n,s] Z[n,s]^T`` ``[out, d (+1)]`` for the Taylor inputs
    ``Z [N, S, d (+1)]`` (rows ``x``, ``e_1 .. e_d``, ``0``): the value row, plus
    ``sum_n w_n g[n,i]`` in column ``i``."""
    N, S, o = g.shape
    d = S - 2
    out = (g[:, 0] * w[:, None]).T @ Z[:, 0]
    out[:, :d] += (w @ g[:, 1 : d + 1].reshape(N, d * o)).reshape(d, o).T
    return out


def _initial_jvps(Z: Tensor, g: Tensor, V: Tensor) -> Tensor:
    """:func:`_layer_jvps` for the Taylor inputs (see :func:`_initial_transpose`): ``[k, N]``."""
    N, S, o = g.shape
    d, k = S - 2, V.shape[0]
    ZV = (Z[:, 0] @ V.reshape(k * o, -1).T).reshape(N, k, o)
    value = torch.einsum("nko,no->kn", ZV, g[:, 0])
    Vd = V[:, :, :d].permute(2, 1, 0).reshape(d * o, k)
    return value + (g[:, 1 : d + 1].reshape(N, d * o) @ Vd).T


def _gram(T: Tensor) -> Tensor:
    """``sum_{n,s} t_{n,s} t_{n,s}^T`` of ``T [N, S, k]`` as ``[k, k]``."""
    flat = T.reshape(-1, T.shape[2])
    return flat.T @ flat


class PINNLoss:
    """The PINN loss of a network on fixed interior and boundary points.

    Args:
        model: an MLP accepted by :func:`~beyondgrad.pinn.forward_laplacian`.
        pde: the problem (residual, exact solution for the boundary data).
        X: ``[N, d]`` interior points.
        X_b: ``[N_b, d]`` boundary points.
    """

    def __init__(self, model: nn.Module, pde: PDE, X: Tensor, X_b: Tensor) -> None:
        self.model, self.pde, self.X, self.X_b = model, pde, X, X_b
        self.layers = list(linear_layers(model))
        self.u_b = pde.exact(X_b).detach()
        ids = {id(p): name for name, p in model.named_parameters()}
        self._names = [
            (ids[id(m.weight)], None if m.bias is None else ids[id(m.bias)]) for m in self.layers
        ]

    def residuals(self) -> tuple[Tensor, Tensor]:
        """The interior and boundary residuals (differentiable).

        Returns:
            ``(r [N], r_b [N_b])``.
        """
        res = taylor_forward(self.model, self.X, self.pde.laplace_dims)
        r = self.pde.residual(self.X, res)[:, 0]
        return r, (self.model(self.X_b) - self.u_b)[:, 0]

    def value(self) -> Tensor:
        """The loss (differentiable in the parameters).

        Returns:
            A scalar tensor.
        """
        r, r_b = self.residuals()
        return 0.5 * (r**2).mean() + 0.5 * (r_b**2).mean()

    def evaluate(self) -> Evaluation:
        """One forward-Laplacian pass and its backward, both in closed form
        (:func:`~beyondgrad.pinn.fused.residual_pass`; see :class:`Evaluation`).

        Returns:
            The :class:`Evaluation` at the current parameters.
        """
        inner = residual_pass(self.model, self.X, self.pde.residual, self.pde.laplace_dims)
        bound = residual_pass(self.model, self.X_b, None)
        r, r_b = inner.r, bound.r - self.u_b[:, 0]
        return Evaluation(
            loss=float(0.5 * (r**2).mean() + 0.5 * (r_b**2).mean()),
            r=r,
            r_b=r_b,
            Z=inner.Z,
            g=inner.g,
            Z_b=bound.Z,
            g_b=bound.g,
            initial=True,
        )

    def backward(self) -> Tensor:
        """The loss, with its gradient *added* to the parameters' ``.grad`` as
        ``value().backward()`` would, but from the closed-form pass (:meth:`evaluate`; no
        autograd graph): the fast closure for any ``torch.optim`` optimizer
        (``opt.zero_grad(); return loss.backward()``).

        Returns:
            The loss, a detached scalar tensor.
        """
        ev = self.evaluate()
        for m, B in zip(self.layers, ev.gradient()):
            parts = (
                [(m.weight, B)] if m.bias is None else [(m.weight, B[:, :-1]), (m.bias, B[:, -1])]
            )
            for p, g in parts:
                if not p.requires_grad:
                    continue
                if p.grad is None:
                    p.grad = g.contiguous().clone()
                else:
                    p.grad.add_(g)
        return torch.tensor(ev.loss, dtype=ev.r.dtype, device=ev.r.device)

    # ---- parameters in the block layout --------------------------------------------------

    def blocks(self) -> Blocks:
        """The current parameters as blocks ``[W | b]`` (copies).

        Returns:
            Blocks ``[out, in + 1]`` per layer.
        """
        return [self._block(m.weight, m.bias) for m in self.layers]

    @staticmethod
    def _block(W: Tensor, b: Tensor | None) -> Tensor:
        return W.detach().clone() if b is None else torch.cat([W.detach(), b.detach()[:, None]], 1)

    @torch.no_grad()
    def set_blocks(self, blocks: Sequence[Tensor]) -> None:
        """Write parameters given as blocks into the model.

        Args:
            blocks: ``[out, in + 1]`` per layer.
        """
        for m, B in zip(self.layers, blocks):
            if m.bias is None:
                m.weight.copy_(B)
            else:
                m.weight.copy_(B[:, :-1])
                m.bias.copy_(B[:, -1])

    def _to_dict(self, blocks: Sequence[Tensor]) -> dict[str, Tensor]:
        out = {}
        for (wn, bn), B in zip(self._names, blocks):
            out[wn] = B if bn is None else B[:, :-1]
            if bn is not None:
                out[bn] = B[:, -1]
        return out

    # ---- torch.func reference implementations -------------------------------------------

    def _functional(self, params: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        return functional_call(
            _Residuals(self), {f"loss_model.{k}": v for k, v in params.items()}, ()
        )

    def func_gramian_vector_product(self, v: Blocks) -> Blocks:
        """``G v`` by ``J v`` (``torch.func.jvp``) and ``J^T (J v)`` (``torch.func.vjp``) of the
        residuals in the parameters: exact, independent of the Taylor-axis factorization.

        Args:
            v: blocks ``[out, in + 1]`` per layer.

        Returns:
            Blocks ``[out, in + 1]`` per layer.
        """
        params = self._to_dict(self.blocks())
        tangents = self._to_dict(v)
        _, (Jv, Jbv) = jvp(self._functional, (params,), (tangents,))
        _, pullback = vjp(self._functional, params)
        (grad,) = pullback((Jv / Jv.shape[0], Jbv / Jbv.shape[0]))
        return [self._block(grad[wn], None if bn is None else grad[bn]) for wn, bn in self._names]

    def func_gramian(self) -> Tensor:
        """The dense Gramian from full Jacobians (``torch.func.jacrev``; small networks).

        Returns:
            ``[P, P]`` in the flat block layout.
        """
        J, Jb = jacrev(self._functional)(self._to_dict(self.blocks()))

        def flat(jac: dict[str, Tensor]) -> Tensor:
            n = next(iter(jac.values())).shape[0]
            cols = [
                torch.cat([jac[wn], jac[bn][..., None]], 2) if bn else jac[wn]
                for wn, bn in self._names
            ]
            return torch.cat([c.reshape(n, -1) for c in cols], 1)

        Jf, Jbf = flat(J), flat(Jb)
        return Jf.T @ Jf / Jf.shape[0] + Jbf.T @ Jbf / Jbf.shape[0]


class _Residuals(nn.Module):
    """Wraps a loss so that ``torch.func.functional_call`` can swap its model's parameters."""

    def __init__(self, loss: PINNLoss) -> None:
        super().__init__()
        self.loss_model = loss.model
        self._loss = loss

    def forward(self) -> tuple[Tensor, Tensor]:
        return self._loss.residuals()


def flatten(blocks: Sequence[Tensor]) -> Tensor:
    """Concatenate blocks into the flat parameter layout.

    Args:
        blocks: ``[out, in + 1]`` per layer.

    Returns:
        ``[P]``.
    """
    return torch.cat([B.reshape(-1) for B in blocks])


def unflatten(vector: Tensor, like: Sequence[Tensor]) -> Blocks:
    """Split a flat vector into blocks shaped like ``like``.

    Args:
        vector: ``[P]``.
        like: blocks giving the shapes.

    Returns:
        Blocks with the shapes of ``like``.
    """
    sizes = [B.numel() for B in like]
    return [v.reshape(B.shape) for v, B in zip(torch.split(vector, sizes), like)]


def dot(u: Sequence[Tensor], v: Sequence[Tensor]) -> Tensor:
    """Inner product of two block vectors.

    Args:
        u: blocks.
        v: blocks of the same shapes.

    Returns:
        A scalar tensor.
    """
    return sum((a * b).sum() for a, b in zip(u, v))  # type: ignore[return-value]
