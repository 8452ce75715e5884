"""Closed-form curvature of a last ``nn.Linear`` layer from its input features.

When the selected parameters are the weight (and/or bias) of an ``nn.Linear`` whose output *is*
the model's output, the network is linear in them: ``f_n = W phi_n + b`` with ``phi_n`` the
layer's input. With ``u_n = [phi_n, 1]`` (the bias as a constant input) and the weight
flattened row-major, the output Jacobian is ``J_n = I_K kron u_n^T``, so the curvature of the
summed loss is

``H = sum_n Lambda_n kron u_n u_n^T``,

with ``Lambda_n`` ``[K, K]`` per sample: the loss Hessian in the outputs for the GGN
(``"type-2"``): ``diag(p_n) - p_n p_n^T`` for cross-entropy (``p_n = softmax(f_n)``),
``2 I`` for ``MSELoss(reduction="sum")``, ``diag(p_n (1 - p_n))`` for BCE with logits
(``p_n = sigmoid(f_n)``); ``r_n r_n^T`` for the empirical Fisher, ``r_n = dl_n / df_n``.
The features come from one forward of the network without a graph (the forward that also
gives the log-likelihood): no backward pass through the body.

Rows and columns are ordered as the flat parameter vector ``[vec(W), b]`` (only the selected
ones), the layout of :class:`beyondgrad.laplace.curvature.DenseCurvature`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .curvature import DiagonalCurvature, KroneckerBlock, KroneckerCurvature

#: the fisher types with a closed form (the MC Fisher draws labels: the engine serves it)
CLOSED_FORM_FISHERS = ("type-2", "empirical")


def last_linear(model: nn.Module, names: Sequence[str]) -> tuple[nn.Linear, bool, bool] | None:
    """The ``nn.Linear`` owning every name in ``names`` (its weight and/or bias), with
    ``(layer, has_weight, has_bias)``; ``None`` when no single linear layer owns them.

    Args:
        model: the model.
        names: the selected parameter names (``model.named_parameters()`` spelling).

    Returns:
        ``(layer, has_weight, has_bias)`` or ``None``.
    """
    prefixes = {n.rpartition(".")[0] for n in names}
    if len(prefixes) != 1:
        return None
    prefix = prefixes.pop()
    layer = model.get_submodule(prefix) if prefix else model
    if type(layer) is not nn.Linear:  # subclasses may change the forward
        return None
    leaf = {n.rpartition(".")[2] for n in names}
    if not leaf <= {"weight", "bias"}:
        return None
    # a parameter shared with another module (tied weights) makes the output nonlinear in it
    own = {id(p) for p in layer.parameters(recurse=False)}
    uses = [id(p) for _, p in model.named_parameters(remove_duplicate=False) if id(p) in own]
    if len(uses) != len(own):
        return None
    return layer, "weight" in leaf, "bias" in leaf


class FeatureRecorder:
    """A forward hook on a linear layer recording its input features and output, and how
    often it was called since the last :meth:`take`.

    Args:
        layer: the ``nn.Linear`` layer.
    """

    def __init__(self, layer: nn.Linear):
        self.layer = layer
        self.features: Tensor | None = None
        self.output: Tensor | None = None
        self.calls = 0
        self._handle: Any = None

    def _hook(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        self.features, self.output = args[0], output
        self.calls += 1

    def __enter__(self) -> FeatureRecorder:
        self._handle = self.layer.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()

    def take(self, model_output: Tensor) -> Tensor | None:
        """The features ``[N, D]`` when the layer ran once and its output is ``model_output``
        itself (2-d, one sample per row), else ``None``; the record is cleared."""
        phi, out, calls = self.features, self.output, self.calls
        self.features, self.output, self.calls = None, None, 0
        if calls != 1 or out is not model_output or phi is None:
            return None
        if phi.ndim != 2 or out.ndim != 2:
            return None
        return phi


def last_layer_jacobians(phi: Tensor, K: int, has_weight: bool, has_bias: bool) -> Tensor:
    """The output Jacobians ``J_n = I_K kron u_n^T`` (``u_n = [phi_n, 1]``) over the selected
    parameters ``[vec(W), b]``, transposed: ``[P, N, K]`` (the layout of
    ``linops_adapter.output_jacobians``).

    Args:
        phi: the layer's input features ``[N, D]``.
        K: the layer's outputs.
        has_weight, has_bias: which of the layer's parameters are selected.

    Returns:
        ``[K D (if weight) + K (if bias), N, K]``.
    """
    N, D = phi.shape
    eye = torch.eye(K, dtype=phi.dtype, device=phi.device)
    parts = []
    if has_weight:  # row (k', j): d f_{n k} / d W_{k' j} = delta_{k k'} phi_{n j}
        parts.append((eye[:, None, None, :] * phi.T[None, :, :, None]).reshape(K * D, N, K))
    if has_bias:
        parts.append(eye[:, None, :].expand(K, N, K))
    return torch.cat(parts) if len(parts) > 1 else parts[0].contiguous()


def structured_variance(
    curv: Any, scale: Tensor, prior: Tensor, phi: Tensor, K: int, has_weight: bool, has_bias: bool
) -> Tensor | None:
    """``J_n P^{-1} J_n^T`` ``[N, K, K]`` for ``J_n = I_K kron u_n^T`` from the structure of
    ``P = scale H + diag(prior)`` without forming ``J``, or ``None`` where the structure gives no
    shortcut (then whiten the explicit Jacobians of :func:`last_layer_jacobians`):

    * diagonal ``d``: ``diag_k(sum_j u_{nj}^2 / d_{kj})``, ``O(N K D)``;
    * one Kronecker block ``B kron A`` (weight rows, the bias as ``A``'s last input) with
      eigenvalues ``lambda_{ba}`` in the bases ``Q_B``, ``Q_A``: ``Q_B diag(c_n) Q_B^T`` with
      ``c_{nb} = sum_a (Q_A^T u_n)_a^2 / (scale lambda_{ba} + delta)``, ``O(N (D^2 + K D + K^2))``
      (KFAC's products of factor eigenvalues or EKFAC's corrected eigenvalues alike).

    Args:
        curv: the fitted structure (:mod:`beyondgrad.laplace.curvature`).
        scale, prior: the likelihood scale and the prior precision vector ``[P]``.
        phi: the layer's input features ``[N, D]``.
        K: the layer's outputs.
        has_weight, has_bias: which of the layer's parameters are selected.
    """
    ones = phi.new_ones(len(phi), 1)
    if isinstance(curv, DiagonalCurvature):
        d = scale * curv.values + prior
        diag = phi.new_zeros(len(phi), K)
        if has_weight:
            diag = diag + (phi**2) @ (1.0 / d[: K * phi.shape[1]].reshape(K, -1)).T
        if has_bias:
            diag = diag + (1.0 / d[-K:])[None]
        return torch.diag_embed(diag)
    if not isinstance(curv, KroneckerCurvature) or len(curv.blocks) != 1 or not has_weight:
        return None
    block = curv.blocks[0]
    if not isinstance(block, KroneckerBlock) or block.order != "B kron A":
        return None
    if block.weight_perm is not None or block.values.shape[0] != 1 or block.joint_bias != has_bias:
        return None
    left, right = block.eigenbases()
    d = scale * block.values[0] + curv._block_prior(block, prior)  # [K, D(+1)]
    u = torch.cat([phi, ones], 1) if has_bias else phi
    c = ((u @ right[0]) ** 2) @ (1.0 / d).T  # [N, K] in the output eigenbasis
    return (left[0] * c[:, None, :]) @ left[0].T


def output_hessian(likelihood: str, fisher_type: str, f: Tensor, y: Tensor) -> tuple[str, Tensor]:
    """``Lambda_n`` in a compact form: ``("ce", p [N, K])`` (``diag(p) - p p^T``),
    ``("diag", d [N, K])`` (``diag(d)``) or ``("rows", r [N, K])`` (``r r^T``).

    Args:
        likelihood: ``"classification"`` (CE, class indices), ``"regression"`` (MSE, summed)
            or ``"binary"`` (BCE with logits).
        fisher_type: ``"type-2"`` or ``"empirical"``.
        f: the outputs ``[N, K]``.
        y: the targets (``[N]`` class indices for CE, ``[N, K]`` otherwise).

    Returns:
        The form's name and its tensor.
    """
    if likelihood == "classification":
        p = torch.softmax(f, 1)
        if fisher_type == "type-2":
            return "ce", p
        return "rows", p - nn.functional.one_hot(y, f.shape[1]).to(p.dtype)
    if likelihood == "binary":
        p = torch.sigmoid(f)
        if fisher_type == "type-2":
            return "diag", p * (1 - p)
        return "rows", p - y.reshape(f.shape).to(p.dtype)
    if fisher_type == "type-2":
        return "diag", f.new_full(f.shape, 2.0)
    return "rows", 2 * (f - y.reshape(f.shape).to(f.dtype))


def batch_curvature(form: str, lam: Tensor, u: Tensor, diagonal: bool) -> Tensor:
    """``sum_n Lambda_n kron u_n u_n^T`` over a batch, ``[K D', K D']`` (``diagonal``: its
    diagonal ``[K D']``), with ``u`` ``[N, D']`` and ``Lambda`` given as in
    :func:`output_hessian`.

    Args:
        form: ``"ce"``, ``"diag"`` or ``"rows"``.
        lam: ``[N, K]``.
        u: ``[N, D']``.
        diagonal: only the diagonal.

    Returns:
        ``[K D', K D']`` or ``[K D']``.
    """
    N, K = lam.shape
    D = u.shape[1]
    if diagonal:
        d = lam * lam if form == "rows" else lam * (1 - lam) if form == "ce" else lam
        return (d.T @ (u * u)).reshape(-1)
    if form == "rows":
        Q = (lam.unsqueeze(2) * u.unsqueeze(1)).reshape(N, K * D)
        return Q.T @ Q
    # diag(d) kron: one [D', D'] block per output
    H = torch.block_diag(*torch.einsum("nk,nd,ne->kde", lam, u, u))
    if form == "ce":  # minus sum_n p_n p_n^T kron u_n u_n^T
        Q = (lam.unsqueeze(2) * u.unsqueeze(1)).reshape(N, K * D)
        H = H - Q.T @ Q
    return H


def select(H: Tensor, K: int, D: int, has_weight: bool, has_bias: bool) -> Tensor:
    """Rows (and columns, for a matrix) of ``H`` over ``(k, d')`` (``d' = D``: the bias)
    reordered to the flat vector ``[vec(W), b]`` of the selected parameters.

    Args:
        H: ``[K (D+1)]`` or ``[K (D+1), K (D+1)]``.
        K: outputs.
        D: input features.
        has_weight: the weight is selected.
        has_bias: the bias is selected.

    Returns:
        The selected, reordered entries.
    """
    grid = torch.arange(K * (D + 1), device=H.device).reshape(K, D + 1)
    parts = ([grid[:, :D].reshape(-1)] if has_weight else []) + ([grid[:, D]] if has_bias else [])
    index = torch.cat(parts)
    H = H[index]
    return H if H.ndim == 1 else H[:, index]


def kronecker_sums(form: str, lam: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """The KFAC factors' sums over a batch: ``(sum_n Lambda_n [K, K], sum_n u_n u_n^T
    [D', D'])``; the layer's KFAC is ``B kron A`` with ``B = sum_n Lambda_n`` and ``A`` the
    *mean* of ``u_n u_n^T`` (the convention of ``bg.linops.KFAC``; for a last layer with one
    sample's ``Lambda`` constant, e.g. MSE, the exact GGN block).

    Args:
        form: ``"ce"``, ``"diag"`` or ``"rows"`` (:func:`output_hessian`).
        lam: ``[N, K]``.
        u: ``[N, D']``.

    Returns:
        ``(B_sum, A_sum)``.
    """
    if form == "ce":
        B = torch.diag(lam.sum(0)) - lam.T @ lam
    elif form == "diag":
        B = torch.diag(lam.sum(0))
    else:
        B = lam.T @ lam
    return B, u.T @ u


def kronecker_curvature(
    names: Sequence[str],
    shapes: Sequence[torch.Size],
    B: Tensor,
    A: Tensor,
    joint_bias: bool,
) -> KroneckerCurvature:
    """One Kronecker block ``B kron A`` over a linear layer's weight (and joint bias), in the
    eigenbases of ``B`` (output side, rows) and ``A`` (inputs, the bias as the last column).

    Args:
        names: the weight's name (and the bias's).
        shapes: their shapes.
        B: ``[K, K]``.
        A: ``[D', D']`` (``D' = D + 1`` with the joint bias).
        joint_bias: the bias is part of the block.

    Returns:
        The :class:`~beyondgrad.laplace.curvature.KroneckerCurvature`.
    """
    lb, qb = torch.linalg.eigh(0.5 * (B + B.T))
    la, qa = torch.linalg.eigh(0.5 * (A + A.T))
    values = (lb.unsqueeze(1) * la.unsqueeze(0)).clamp_min(0)
    block = KroneckerBlock(
        tuple(names), values[None], qb[None], qa[None], "B kron A", None, joint_bias
    )
    return KroneckerCurvature(names, shapes, [block])


__all__ = [
    "CLOSED_FORM_FISHERS",
    "FeatureRecorder",
    "batch_curvature",
    "kronecker_curvature",
    "kronecker_sums",
    "last_linear",
    "output_hessian",
    "select",
]
