"""Merging models of one architecture: weighted averaging, Fisher merging, RegMean.

Every merge takes ``models`` (same architecture: the same state-dict keys, shapes and dtypes)
and optional per-model ``weights`` ``lambda_i`` (non-negative, normalized to sum to 1; default:
equal), and returns a new model (a deep copy of ``models[0]`` with the merged state) or, with
``as_state_dict=True``, the merged state dict. Buffers that are not floating point (e.g.
BatchNorm's ``num_batches_tracked``) are taken from ``models[0]``; floating-point buffers
(running statistics) are averaged.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..pinn.kron import KroneckerSumInverse
from .curvature import Gram, KroneckerFisher, diagonal_fisher, input_grams, kronecker_fisher

State = dict[str, Tensor]


def check_compatible(models: Sequence[nn.Module]) -> list[State]:
    """The models' state dicts, after checking that they share one architecture.

    Args:
        models: at least one model.

    Returns:
        ``[model.state_dict() for model in models]``.

    Raises:
        ValueError: no model, or keys, shapes or dtypes differ (the message names the entry).
    """
    if len(models) == 0:
        raise ValueError("no model to merge")
    states = [m.state_dict() for m in models]
    ref = states[0]
    for i, state in enumerate(states[1:], start=1):
        if set(state) != set(ref):
            diff = sorted(set(state) ^ set(ref))
            raise ValueError(f"model {i} has other entries than model 0: {diff[:5]}")
        for key, value in state.items():
            if value.shape != ref[key].shape or value.dtype != ref[key].dtype:
                raise ValueError(
                    f"model {i} differs from model 0 at '{key}': {tuple(value.shape)} "
                    f"{value.dtype} vs {tuple(ref[key].shape)} {ref[key].dtype}"
                )
    return states


def merge_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    """Per-model weights normalized to sum to 1.

    Args:
        weights: ``count`` non-negative numbers, not all zero, or ``None`` (equal weights).
        count: the number of models.

    Returns:
        The normalized weights.

    Raises:
        ValueError: wrong length, a negative or non-finite weight, or all zero.
    """
    if weights is None:
        return [1.0 / count] * count
    w = [float(v) for v in weights]
    if len(w) != count:
        raise ValueError(f"got {len(w)} weights for {count} models")
    if not all(math.isfinite(v) for v in w) or min(w) < 0 or sum(w) <= 0:
        raise ValueError(f"weights must be finite, non-negative and not all zero, got {w}")
    return [v / sum(w) for v in w]


def average_state_dicts(states: Sequence[Mapping[str, Tensor]], weights: Sequence[float]) -> State:
    """``sum_i lambda_i theta_i`` per floating-point entry (others from ``states[0]``).

    Args:
        states: state dicts of one architecture.
        weights: normalized weights ``lambda_i``, one per state dict.

    Returns:
        The averaged state dict.
    """
    out: State = {}
    for key, ref in states[0].items():
        if not ref.is_floating_point():
            out[key] = ref.clone()
            continue
        out[key] = sum(w * s[key] for w, s in zip(weights, states, strict=True))  # type: ignore[misc]
    return out


def _finish(model: nn.Module, state: State, as_state_dict: bool) -> nn.Module | State:
    if as_state_dict:
        return state
    merged = copy.deepcopy(model)
    merged.load_state_dict(state)
    return merged


def average(
    models: Sequence[nn.Module],
    weights: Sequence[float] | None = None,
    as_state_dict: bool = False,
) -> nn.Module | State:
    """Weighted averaging ``theta = sum_i lambda_i theta_i`` of every floating-point entry.

    Args:
        models: models of one architecture.
        weights: per-model ``lambda_i`` (normalized; default equal).
        as_state_dict: return the state dict instead of a new model.

    Returns:
        The merged model (a deep copy of ``models[0]``) or its state dict.
    """
    states = check_compatible(models)
    state = average_state_dicts(states, merge_weights(weights, len(models)))
    return _finish(models[0], state, as_state_dict)


def fisher_average(
    states: Sequence[Mapping[str, Tensor]],
    fishers: Sequence[Mapping[str, Tensor]],
    weights: Sequence[float],
    epsilon: float = 1e-8,
) -> State:
    """Fisher-weighted average, element-wise:
    ``theta = sum_i lambda_i F_i theta_i / sum_i lambda_i F_i`` with ``F_i`` floored at
    ``epsilon`` (``max(F_i, epsilon)``, so an entry without curvature in every model falls back
    to the weighted average). Entries without a Fisher are averaged with ``lambda_i``.

    Args:
        states: state dicts of one architecture.
        fishers: per model, ``{name: diagonal Fisher}`` (parameter-shaped).
        weights: normalized weights ``lambda_i``.
        epsilon: the floor, > 0.

    Returns:
        The merged state dict.
    """
    if epsilon <= 0:
        raise ValueError(f"epsilon must be positive, got {epsilon}")
    out = average_state_dicts(states, weights)
    for key in out:
        if not all(key in f for f in fishers):
            continue
        F = [lam * f[key].to(out[key].dtype).clamp_min(epsilon) for lam, f in zip(weights, fishers)]
        num = sum(Fi * s[key] for Fi, s in zip(F, states, strict=True))
        out[key] = num / sum(F)  # type: ignore[operator]
    return out


def _per_model(data: Sequence[Any], count: int) -> Sequence[Any]:
    if len(data) != count:
        raise ValueError(f"data must hold one data set per model: {len(data)} for {count} models")
    return data


def fisher_merge(
    models: Sequence[nn.Module],
    loss_fn: nn.Module,
    data: Sequence[Any],
    fisher: str = "empirical",
    weights: Sequence[float] | None = None,
    epsilon: float = 1e-8,
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
    as_state_dict: bool = False,
    structure: str = "kfac",
    damping: float = 0.1,
) -> nn.Module | State:
    """Fisher merging (Matena & Raffel, 2022): the minimizer of
    ``sum_i lambda_i (theta - theta_i)^T F_i (theta - theta_i)`` with Fishers from the engine.

    ``structure="kfac"`` (default; it beat averaging on 10/10 digit seeds, the diagonal on
    5-6/10, 8-9/10 with :func:`~beyondgrad.merging.select_weights`; ``docs/merging.md``): per
    Linear / convolution layer ``F_i = B_i kron A_i`` (:func:`kronecker_fisher`), which keeps
    the correlations of a layer's inputs and of its outputs; the merged layer solves
    ``sum_i lambda_i B~_i W A~_i = sum_i lambda_i B~_i W_i A~_i`` (:func:`kfac_merge_layer`,
    factors damped by ``damping`` times their mean eigenvalue); other parameters use the
    diagonal; RegMean is the case ``B_i = I``. ``structure="diagonal"`` (the paper's method):
    ``theta = sum_i lambda_i F_i theta_i / sum_i lambda_i F_i`` element-wise
    (:func:`fisher_average`, :func:`diagonal_fisher`), for where ``"kfac"`` raises (e.g.
    embeddings). Fishers are means over each model's examples (``weights=N_i``: by size).

    Args:
        models: models of one architecture.
        loss_fn: their loss (MSE, cross-entropy, BCE with logits).
        data: one data set per model: ``(X, y)`` tensors or an iterable of batches.
        fisher: ``"empirical"`` (observed labels), ``"mc"`` (sampled labels) or ``"type-2"``.
        weights: per-model ``lambda_i`` (normalized; default equal).
        epsilon: the floor on ``F_i``.
        mc_samples: labels per example for ``"mc"``.
        generator: the random source for ``"mc"``.
        as_state_dict: return the state dict instead of a new model.
        structure: ``"diagonal"`` or ``"kfac"``; damping: the KFAC factors' relative damping.

    Returns:
        The merged model (a deep copy of ``models[0]``) or its state dict.

    Raises:
        ValueError: an unknown ``structure``.
    """
    states, lam = check_compatible(models), merge_weights(weights, len(models))
    if structure == "kfac":
        kfishers = [
            kronecker_fisher(m, loss_fn, d, fisher, mc_samples, generator)
            for m, d in zip(models, _per_model(data, len(models)), strict=True)
        ]
        state = kfac_fisher_average(states, kfishers, lam, damping, epsilon)
        return _finish(models[0], state, as_state_dict)
    if structure != "diagonal":
        raise ValueError(f"structure must be 'diagonal' or 'kfac', got {structure!r}")
    fishers = [
        diagonal_fisher(m, loss_fn, d, fisher, mc_samples, generator)
        for m, d in zip(models, _per_model(data, len(models)), strict=True)
    ]
    return _finish(models[0], fisher_average(states, fishers, lam, epsilon), as_state_dict)


def _shrunk(gram: Tensor, alpha: float) -> Tensor:
    """``alpha G + (1 - alpha) diag(G)``: the off-diagonal entries scaled by ``alpha``."""
    return alpha * gram + (1 - alpha) * torch.diag_embed(torch.diagonal(gram))


def _weight_matrix(state: Mapping[str, Tensor], gram: Gram) -> Tensor:
    """``[W b]`` as ``[O, I(+1)]`` in float64."""
    W = state[gram.weight].reshape(state[gram.weight].shape[0], -1).double()
    if gram.bias is None:
        return W
    return torch.cat([W, state[gram.bias].double()[:, None]], 1)


def regmean_layer(
    weights_in: Sequence[Tensor], grams: Sequence[Tensor], lam: Sequence[float], alpha: float
) -> Tensor:
    """RegMean's closed form for one layer:
    ``W^T = (sum_i lambda_i G~_i)^{-1} sum_i lambda_i G~_i W_i^T`` with
    ``G~_i = alpha G_i + (1 - alpha) diag(G_i)``. Input coordinates that no model's data
    exercises (a zero diagonal in every ``G_i``) get the weighted average of the ``W_i``.

    Args:
        weights_in: per model the layer's matrix ``W_i`` ``[O, I]`` (bias as a last column).
        grams: per model the input Gram ``G_i`` ``[I, I]``.
        lam: normalized weights ``lambda_i``.
        alpha: the off-diagonal scale in ``[0, 1]`` (1: plain least squares, 0: a
            per-input-coordinate weighted average).

    Returns:
        The merged ``W`` ``[O, I]`` in float64.
    """
    M = sum(l * _shrunk(G.double(), alpha) for l, G in zip(lam, grams, strict=True))
    rhs = sum(
        l * _shrunk(G.double(), alpha) @ W.double().T
        for l, G, W in zip(lam, grams, weights_in, strict=True)
    )
    avg = sum(l * W.double() for l, W in zip(lam, weights_in, strict=True)).T  # type: ignore[union-attr]
    dead = torch.diagonal(M) <= 1e-12 * torch.diagonal(M).abs().max().clamp_min(1e-300)  # type: ignore[union-attr]
    M, rhs = M.clone(), rhs.clone()  # type: ignore[union-attr]
    M[dead, :], M[:, dead] = 0.0, 0.0
    M[dead, dead] = 1.0
    rhs[dead] = avg[dead]
    try:
        return torch.linalg.solve(M, rhs).T
    except RuntimeError:  # singular (alpha = 1 with collinear inputs): least-norm solution
        return (torch.linalg.pinv(M) @ rhs).T


def regmean_average(
    states: Sequence[Mapping[str, Tensor]],
    grams: Sequence[Mapping[str, Gram]],
    weights: Sequence[float],
    alpha: float = 0.9,
) -> State:
    """RegMean over state dicts: :func:`regmean_layer` for every layer with a Gram in every
    model, the weighted average (:func:`average_state_dicts`) for all other entries.

    Args:
        states: state dicts of one architecture.
        grams: per model ``{module name: Gram}`` (:func:`~beyondgrad.merging.input_grams`).
        weights: normalized weights ``lambda_i``.
        alpha: the off-diagonal scale in ``[0, 1]``.

    Returns:
        The merged state dict.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    out = average_state_dicts(states, weights)
    for module, gram in grams[0].items():
        if not all(module in g and g[module].bias == gram.bias for g in grams):
            continue
        W = regmean_layer(
            [_weight_matrix(s, g[module]) for s, g in zip(states, grams, strict=True)],
            [g[module].matrix for g in grams],
            weights,
            alpha,
        )
        _write_block(out, W, gram.weight, gram.bias)
    return out


def regmean(
    models: Sequence[nn.Module],
    loss_fn: nn.Module,
    data: Sequence[Any],
    alpha: float = 0.9,
    weights: Sequence[float] | None = None,
    as_state_dict: bool = False,
) -> nn.Module | State:
    """RegMean (Jin et al., 2023): per Linear (and ungrouped convolution) layer, the weights
    that minimize ``sum_i lambda_i ||X_i W^T - X_i W_i^T||^2 / N_i`` over each model's own layer
    inputs ``X_i`` (the rows of the KFAC ``A`` factor, bias as a constant-1 input), with the
    off-diagonal Gram entries scaled by ``alpha`` (:func:`regmean_layer`). Every other entry
    (normalization layers, embeddings, buffers) is averaged with ``lambda_i``.

    The Grams are the per-row means ``G_i = X_i^T X_i / N_i`` (:func:`input_grams`), so models
    count equally whatever their data size (pass ``weights=N_i`` to weight by it).

    Args:
        models: models of one architecture.
        loss_fn: their loss (only to run the engine).
        data: one data set per model: ``(X, y)`` tensors or an iterable of batches.
        alpha: the off-diagonal scale in ``[0, 1]``.
        weights: per-model ``lambda_i`` (normalized; default equal).
        as_state_dict: return the state dict instead of a new model.

    Returns:
        The merged model (a deep copy of ``models[0]``) or its state dict.
    """
    states = check_compatible(models)
    lam = merge_weights(weights, len(models))
    grams = [
        input_grams(m, loss_fn, d)
        for m, d in zip(models, _per_model(data, len(models)), strict=True)
    ]
    return _finish(models[0], regmean_average(states, grams, lam, alpha), as_state_dict)


def kfac_merge_layer(
    weights_in: Sequence[Tensor],
    factors: Sequence[tuple[Tensor, Tensor]],
    lam: Sequence[float],
    damping: float = 0.1,
) -> Tensor:
    """Fisher merging of one layer with Kronecker-factored Fishers ``F_i = B_i kron A_i``:
    the ``W`` minimizing ``sum_i lambda_i vec(W - W_i)^T (B~_i kron A~_i) vec(W - W_i)``, i.e.
    ``sum_i lambda_i B~_i W A~_i = sum_i lambda_i B~_i W_i A~_i``, with each factor damped
    relative to its mean eigenvalue: ``A~ = A + damping tr(A)/I * Id`` (likewise ``B``).

    Two models: solved exactly (:class:`~beyondgrad.pinn.KroneckerSumInverse`); more: by
    conjugate gradients on the matrix equation (from the weighted average, to a relative
    residual of 1e-10 or 10 * O * I iterations).

    Args:
        weights_in: per model the layer's matrix ``W_i`` ``[O, I]`` (bias as a last column).
        factors: per model ``(A_i [I, I], B_i [O, O])``.
        lam: normalized weights ``lambda_i``.
        damping: the relative damping, > 0.

    Returns:
        The merged ``W`` ``[O, I]`` in float64.
    """
    if damping <= 0:
        raise ValueError(f"damping must be positive, got {damping}")
    damped = [(l * _damp(B.double(), damping), _damp(A.double(), damping)) for (A, B), l in
              zip(factors, lam, strict=True)]  # fmt: skip
    rhs = sum(B @ W.double() @ A for (B, A), W in zip(damped, weights_in, strict=True))
    if len(damped) == 1:
        return weights_in[0].double()
    if len(damped) == 2:
        (B1, A1), (B2, A2) = damped
        return KroneckerSumInverse(A1, B1, A2, B2) @ rhs  # type: ignore[arg-type]
    return _cg(lambda X: sum(B @ X @ A for B, A in damped), rhs, lam, weights_in)  # type: ignore[arg-type]


def _damp(M: Tensor, damping: float) -> Tensor:
    """``M + damping * mean eigenvalue * I`` (an absolute 1e-30 when ``M`` is zero)."""
    shift = damping * (torch.trace(M) / M.shape[0]).clamp_min(1e-30)
    return M + shift * torch.eye(M.shape[0], dtype=M.dtype, device=M.device)


def _cg(op: Any, rhs: Tensor, lam: Sequence[float], start: Sequence[Tensor]) -> Tensor:
    """Conjugate gradients for the symmetric positive definite ``op(X) = rhs``."""
    X = sum(l * W.double() for l, W in zip(lam, start, strict=True))
    R = rhs - op(X)
    P, rr = R.clone(), (R * R).sum()
    tol = 1e-20 * (rhs * rhs).sum()
    for _ in range(10 * rhs.numel()):
        if rr <= tol:
            break
        Q = op(P)
        alpha = rr / (P * Q).sum()
        X, R = X + alpha * P, R - alpha * Q
        rr_new = (R * R).sum()
        P, rr = R + (rr_new / rr) * P, rr_new
    return X  # type: ignore[return-value]


def kfac_fisher_average(
    states: Sequence[Mapping[str, Tensor]],
    fishers: Sequence[tuple[Mapping[str, KroneckerFisher], Mapping[str, Tensor]]],
    weights: Sequence[float],
    damping: float = 0.1,
    epsilon: float = 1e-8,
) -> State:
    """Fisher merging with KFAC Fishers over state dicts: :func:`kfac_merge_layer` for every
    layer with a Kronecker block in every model, the diagonal Fisher average
    (:func:`fisher_average`, floor ``epsilon``) for the parameters with a diagonal, the
    weighted average for everything else.

    Args:
        states: state dicts of one architecture.
        fishers: per model the pair returned by :func:`~beyondgrad.merging.kronecker_fisher`.
        weights: normalized weights ``lambda_i``.
        damping: the relative damping of the Kronecker factors.
        epsilon: the floor on the diagonal Fishers.

    Returns:
        The merged state dict.
    """
    out = fisher_average(states, [f[1] for f in fishers], weights, epsilon)
    for module, ref in fishers[0][0].items():
        if not all(module in f[0] and f[0][module].bias == ref.bias for f in fishers):
            continue
        W = kfac_merge_layer(
            [_weight_matrix(s, Gram(f[0][module].A, 0, ref.weight, ref.bias)) for s, f in
             zip(states, fishers, strict=True)],
            [(f[0][module].A, f[0][module].B) for f in fishers],
            weights,
            damping,
        )  # fmt: skip
        _write_block(out, W, ref.weight, ref.bias)
    return out


def _write_block(out: State, W: Tensor, weight: str, bias: str | None) -> None:
    """Store ``[W | b]`` ``[O, I(+1)]`` into the state dict (weight reshaped, dtypes kept)."""
    cols = W.shape[1] - (bias is not None)
    out[weight] = W[:, :cols].reshape(out[weight].shape).to(out[weight].dtype)
    if bias is not None:
        out[bias] = W[:, -1].to(out[bias].dtype)
