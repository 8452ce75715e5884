"""HessMaxEV: the largest Hessian eigenvalue of the step's loss, by Lanczos on exact
Hessian-vector products (double backward through the step's own graph), or a clear refusal.

A double backward is exact only when every operation on the way has a true second derivative.
Two kinds of operation break that: a custom ``autograd.Function`` whose backward is marked
``@once_differentiable`` (autograd then silently drops its second-derivative terms: the
products come out wrong without an error), and kernels without a double-backward formula
(autograd raises, e.g. fused attention). Before computing anything, the autograd graph of the
loss and of its gradient is searched for both; either one makes :func:`largest_eigenvalue`
raise :class:`HessianUnavailable` naming it. Fused scaled-dot-product attention is avoided up
front: :func:`twice_differentiable_kernels` runs the forward pass with PyTorch's composite
(math) attention, as the curvature operators do.

Not detectable from the graph: a custom ``autograd.Function`` whose backward is not marked
but computes its result outside autograd (``.detach()``, ``torch.no_grad()``); such a model
gets products without that function's second-derivative terms.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..linalg.eigen import top_eigenpair
from ..linops.base import LinearOperator

#: the code object every ``@once_differentiable`` backward shares
_ONCE_DIFFERENTIABLE = once_differentiable(lambda ctx, g: g).__code__
#: autograd nodes standing for a derivative that does not exist
_NO_DERIVATIVE = ("Error", "DelayedError", "NotImplemented")


class HessianUnavailable(RuntimeError):
    """Exact Hessian-vector products are not available for this model (the message says why)."""


@contextmanager
def twice_differentiable_kernels() -> Iterator[None]:
    """Run attention through PyTorch's composite (math) kernel, which has a double backward
    (the fused flash / memory-efficient kernels have none)."""
    with sdpa_kernel([SDPBackend.MATH]):
        yield


def _obstacle(node: Any) -> str | None:
    name = type(node).__name__
    if name in _NO_DERIVATIVE:
        near = sorted({type(n).__name__ for n, _ in node.next_functions if n is not None})
        where = f" (next to {', '.join(near)})" if near else ""
        return f"an operation without a second derivative{where}"
    cls = getattr(type(node), "_forward_cls", None)
    backward = getattr(cls, "backward", None)
    if getattr(backward, "__code__", None) is _ONCE_DIFFERENTIABLE:
        return f"the custom autograd.Function {cls.__name__} (its backward is @once_differentiable)"
    return None


def second_derivative_obstacle(roots: list[Any]) -> str | None:
    """The first operation in the autograd graphs of ``roots`` (grad_fn nodes) whose second
    derivative autograd cannot form exactly, described in words; None when there is none."""
    seen: set[Any] = set()
    stack = [r for r in roots if r is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        found = _obstacle(node)
        if found is not None:
            return found
        stack.extend(n for n, _ in node.next_functions if n is not None)
    return None


def _probe(params: list[Tensor], grads: list[Tensor]) -> str:
    """The error autograd raises on one Hessian-vector product (it names the operation),
    as a suffix for a message; empty if none is raised."""
    outs = [g for g in grads if g.requires_grad]
    try:
        torch.autograd.grad(
            outs, params, [torch.ones_like(g) for g in outs], retain_graph=True, allow_unused=True
        )
    except RuntimeError as err:
        return f" ({err})"
    return ""


class HessianOfGraph(LinearOperator):
    """Hessian-vector products by double backward through a kept gradient graph.

    Args:
        params: the parameters (flattened and concatenated in this order).
        grads: the loss gradients, formed with ``create_graph=True``.
    """

    symmetric = True

    def __init__(self, params: list[Tensor], grads: list[Tensor]):
        n = sum(p.numel() for p in params)
        super().__init__((n, n), params[0].dtype, params[0].device)
        keep = [i for i, g in enumerate(grads) if g.requires_grad]
        self.params, self.grads, self.keep = params, grads, keep

    def _matmat(self, M: Tensor) -> Tensor:
        cols = []
        for v in M.T:
            pieces = list(torch.split(v, [p.numel() for p in self.params]))
            hv = torch.autograd.grad(
                [self.grads[i] for i in self.keep],
                self.params,
                [pieces[i].view_as(self.grads[i]) for i in self.keep],
                retain_graph=True,
                allow_unused=True,
            )
            cols.append(
                torch.cat(
                    [(torch.zeros_like(p) if h is None else h).reshape(-1)
                     for h, p in zip(hv, self.params)]
                )
            )  # fmt: skip
        return torch.stack(cols, 1)


def largest_eigenvalue(
    loss: Tensor,
    params: list[Tensor],
    iters: int,
    generator: torch.Generator,
    warm: Warm | None = None,
    tol: float = 1e-2,
) -> tuple[float, float]:
    """The largest eigenvalue of the Hessian of ``loss`` w.r.t. ``params``, and how far
    Lanczos got.

    Args:
        loss: the step's loss, its graph still alive (it is kept).
        params: the trainable parameters.
        iters: at most that many Lanczos iterations (Hessian-vector products).
        generator: for Lanczos' start vector.
        warm: the top eigenvector of an earlier call, kept there: Lanczos starts from it plus
            a random tenth (converging in fewer products while the Hessian changes slowly).
        tol: stop once the top Ritz pair's residual is below ``tol`` times its value (times
            the largest Ritz value in magnitude, should a negative one be larger); the
            value itself is then accurate to about ``tol**2`` times its ratio to the spectral
            gap (measured on the benchmarks' cnn along SGD: within 0.05% of a 1e-4 solve at
            1e-2, in 9-11 products instead of 14-18 at 1e-3).

    Returns:
        ``(value, residual)``: the Ritz value (a lower bound converging from below) and its
        relative residual ``||H v - value v|| / |value|`` (for the unit Ritz vector ``v``): an
        eigenvalue of ``H`` lies within ``residual * |value|`` of ``value``. At most ``tol``
        when Lanczos converged; larger when it stopped at ``iters`` products (that eigenvalue
        may then not be the largest).

    Raises:
        HessianUnavailable: the double backward is impossible or would not be exact.
    """
    try:
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    except RuntimeError as err:
        raise HessianUnavailable(f"the gradient cannot be differentiated again: {err}") from err
    full = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
    obstacle = second_derivative_obstacle([loss.grad_fn, *(g.grad_fn for g in full)])
    if obstacle is not None:
        raise HessianUnavailable(
            f"Hessian-vector products through this model are not exact: its graph holds "
            f"{obstacle}{_probe(params, full)}"
        )
    if not any(g.requires_grad for g in full):
        return 0.0, 0.0  # the loss is linear in the parameters
    op = HessianOfGraph(params, full)
    try:
        start = (warm or Warm()).start(op.shape[0], op.dtype, op.device, generator)
        value, vector, residual = top_eigenpair(op, tol, iters, start)
        residual /= max(abs(value), torch.finfo(op.dtype).tiny)
    except RuntimeError as err:
        raise HessianUnavailable(f"a Hessian-vector product failed: {err}") from err
    if warm is not None:
        warm.vector = vector.detach()
    return value, residual


class Warm:
    """HessMaxEV's warm start: the top eigenvector of the last tracked step (flat, ``[D]``,
    on the parameters' device), or None."""

    def __init__(self) -> None:
        self.vector: Tensor | None = None

    def start(
        self, n: int, dtype: torch.dtype, device: torch.device, generator: torch.Generator
    ) -> Tensor:
        """Lanczos' start vector: a random vector drawn with ``generator`` (on its device),
        normalized and added to ten times the last eigenvector (unit) when there is one of
        length ``n``."""
        r = torch.randn(n, generator=generator, dtype=dtype, device=generator.device).to(device)
        if self.vector is None or self.vector.numel() != n:
            return r
        r = r / r.norm()
        v = self.vector.to(dtype)
        return v / v.norm().clamp_min(torch.finfo(dtype).tiny) * 10.0 + r


__all__ = [
    "HessianOfGraph",
    "HessianUnavailable",
    "Warm",
    "largest_eigenvalue",
    "second_derivative_obstacle",
    "twice_differentiable_kernels",
]
