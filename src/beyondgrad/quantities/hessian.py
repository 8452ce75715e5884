"""Residual terms of the Hessian for networks whose nonlinearities are element-wise.

For ``L(f(theta))`` built from operations that are linear in each argument (layers, sums,
views, pooling, piecewise-linear activations, products of factors depending on *disjoint*
parameter sets) and element-wise nonlinearities ``a = sigma(z)``, the Hessian is::

    H = GGN + sum_l J_{z_l}^T diag(delta_l * sigma''(z_l)) J_{z_l},   delta_l = dL/da_l

and the cross terms of a product whose factors depend on disjoint parameters lie off the
diagonal. So the Hessian diagonal is the GGN diagonal plus, per element-wise nonlinearity,
signed squared gradients of the one-hot vectors ``sqrt(|delta sigma''|) e_i`` backpropagated
from ``z_l`` (this module finds the ``z_l``; the engine backpropagates). Any other operation
between the parameters and the model output (normalization, softmax attention, a product of
factors that share parameters, a division by a parameter-dependent tensor) makes the
decomposition inexact: :func:`residual_sites` raises, naming the operation and the module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge

from ..engine import Backprop, Needs, ReduceContext, Statistics, VectorKind
from ..engine.losses import loss_vectors
from ..forms import Form
from .base import Quantity

# operations that are linear (or piecewise linear) in their differentiable inputs
_LINEAR = {
    "AddBackward0",
    "AddBackward1",
    "SubBackward0",
    "SubBackward1",
    "NegBackward0",
    "ViewBackward0",
    "UnsafeViewBackward0",
    "ReshapeAliasBackward0",
    "TBackward0",
    "TransposeBackward0",
    "TransposeBackward1",
    "PermuteBackward0",
    "ExpandBackward0",
    "SqueezeBackward0",
    "SqueezeBackward1",
    "SqueezeBackward2",
    "SqueezeBackward4",
    "UnsqueezeBackward0",
    "SumBackward0",
    "SumBackward1",
    "MeanBackward0",
    "MeanBackward1",
    "CloneBackward0",
    "CatBackward0",
    "SplitBackward0",
    "SplitWithSizesBackward0",
    "UnbindBackward0",
    "StackBackward0",
    "SelectBackward0",
    "SliceBackward0",
    "IndexBackward0",
    "IndexSelectBackward0",
    "GatherBackward0",
    "ConstantPadNdBackward0",
    "ReflectionPad1DBackward0",
    "ReflectionPad2DBackward0",
    "ReflectionPad3DBackward0",
    "ReplicationPad1DBackward0",
    "ReplicationPad2DBackward0",
    "ReplicationPad3DBackward0",
    "MaxPool1DWithIndicesBackward0",
    "MaxPool2DWithIndicesBackward0",
    "MaxPool3DWithIndicesBackward0",
    "AvgPool2DBackward0",
    "AvgPool3DBackward0",
    "AdaptiveAvgPool2DBackward0",
    "AdaptiveAvgPool3DBackward0",
    "AdaptiveMaxPool2DBackward0",
    "AdaptiveMaxPool3DBackward0",
    "ReluBackward0",
    "ThresholdBackward0",
    "LeakyReluBackward0",
    "HardtanhBackward0",
    "AsStridedBackward0",
    "FlipBackward0",
    "RollBackward0",
    "RepeatBackward0",
    "EmbeddingBackward0",
    "ToCopyBackward0",
    "MaskedFillBackward0",
    "WhereBackward0",
    "NativeDropoutBackward0",
    "CumsumBackward0",
    "AccumulateGrad",
    "MulBackward1",
    "DivBackward1",
    "NarrowBackward0",
    "ExpandAsBackward0",
    "AliasBackward0",
    "ReluBackward1",
    "Im2ColBackward0",
    "Col2ImBackward0",
    "SliceBackward1",
    "SelectBackward1",
    "UnfoldBackward0",
}
# products: bilinear, fine when the factors depend on disjoint parameter sets
_BILINEAR = {
    "MmBackward0",
    "AddmmBackward0",
    "BmmBackward0",
    "MulBackward0",
    "ConvolutionBackward0",
    "DotBackward0",
    "MvBackward0",
    "BaddbmmBackward0",
    "AddmvBackward0",
    "NativeBatchNormBackward0",
    "CudnnBatchNormBackward0",
    "MiopenBatchNormBackward0",
}


def _from_result(fn: Callable[[Tensor], Tensor]) -> Callable[[Any], Tensor]:
    return lambda node: fn(node._saved_result)


def _via_autograd(make: Callable[[Any], Callable[[Tensor], Tensor]]) -> Callable[[Any], Tensor]:
    """sigma'' by differentiating the element-wise function twice at the saved input."""

    def second(node: Any) -> Tensor:
        f = make(node)
        z = node._saved_self
        flat = z.detach().reshape(-1)
        d2 = torch.func.vmap(torch.func.grad(torch.func.grad(f)))(flat)
        return d2.reshape(z.shape)

    return second


# second derivatives sigma''(z) of element-wise nonlinearities, from the node's saved tensors
_SECOND: dict[str, Callable[[Any], Tensor]] = {
    "TanhBackward0": _from_result(lambda r: -2 * r * (1 - r * r)),
    "SigmoidBackward0": _from_result(lambda s: s * (1 - s) * (1 - 2 * s)),
    "ExpBackward0": _from_result(lambda r: r),
    "SqrtBackward0": _from_result(lambda r: -0.25 / r.pow(3)),
    "LogBackward0": lambda node: -1.0 / node._saved_self.pow(2),
    "SinBackward0": lambda node: -torch.sin(node._saved_self),
    "CosBackward0": lambda node: -torch.cos(node._saved_self),
    "PowBackward0": lambda node: (
        node._saved_exponent
        * (node._saved_exponent - 1)
        * node._saved_self.pow(node._saved_exponent - 2)
    ),
    "GeluBackward0": _via_autograd(lambda n: lambda t: F.gelu(t, approximate=n._saved_approximate)),
    "SiluBackward0": _via_autograd(lambda n: F.silu),
    "SoftplusBackward0": _via_autograd(
        lambda n: lambda t: F.softplus(t, n._saved_beta, n._saved_threshold)
    ),
    "EluBackward0": _via_autograd(
        lambda n: lambda t: n._saved_scale * F.elu(t * n._saved_input_scale, n._saved_alpha)
    ),
}


@dataclass
class ResidualSite:
    """An element-wise nonlinearity ``a = sigma(z)`` with parameters upstream: ``output_edge``
    (gradient w.r.t. ``a``), ``input_edge`` (to backpropagate from ``z``), ``second`` =
    ``sigma''(z)``."""

    name: str
    output_edge: GradientEdge
    input_edge: GradientEdge
    second: Tensor


def residual_sites(
    output: Tensor, params: set[int], where: Callable[[Any], str]
) -> list[ResidualSite]:
    """Classify every graph node between the parameters and ``output``; return the
    element-wise nonlinearities, raise on anything that breaks the decomposition. ``where``
    names the module of a node (for messages)."""
    if output.grad_fn is None:
        return []
    order, mask = _parameter_masks(output, params)
    sites: list[ResidualSite] = []
    for node in order:
        if mask[node] == 0:
            continue  # nothing trainable upstream
        site = _classify(node, mask, where)
        if site is not None:
            sites.append(site)
    return sites


def _parameter_masks(output: Tensor, params: set[int]) -> tuple[list[Any], dict[Any, int]]:
    """Graph nodes in post-order, and per node a bit mask of the parameters it depends on
    (bit i: the i-th parameter met)."""
    bits: dict[int, int] = {}
    order: list[Any] = []
    mask: dict[Any, int] = {}
    stack: list[tuple[Any, bool]] = [(output.grad_fn, False)]
    while stack:
        node, done = stack.pop()
        if done:
            m = 0
            variable = getattr(node, "variable", None)
            if variable is not None and id(variable) in params:
                m = 1 << bits.setdefault(id(variable), len(bits))
            for nxt, _ in node.next_functions:
                if nxt is not None:
                    m |= mask[nxt]
            mask[node] = m
            order.append(node)
            continue
        if node in mask:
            continue
        mask[node] = 0  # placeholder against revisits while pending
        stack.append((node, True))
        for nxt, _ in node.next_functions:
            if nxt is not None and nxt not in mask:
                stack.append((nxt, False))
    return order, mask


def _classify(node: Any, mask: dict[Any, int], where: Callable[[Any], str]) -> ResidualSite | None:
    """``None`` for a (piecewise) linear or admissible bilinear node, a site for an
    element-wise nonlinearity; raise for anything else."""
    kind = type(node).__name__
    if kind in _LINEAR:
        return None
    if kind in _BILINEAR:
        if kind == "NativeBatchNormBackward0" and getattr(node, "_saved_training", False):
            raise RuntimeError(
                f"DiagHessian: batch normalization in training mode in {where(node)} is not "
                "element-wise; call model.eval()"
            )
        seen = 0
        for m in (mask[n] for n, _ in node.next_functions if n is not None):
            if seen & m:
                raise RuntimeError(
                    f"DiagHessian: {kind} in {where(node)} multiplies factors that depend "
                    "on the same parameters (e.g. gating or attention); its curvature is "
                    "not element-wise, so the exact Hessian diagonal is not available "
                    "through this engine. Use DiagGGN or the Hessian operators."
                )
            seen |= m
        return None
    if kind in _SECOND:
        z_node = node.next_functions[0]
        if z_node[0] is None or mask[z_node[0]] == 0:
            return None
        return ResidualSite(kind, GradientEdge(node, 0), GradientEdge(*z_node), _SECOND[kind](node))
    raise RuntimeError(
        f"DiagHessian: operation {kind} in {where(node)} is not element-wise or linear "
        "(e.g. LayerNorm, softmax attention, division by a learned quantity); the exact "
        "Hessian diagonal is not available through this engine. Use DiagGGN, or the "
        "Hessian operators."
    )


_HESSCALE_ACTIVATIONS = {
    nn.Tanh: lambda z: (1 - torch.tanh(z) ** 2, -2 * torch.tanh(z) * (1 - torch.tanh(z) ** 2)),
    nn.Sigmoid: lambda z: (
        torch.sigmoid(z) * (1 - torch.sigmoid(z)),
        torch.sigmoid(z) * (1 - torch.sigmoid(z)) * (1 - 2 * torch.sigmoid(z)),
    ),
    nn.ReLU: lambda z: ((z > 0).to(z.dtype), torch.zeros_like(z)),
}


def hesscale(model: nn.Module, loss_fn: nn.Module, X: Tensor, y: Tensor) -> dict[str, Tensor]:
    """The HesScale approximation of the Hessian diagonal (Elsayed et al., 2024), a heuristic:
    the exact diagonal of the loss Hessian w.r.t. the model output is propagated backwards
    through ``nn.Sequential`` layers keeping only diagonals (``h_x = (W*W)^T h_z`` through
    ``nn.Linear``, ``h_z = s'(z)^2 h_a + s''(z) dL/da`` through ``Tanh``/``Sigmoid``/``ReLU``),
    and ``h_W = h_z (x*x)^T``. Exact for the last layer's parameters; otherwise an
    approximation with no error bound."""
    if not isinstance(model, nn.Sequential):
        raise NotImplementedError("DiagHessian(method='hesscale') supports nn.Sequential models")
    layers = list(model.named_children())
    for name, m in layers:
        if not isinstance(m, (nn.Linear, nn.Flatten, nn.Identity, *_HESSCALE_ACTIVATIONS)):
            raise NotImplementedError(
                f"DiagHessian(method='hesscale'): layer '{name}' ({type(m).__name__}) is not "
                "supported (Linear, Flatten, Tanh, Sigmoid, ReLU)"
            )
    inputs: list[Tensor] = []
    outputs: list[Tensor] = []
    h = X
    with torch.enable_grad():
        for _, m in layers:
            inputs.append(h)
            h = m(h)
            outputs.append(h)
        out = h
        loss = loss_fn(out, y)
        deltas = torch.autograd.grad(loss, outputs, allow_unused=True)  # dL / d(layer output)
    V = loss_vectors(loss_fn, out.detach(), y, "exact")  # [K, N, C]
    h_diag = V.pow(2).sum(0)  # exact diagonal of d2L/df2 per sample
    result: dict[str, Tensor] = {}
    for i in range(len(layers) - 1, -1, -1):
        name, m = layers[i]
        x = inputs[i].detach()
        if isinstance(m, nn.Linear):
            xs = x.reshape(-1, m.in_features)
            hs = h_diag.reshape(-1, m.out_features)
            result[f"{name}.weight"] = hs.T @ xs.pow(2)
            if m.bias is not None:
                result[f"{name}.bias"] = hs.sum(0)
            h_diag = (hs @ m.weight.detach().pow(2)).reshape(x.shape)
        elif isinstance(m, (nn.Flatten, nn.Identity)):
            h_diag = h_diag.reshape(x.shape)
        else:
            d1, d2 = _HESSCALE_ACTIVATIONS[type(m)](x)
            delta_a = deltas[i]
            h_diag = d1.pow(2) * h_diag + (d2 * delta_a if delta_a is not None else 0)
    return result


@dataclass(frozen=True)
class DiagHessian(Quantity):
    """The exact diagonal of the Hessian, parameter-shaped, for models whose nonlinearities
    are element-wise (activations such as tanh, sigmoid, ELU, softplus, GELU; piecewise-linear
    ops; residual adds; pooling; products of factors with disjoint parameters): the GGN
    diagonal plus the residual terms of every element-wise nonlinearity, backpropagated
    through the same engine (so residual networks work). Any other nonlinearity between the
    parameters and the output (LayerNorm, attention, gating) raises an error naming it.

    Args:
        max_vectors: bounds both the loss-Hessian vectors and the ``2 x layers`` residual
            vectors of each nonlinearity per sample.
        method: ``"exact"``, or ``"hesscale"`` for the HesScale approximation (a heuristic,
            exact only for the last layer; ``nn.Sequential`` of Linear/Tanh/Sigmoid/ReLU/
            Flatten; needs ``bg.compute``): about the cost of one backward pass, no error bound.
    """

    max_vectors: int = 4096
    method: str = "exact"
    per_sample: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.method not in ("exact", "hesscale"):
            raise ValueError(f"method must be 'exact' or 'hesscale', got {self.method!r}")

    @property
    def vectors(self) -> VectorKind:
        """Exact loss-Hessian vectors."""
        return ("exact", 0)

    @property
    def separate_pass(self) -> bool:
        """HesScale runs its own recursion."""
        return self.method == "hesscale"

    def needs(self) -> Needs:
        """Exact loss-Hessian vectors, and residual vectors from inside the network."""
        return Needs(kinds=(self.vectors,), max_vectors=self.max_vectors, inside=True)

    def reduce(self, form: Form, ctx: ReduceContext, out: Tensor | None = None) -> Tensor:
        """The GGN part; :meth:`compute` adds the residual terms.

        Args:
            form: the parameter's form (whole batch).
            ctx: batch size and loss reduction (unused).
            out: ignored; a new tensor is returned.

        Returns:
            Parameter-shaped GGN diagonal.
        """
        return form.sum_grad_squared()

    def prepare(
        self, graph: Backprop, loss: Tensor, output: Tensor, names: dict[int, str]
    ) -> dict[str, Tensor]:
        """Per parameter name, the residual part of the Hessian diagonal (the signed squared
        gradients of the one-hot vectors of every element-wise nonlinearity), computed on the
        live graph before the engine's main backward pass.

        Args:
            graph: the recorded graph of the batch.
            loss: the scalar loss (its graph is retained).
            output: the model output.
            names: ``{id(parameter): name}``.

        Returns:
            ``{parameter name: parameter-shaped residual}`` (empty without nonlinearities).
        """
        params = {id(p) for u, _ in graph.calls for p in u.params.values()}
        sites = residual_sites(output, params, graph.locate)
        if not sites:
            return {}
        deltas = torch.autograd.grad(loss, [s.output_edge for s in sites], retain_graph=True)
        residual: dict[str, Tensor] = {}
        for site, delta in zip(sites, deltas):
            for pid, value in self._site_residual(graph, site, delta).items():
                name = names[pid]
                residual[name] = residual[name] + value if name in residual else value
        return residual

    def _site_residual(self, graph: Backprop, site: ResidualSite, delta: Tensor) -> dict:
        N = graph.num_samples
        d = (delta * site.second).reshape(N, -1)  # [N, layers]
        K = d.shape[1]
        if 2 * K > self.max_vectors:
            raise RuntimeError(
                f"DiagHessian: the element-wise nonlinearity {site.name} has {K} layers per "
                f"sample; its exact residual term backpropagates {2 * K} vectors (limit "
                f"max_vectors={self.max_vectors}). Raise max_vectors explicitly, or use DiagGGN."
            )
        eye = torch.eye(K, dtype=d.dtype, device=d.device)
        signed = []
        for part in (d.clamp_min(0), (-d).clamp_min(0)):
            vectors = (eye.unsqueeze(1) * part.sqrt().unsqueeze(0)).reshape(K, *delta.shape)
            forms = graph.merged_forms(site.input_edge, vectors)
            signed.append({pid: f.sum_grad_squared() for pid, f in forms.items()})
        return {
            pid: signed[0].get(pid, 0) - signed[1].get(pid, 0)
            for pid in signed[0].keys() | signed[1].keys()
        }

    def compute(
        self, stats: Statistics, prepared: Any = None, out: dict | None = None
    ) -> dict[str, Any]:
        """GGN diagonal plus the residual terms.

        Args:
            stats: the engine's statistics (exact loss-Hessian forms).
            prepared: the residuals from :meth:`prepare`.
            out: unused.

        Returns:
            ``{parameter name: parameter-shaped Hessian diagonal}``.
        """
        values = super().compute(stats)
        for name, value in (prepared or {}).items():
            if name in values:
                values[name] = values[name] + value
        return values

    def compute_separately(
        self, model: nn.Module, loss_fn: nn.Module, X: Any, y: Tensor
    ) -> dict[str, Tensor]:
        """The HesScale approximation, from its own pass.

        Args:
            model: an ``nn.Sequential`` of Linear/Tanh/Sigmoid/ReLU/Flatten.
            loss_fn: the loss module.
            X: the input batch.
            y: the targets.

        Returns:
            ``{parameter name: parameter-shaped diagonal estimate}``.
        """
        return hesscale(model, loss_fn, X, y)
