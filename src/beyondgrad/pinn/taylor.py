"""The forward Laplacian: value, first derivatives and a Laplacian of an MLP in one forward pass.

Every hidden quantity of the network is carried as ``S = d + 2`` vectors per point (the Taylor
axis): index ``0`` the value, ``1 .. d`` the derivatives along the ``d`` input coordinates,
``d + 1`` the sum of second derivatives along the chosen coordinates (the Laplacian). A linear
layer maps all ``S`` vectors with its weight (weight sharing; the bias enters the value only);
an element-wise activation ``h = sigma(z)`` maps them as

* value: ``h_0 = sigma(z_0)``;
* derivatives: ``h_i = sigma'(z_0) z_i``;
* Laplacian: ``h_L = sigma'(z_0) z_L + sigma''(z_0) sum_{i in I} z_i ** 2`` (``I``: the
  coordinates the Laplacian sums over).

No nested autograd is involved; the result is differentiable in the parameters, and every
linear layer's ``S`` inputs and outputs can be recorded (:class:`LayerRecord`) for KFAC.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

#: activation -> (sigma, sigma', sigma'') as functions of the pre-activation
Derivatives = Callable[[nn.Module, Tensor], tuple[Tensor, Tensor, Tensor]]


def _tanh(_: nn.Module, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    h = torch.tanh(z)
    d1 = 1 - h**2
    return h, d1, -2 * h * d1


def _sigmoid(_: nn.Module, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    h = torch.sigmoid(z)
    d1 = h * (1 - h)
    return h, d1, d1 * (1 - 2 * h)


def _softplus(module: nn.Module, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    beta = float(module.beta)  # type: ignore[arg-type]
    s = torch.sigmoid(beta * z)
    return nn.functional.softplus(z, beta=beta), s, beta * s * (1 - s)


def _silu(_: nn.Module, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    s = torch.sigmoid(z)
    d1 = s * (1 + z * (1 - s))
    return z * s, d1, s * (1 - s) * (2 + z * (1 - 2 * s))


def _identity(_: nn.Module, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return z, torch.ones_like(z), torch.zeros_like(z)


#: the supported element-wise activations (smooth: they have a second derivative)
ACTIVATIONS: dict[type[nn.Module], Derivatives] = {
    nn.Tanh: _tanh,
    nn.Sigmoid: _sigmoid,
    nn.Softplus: _softplus,
    nn.SiLU: _silu,
    nn.Identity: _identity,
}


class UnsupportedModuleError(TypeError):
    """The model contains a module the forward Laplacian cannot propagate through."""


@dataclass
class LayerRecord:
    """One linear layer's view of a Taylor-mode forward pass.

    Attributes:
        module: the ``nn.Linear`` layer.
        inputs: ``[N, S, in]`` its ``S`` input vectors per point (in the autograd graph).
        outputs: ``[N, S, out]`` its ``S`` output vectors per point; gradients of any function
            of the result with respect to them give KFAC's output-gradient factor.
    """

    module: nn.Linear
    inputs: Tensor
    outputs: Tensor

    def augmented_inputs(self) -> Tensor:
        """The inputs with the bias column appended (``1`` for the value, ``0`` for the
        derivative and Laplacian vectors), so that ``outputs = Z @ [W, b]^T``.

        Returns:
            ``[N, S, in + 1]`` (``[N, S, in]`` for a layer without bias), detached.
        """
        Z = self.inputs.detach()
        if self.module.bias is None:
            return Z
        col = torch.zeros(*Z.shape[:2], 1, dtype=Z.dtype, device=Z.device)
        col[:, 0] = 1.0
        return torch.cat([Z, col], dim=2)


@dataclass
class TaylorResult:
    """The output of :func:`taylor_forward`.

    Attributes:
        u: ``[N, 1]`` the network's value.
        grad_u: ``[N, d]`` its input gradient (``None`` for a value-only pass).
        lap_u: ``[N, 1]`` its Laplacian over the chosen coordinates (``None`` for a
            value-only pass).
        layers: the records of the linear layers in forward order (empty unless recorded).
    """

    u: Tensor
    grad_u: Tensor | None
    lap_u: Tensor | None
    layers: list[LayerRecord] = field(default_factory=list)


def layers_of(model: nn.Module) -> list[nn.Module]:
    """The modules the forward pass runs through, in order (``nn.Sequential`` is flattened).

    Args:
        model: an ``nn.Sequential`` (possibly nested) of ``nn.Linear`` layers and supported
            element-wise activations, or a single such module.

    Returns:
        The flat list of leaf modules.

    Raises:
        UnsupportedModuleError: a module is neither ``nn.Linear`` nor a supported activation.
    """
    if isinstance(model, nn.Sequential):
        return [leaf for child in model for leaf in layers_of(child)]
    if isinstance(model, nn.Linear) or type(model) in ACTIVATIONS:
        return [model]
    supported = ", ".join(t.__name__ for t in ACTIVATIONS)
    raise UnsupportedModuleError(
        f"the forward Laplacian supports nn.Sequential of nn.Linear and element-wise "
        f"activations with a second derivative ({supported}); got {type(model).__name__}"
        + (
            " (ReLU has no second derivative: use Tanh or Softplus)"
            if isinstance(model, nn.ReLU)
            else ""
        )
    )


def _initial(X: Tensor, order: int) -> Tensor:
    """``[N, S, d]``: the input's value, its ``d`` unit derivatives and a zero Laplacian."""
    if order == 0:
        return X[:, None, :]
    N, d = X.shape
    eye = torch.eye(d, dtype=X.dtype, device=X.device).expand(N, d, d)
    return torch.cat([X[:, None, :], eye, torch.zeros_like(X)[:, None, :]], dim=1)


