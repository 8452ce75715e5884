"""The instruments' formulas: small pure functions of one step's reductions.

Notation as in :mod:`beyondgrad.cockpit.instruments` (batch of ``B`` samples, ``g_n`` the
per-sample gradients scaled so that the batch gradient is ``g = mean_n g_n``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .workspace import Workspace


def _safe_div(a: float, b: float) -> float:
    return a / b if b != 0 else float("nan")


def gradient_tests(B: int, l2: Tensor, dots: Tensor, grad_sq: float) -> dict[str, float]:
    """NormTest / InnerTest / OrthoTest / GradNoiseScale from ``||g_n||^2`` ``[B]``,
    ``g_n . g`` ``[B]`` and ``||g||^2``."""
    if B < 2:
        nan = float("nan")
        return {"NormTest": nan, "InnerTest": nan, "OrthoTest": nan, "GradNoiseScale": nan}
    norm_dev = float(l2.sum()) - B * grad_sq  # sum_n ||g_n - g||^2
    inner_dev = float(((dots - grad_sq) ** 2).sum())
    ortho = float((l2 - dots**2 / grad_sq).sum()) if grad_sq > 0 else float("nan")
    denom = B * (B - 1)
    return {
        "NormTest": _safe_div(math.sqrt(max(norm_dev, 0.0) / denom), math.sqrt(grad_sq)),
        "InnerTest": _safe_div(math.sqrt(inner_dev / denom), grad_sq),
        "OrthoTest": _safe_div(math.sqrt(max(ortho, 0.0) / denom), math.sqrt(grad_sq)),
        "GradNoiseScale": _safe_div(max(norm_dev, 0.0) / (B - 1), grad_sq),
    }


def entry_statistics(
    B: int,
    grad: Tensor,
    sgs: Tensor,
    loss: float,
    lr: float | None,
    eps: float = 1e-16,
    workspace: Workspace | None = None,
) -> dict[str, float]:
    """MeanGSNR / EarlyStopping / CABS from the mean gradient and ``sum_n g_n^2`` (flat).
    ``eps``: the machine epsilon of the gradients; entries that are round-off (second moment
    below ``(10 eps)^2`` of the largest) or whose variance is round-off (below ``10 eps`` of
    their second moment) are skipped by MeanGSNR and EarlyStopping. Entry-wise in the
    inputs' (promoted) dtype, sums accumulated in float64; ``workspace`` holds the
    model-sized temporaries between calls (the values do not depend on it)."""
    ws = workspace if workspace is not None else Workspace()
    D, dev, dt = grad.numel(), grad.device, torch.promote_types(grad.dtype, sgs.dtype)
    second = torch.div(sgs, B, out=ws.get("second", D, dt, dev))  # mean_n g_nj^2
    grad_sq = torch.mul(grad, grad, out=ws.get("grad_sq", D, dt, dev))
    var = torch.sub(second, grad_sq, out=ws.get("var", D, dt, dev)).clamp_(min=0)
    scratch = torch.mul(second, 10 * eps, out=ws.get("scratch", D, dt, dev))
    keep = torch.gt(var, scratch, out=ws.get("keep", D, torch.bool, dev))
    floor = (10 * eps) ** 2 * float(second.max())
    keep &= torch.gt(second, floor, out=ws.get("keep2", D, torch.bool, dev))
    kept = int(keep.sum())
    # g_j^2 / var_j on the kept entries, 0 elsewhere (var_j may vanish there)
    ratio = torch.div(grad_sq, var, out=scratch)
    ratio = torch.where(keep, ratio, ratio.new_zeros(()), out=ratio)
    total = float(ratio.sum(dtype=torch.float64))
    out = {"MeanGSNR": total / kept if kept else math.nan}
    # EarlyStopping: 1 - (B/D) sum_j g_j^2 / s_j^2 with s_j^2 = var_j B / (B-1)
    out["EarlyStopping"] = 1.0 - B / D * total * (B - 1) / B if B > 1 else math.nan
    var_sum = float(var.sum(dtype=torch.float64))
    out["CABS"] = lr * var_sum / loss if lr is not None and loss > 0 else math.nan
    return out


def curvature_statistics(
    sgs: Tensor, B: int, diag: Tensor, eps: float = 1e-7, workspace: Workspace | None = None
) -> dict[str, float]:
    """HessTrace / TICDiag / TICTrace from ``sum_n g_n^2`` and a curvature diagonal (flat),
    entry-wise in their (promoted) dtype, sums in float64; ``workspace`` holds the
    temporaries between calls."""
    ws = workspace if workspace is not None else Workspace()
    D, dev, dt = sgs.numel(), sgs.device, torch.promote_types(sgs.dtype, diag.dtype)
    second = torch.div(sgs, B, out=ws.get("second", D, dt, dev))
    trace = float(diag.sum(dtype=torch.float64))
    shifted = torch.add(diag, eps, out=ws.get("scratch", D, dt, dev))
    tic = torch.div(second, shifted, out=shifted)
    return {
        "HessTrace": trace,
        "TICDiag": float(tic.sum(dtype=torch.float64)),
        "TICTrace": _safe_div(float(second.sum(dtype=torch.float64)), trace),
    }


def _mean_var(x: Tensor) -> tuple[float, float]:
    """Mean of ``x`` and the variance of that mean (floored at 1e-12; 1 for one value), in
    Python floats (exactly rounded sums: the same bits whatever the memory layout)."""
    values = x.double().reshape(-1).tolist()
    n = len(values)
    mean = math.fsum(values) / n
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1) / n if n > 1 else 1.0
    return mean, max(var, 1e-12)


def _least_squares(A: list[list[float]], y: list[float]) -> list[float]:
    """``argmin ||A x - y||`` for a small full-rank ``A`` (rows x 3) by modified Gram-Schmidt
    with one re-orthogonalization, in Python floats (deterministic to the bit)."""
    cols = [[row[j] for row in A] for j in range(len(A[0]))]
    n = len(cols)
    Q: list[list[float]] = []
    R = [[0.0] * n for _ in range(n)]
    for j, v in enumerate(cols):
        v = list(v)
        for _ in range(2):
            for i, q in enumerate(Q):
                r = math.fsum(qk * vk for qk, vk in zip(q, v))
                R[i][j] += r
                v = [vk - r * qk for vk, qk in zip(v, q)]
        R[j][j] = math.sqrt(math.fsum(vk * vk for vk in v))
        Q.append([vk / R[j][j] for vk in v])
    rhs = [math.fsum(qk * yk for qk, yk in zip(q, y)) for q in Q]
    x = [0.0] * n
    for i in reversed(range(n)):
        x[i] = (rhs[i] - math.fsum(R[i][k] * x[k] for k in range(i + 1, n))) / R[i][i]
    return x


def alpha(f0: Tensor, df0: Tensor, f1: Tensor, df1: Tensor) -> float:
    """Normalized step length from per-sample losses and directional derivatives at the start
    (``f0``, ``df0``, ``[B0]``) and end (``f1``, ``df1``) of the step ``s`` (derivatives along
    ``s``, so the step is ``tau = 0 -> 1``). Fits ``q(tau) = a tau^2 + b tau + c`` to the four
    means by least squares weighted with the inverse variances of the means, then returns
    ``1/tau* - 1`` with ``tau* = -b / (2a)`` the minimizer. Without a valley (``a <= 0``):
    ``-1`` when the fit still descends at the start, else ``1``; ``1`` when ``tau* <= 0``
    (the step went uphill)."""
    (m0, v0), (d0, w0), (m1, v1), (d1, w1) = map(_mean_var, (f0, df0, f1, df1))
    # rows: q(0) = c, q'(0) = b, q(1) = a + b + c, q'(1) = 2a + b; unknowns (a, b, c)
    M = ((0.0, 0.0, 1.0), (0.0, 1.0, 0.0), (1.0, 1.0, 1.0), (2.0, 1.0, 0.0))
    w = [math.sqrt(1 / v) for v in (v0, w0, v1, w1)]
    a, b, _ = _least_squares([[wi * m for m in row] for wi, row in zip(w, M)],
                             [wi * yi for wi, yi in zip(w, (m0, d0, m1, d1))])  # fmt: skip
    if a <= 0:  # no curvature along the step: the fit has no valley floor
        return -1.0 if b < 0 else 1.0
    tau = -b / (2 * a)
    if tau <= 0:  # the step went uphill from the start
        return 1.0
    return 1.0 / tau - 1.0


def effective_rank(eigenvalues: Tensor) -> float:
    """``(sum l)^2 / sum l^2`` of the eigenvalues clamped at 0 (0 when all vanish)."""
    ev = eigenvalues.clamp(min=0)
    total = float(ev.sum())
    return total**2 / float((ev**2).sum()) if total > 0 else 0.0


def robust_limit(values: Tensor, quantile: float = 1.0) -> float:
    """The ``quantile`` of ``|values|`` (1: the largest), the largest if that is 0, else 1:
    a histogram range that one outlier does not stretch."""
    mags = values.detach().abs().reshape(-1)
    if not mags.numel():
        return 1.0
    if mags.dtype not in (torch.float32, torch.float64):
        mags = mags.float()
    limit = _quantile(mags, quantile) if quantile < 1 else 0.0
    return limit or float(mags.max()) or 1.0


def _quantile(x: Tensor, q: float) -> float:
    """``torch.quantile(x, q)`` (linear interpolation, 1-d ``x``) to the bit, from the two
    order statistics around it (two selections instead of a full sort)."""
    rank = torch.tensor(q, dtype=x.dtype, device=x.device) * (x.numel() - 1)
    below = int(rank)
    above = int(torch.ceil(rank))
    if x.device.type == "cpu":  # one NumPy selection of both (torch.kthvalue copies and sorts)
        parts = np.partition(x.numpy(), (below, above))
        low = torch.tensor(parts[below], dtype=x.dtype)
        high = torch.tensor(parts[above], dtype=x.dtype)
    else:
        low = torch.kthvalue(x, below + 1).values
        high = low if above == below else torch.kthvalue(x, above + 1).values
    return float(torch.lerp(low, high, rank - below))


def histogram(values: Tensor, bins: int, limit: float) -> dict[str, Any]:
    """Counts of ``values`` in ``bins`` equal bins over ``[-limit, limit]``; values beyond
    are counted in the edge bins, and their number is ``"clipped"``."""
    counts = torch.histc(values.float().clamp(-limit, limit), bins=bins, min=-limit, max=limit)
    clipped = int((values.abs() > limit).sum())
    return {"limit": limit, "counts": counts.tolist(), "clipped": clipped}


def histogram2d(
    params: Tensor, values: Tensor, bins: int, limit: float, quantile: float = 1.0
) -> dict[str, Any]:
    """Counts of the pairs ``(params[i], values[i])`` in ``bins x bins`` equal bins over
    ``[-p, p] x [-limit, limit]`` with ``p`` the ``quantile`` of ``|params|``
    (:func:`robust_limit`); pairs beyond are counted in the edge bins."""
    p_lim = robust_limit(params, quantile)
    pairs = torch.stack(
        [params.float().clamp(-p_lim, p_lim), values.float().clamp(-limit, limit)], 1
    )
    counts = torch.histogramdd(pairs, bins=[bins, bins], range=[-p_lim, p_lim, -limit, limit]).hist
    return {"param_limit": p_lim, "grad_limit": limit, "counts": counts.tolist()}


__all__ = [
    "alpha",
    "curvature_statistics",
    "effective_rank",
    "entry_statistics",
    "gradient_tests",
    "histogram",
    "histogram2d",
    "robust_limit",
]