def _linear(layer: nn.Linear, T: Tensor) -> Tensor:
    out = T @ layer.weight.T
    if layer.bias is None:
        return out
    if T.shape[1] == 1:
        return out + layer.bias
    e0 = torch.zeros(T.shape[1], 1, dtype=T.dtype, device=T.device)
    e0[0] = 1.0
    return out + e0 * layer.bias


def _activation(module: nn.Module, T: Tensor, mask: Tensor | slice | None) -> Tensor:
    h, d1, d2 = ACTIVATIONS[type(module)](module, T[:, 0])
    if T.shape[1] == 1:
        return h[:, None]
    zd, zl = T[:, 1:-1], T[:, -1]
    sq = zd**2 if mask is None else zd[:, mask] ** 2
    lap = d1 * zl + d2 * sq.sum(1)
    return torch.cat([h[:, None], d1[:, None] * zd, lap[:, None]], dim=1)


def _mask(
    d: int, laplace_dims: Sequence[int] | None, device: torch.device
) -> Tensor | slice | None:
    """The derivative vectors the Laplacian sums over: ``None`` (all), a slice (a contiguous
    ascending range: a view, no gather in the forward and backward) or an index tensor."""
    if laplace_dims is None:
        return None
    dims = list(laplace_dims)
    if dims and (min(dims) < 0 or max(dims) >= d):
        raise ValueError(f"laplace_dims {dims} out of range for {d} inputs")
    if dims and dims == list(range(dims[0], dims[-1] + 1)):
        return slice(dims[0], dims[-1] + 1)
    return torch.as_tensor(dims, dtype=torch.long, device=device)


def taylor_forward(
    model: nn.Module,
    X: Tensor,
    laplace_dims: Sequence[int] | None = None,
    order: int = 2,
    record: bool = False,
) -> TaylorResult:
    """Propagate value, first derivatives and the Laplacian through an MLP.

    Args:
        model: ``nn.Sequential`` of ``nn.Linear`` and element-wise activations (see
            :data:`ACTIVATIONS`) with one output.
        X: ``[N, d]`` input points.
        laplace_dims: the input coordinates the Laplacian sums over (``None``: all ``d``;
            e.g. ``range(1, d)`` for the spatial Laplacian when coordinate 0 is time).
        order: ``2`` for value, gradient and Laplacian (``S = d + 2`` vectors per point),
            ``0`` for the value only (``S = 1``, a plain forward pass).
        record: keep every linear layer's ``S`` inputs and outputs (:class:`LayerRecord`).

    Returns:
        A :class:`TaylorResult`; ``u`` ``[N, 1]``, ``grad_u`` ``[N, d]``, ``lap_u`` ``[N, 1]``.

    Raises:
        UnsupportedModuleError: a module is not supported.
        ValueError: ``X`` is not ``[N, d]``, ``order`` is not 0 or 2, or the output is not 1-d.
    """
    if X.ndim != 2 or order not in (0, 2):
        raise ValueError(f"expected X [N, d] and order 0 or 2, got {tuple(X.shape)}, {order}")
    modules, mask = layers_of(model), _mask(X.shape[1], laplace_dims, X.device)
    T, records = _initial(X, order), []
    for module in modules:
        if isinstance(module, nn.Linear):
            out = _linear(module, T)
            if record:
                records.append(LayerRecord(module, T, out))
            T = out
        else:
            T = _activation(module, T, mask)
    if T.shape[2] != 1:
        raise ValueError(f"the network must have one output, it has {T.shape[2]}")
    if order == 0:
        return TaylorResult(T[:, 0], None, None, records)
    return TaylorResult(T[:, 0], T[:, 1:-1, 0], T[:, -1], records)


def forward_laplacian(
    model: nn.Module, X: Tensor, laplace_dims: Sequence[int] | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Value, input gradient and Laplacian of an MLP by the forward Laplacian (no nested
    autograd): each linear layer processes ``S = d + 2`` weight-shared vectors per point.

    Args:
        model: ``nn.Sequential`` of ``nn.Linear`` and element-wise activations (tanh, sigmoid,
            softplus, SiLU, identity) with one output.
        X: ``[N, d]`` input points.
        laplace_dims: the coordinates the Laplacian sums over (``None``: all).

    Returns:
        ``(u [N, 1], grad_u [N, d], lap_u [N, 1])``, differentiable in the parameters.

    Raises:
        UnsupportedModuleError: the model holds a module other than the supported ones.
    """
    res = taylor_forward(model, X, laplace_dims)
    assert res.grad_u is not None and res.lap_u is not None
    return res.u, res.grad_u, res.lap_u


def linear_layers(model: nn.Module) -> Iterator[nn.Linear]:
    """The ``nn.Linear`` layers of a supported MLP in forward order.

    Args:
        model: a model accepted by :func:`forward_laplacian`.

    Returns:
        An iterator over its linear layers.
    """
    return (m for m in layers_of(model) if isinstance(m, nn.Linear))
