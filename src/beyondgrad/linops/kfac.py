"""KFAC over a data set as a block-diagonal operator with closed-form inverse, log-determinant
and trace (one block per module: Kronecker factors or, for layers without Kronecker structure,
the diagonal of the same curvature; see :class:`beyondgrad.KFAC`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from ..engine import compute
from ..factors import DiagonalFactors, KroneckerFactors, from_block_layout, to_block_layout
from ..quantities import KFAC as KFACQuantity
from .base import LinearOperator
from .curvature import _batch_size


class KFAC(LinearOperator):
    """``bg.linops.KFAC(model, loss_fn, data, fisher_type="mc", kfac_approx="expand",
    mc_samples=1, num_data=None, generator=None)``: the engine's KFAC blocks accumulated over
    the data set (``A`` averaged over all samples, ``B`` summed with the data-set reduction
    ``N_b / num_data`` for mean losses), acting on flat vectors over all trainable parameters
    in ``model.named_parameters()`` order, or over ``params`` (names, kept in that order): the
    principal sub-block of the same KFAC matrix (whole blocks; a weight without its joint bias
    keeps ``B kron A`` with ``A`` restricted to the weight; a bias without its weight raises).
    ``blocks`` holds the per-module factors. ``inverse(damping)``, ``logdet(damping)`` and
    ``trace()`` are exact for the structure."""

    symmetric = True

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        data: Iterable[tuple[Any, Tensor]],
        fisher_type: str = "mc",
        kfac_approx: str = "expand",
        mc_samples: int = 1,
        num_data: int | None = None,
        generator: torch.Generator | None = None,
        params: Iterable[str] | None = None,
    ):
        q = KFACQuantity(fisher_type=fisher_type, kfac_approx=kfac_approx, mc_samples=mc_samples)
        batches = list(data)
        if num_data is None:
            num_data = sum(_batch_size(X) for X, _ in batches)
        mean = loss_fn.reduction == "mean"  # type: ignore[union-attr]
        sums: dict[str, Any] = {}
        for X, y in batches:
            N = _batch_size(X)
            w = N / num_data if mean else 1.0
            for name, block in compute(model, loss_fn, X, y, q, generator=generator)[q].items():
                if isinstance(block, KroneckerFactors):
                    A, B = block.A * (N / num_data), block.B * w
                    if name in sums:
                        sums[name].A += A
                        sums[name].B += B
                    else:
                        sums[name] = KroneckerFactors(
                            A,
                            B,
                            block.order,
                            block.params,
                            block.bias,
                            fisher_type,
                            kfac_approx,
                            block.R,
                            num_data,
                            None,
                            block.weight_perm,
                        )
                else:
                    diag = {n: v * w for n, v in block.diagonal.items()}
                    if name in sums:
                        for n, v in diag.items():
                            sums[name].diagonal[n] += v
                    else:
                        sums[name] = DiagonalFactors(diag, fisher_type, block.R, num_data)
        all_names = [n for n, p in model.named_parameters() if p.requires_grad]
        wanted = set(all_names if params is None else params)
        unknown = wanted - set(all_names)
        if unknown:
            raise ValueError(f"unknown or frozen parameters: {sorted(unknown)}")
        covered = [p for b in sums.values() for p in b.params if p in wanted]
        if sorted(covered) != sorted(wanted):
            bad = sorted(n for n in wanted if covered.count(n) != 1)
            raise RuntimeError(
                f"KFAC blocks do not cover the parameters {bad} exactly once (weight tying "
                "across modules gives a parameter several blocks); the operator is undefined "
                "there (pass params=... without them)"
            )
        if params is not None:
            sums = {k: b for k, b in ((k, _restrict(b, wanted)) for k, b in sums.items()) if b}
            all_names = [n for n in all_names if n in wanted]
        self.blocks: dict[str, KroneckerFactors | DiagonalFactors] = sums
        self.names = all_names
        self.params = dict(model.named_parameters())
        self.sizes = [self.params[n].numel() for n in self.names]
        first = self.params[self.names[0]]
        super().__init__((sum(self.sizes),) * 2, first.dtype, first.device)  # type: ignore[arg-type]

    def _split(self, M: Tensor) -> dict[str, Tensor]:
        return {
            n: b.T.reshape(M.shape[1], *self.params[n].shape)
            for n, b in zip(self.names, torch.split(M, self.sizes, 0))
        }

    def _join(self, parts: dict[str, Tensor]) -> Tensor:
        return torch.cat([parts[n].reshape(parts[n].shape[0], -1) for n in self.names], 1).T

    def _block_matrix(self, block: KroneckerFactors, parts: dict[str, Tensor]) -> Tensor:
        """The covered parameters (``[k, ...]`` each) as ``[G, rows, cols, k]`` in the block's
        layout (:func:`~beyondgrad.factors.to_block_layout`)."""
        bias = parts[block.params[1]] if block.bias == "joint" else None
        M = to_block_layout(
            parts[block.params[0]], bias, block.order, block.weight_perm, block.groups
        )
        return M.permute(1, 2, 3, 0)

    def _unblock(self, block: KroneckerFactors, M: Tensor, k: int) -> dict[str, Tensor]:
        """Inverse of :meth:`_block_matrix`."""
        weight = block.params[0]
        bias = block.params[1] if block.bias == "joint" else None
        W, b = from_block_layout(
            M.permute(3, 0, 1, 2),
            tuple(self.params[weight].shape),
            None if bias is None else tuple(self.params[bias].shape),
            block.order,
            block.weight_perm,
            block.groups,
        )
        return {weight: W} if bias is None else {weight: W, bias: b}

    def _apply(self, M: Tensor, kron: str, damping: float = 0.0) -> Tensor:
        parts = self._split(M)
        k = M.shape[1]
        result: dict[str, Tensor] = {}
        for block in self.blocks.values():
            if isinstance(block, DiagonalFactors):
                for n, d in block.diagonal.items():
                    value = d + damping if kron == "inverse" else d
                    result[n] = parts[n] / value if kron == "inverse" else parts[n] * value
                continue
            matrix = self._block_matrix(block, parts)  # [G, rows, cols, k]
            flat = matrix.reshape(-1, k)
            if kron == "inverse":
                applied = block.inverse(damping)(flat)
            else:
                applied = block @ flat
            result.update(self._unblock(block, applied.reshape(matrix.shape), k))
            if block.bias == "separate":
                bias = block.params[1]
                bb = block.bias_block
                assert bb is not None
                bias_in = parts[bias].reshape(k, -1).T  # [O, k]
                mat = torch.block_diag(*bb) if bb.ndim == 3 else bb
                if kron == "inverse":
                    eye = torch.eye(mat.shape[-1], dtype=mat.dtype, device=mat.device)
                    out = torch.linalg.solve(mat + damping * eye, bias_in)
                else:
                    out = mat @ bias_in
                result[bias] = out.T.reshape(parts[bias].shape)
        return self._join(result)

    def _matmat(self, M: Tensor) -> Tensor:
        return self._apply(M, "forward")

    def inverse(self, damping: float = 0.0) -> LinearOperator:
        """``(KFAC + damping I)^{-1}``, exact per block (eigendecompositions)."""
        parent = self

        class _Inverse(LinearOperator):
            symmetric = True

            def _matmat(self, M: Tensor) -> Tensor:
                return parent._apply(M, "inverse", damping)

        return _Inverse(self.shape, self.dtype, self.device)

    def logdet(self, damping: float = 0.0) -> Tensor:
        """``log det(KFAC + damping I)``."""
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        for b in self.blocks.values():
            total = total + b.logdet(damping)
            if isinstance(b, KroneckerFactors) and b.bias_block is not None:
                mat = torch.block_diag(*b.bias_block) if b.bias_block.ndim == 3 else b.bias_block
                eye = torch.eye(mat.shape[-1], dtype=mat.dtype, device=mat.device)
                total = total + torch.logdet(mat + damping * eye)
        return total

    # -- closed-form eigendecomposition ---------------------------------------------------------
    def _kron_spectrum(self, name: str, block: KroneckerFactors) -> tuple[Tensor, Tensor, Tensor]:
        """``(values [G, rows, cols], left [G, rows, rows], right [G, cols, cols])``: the block's
        eigenvalues and eigenbases in its layout (eigenvector ``(g, i, j)``:
        ``left[g][:, i] right[g][:, j]^T``)."""
        la, qa, lb, qb = block.eigh()
        if la.ndim == 1:
            la, qa, lb, qb = la[None], qa[None], lb[None], qb[None]
        (l_left, left), (l_right, right) = (
            ((lb, qb), (la, qa)) if block.order == "B kron A" else ((la, qa), (lb, qb))
        )
        return l_left.unsqueeze(2) * l_right.unsqueeze(1), left, right

    def _spectra(self) -> list[tuple[Tensor, Callable[[Tensor], dict[str, Tensor]]]]:
        """Per block: its eigenvalues (flat) and a builder of the eigenvectors for selected
        flat indices ``[m]`` as per-parameter ``[m, *shape]`` tensors."""
        out: list[tuple[Tensor, Callable[[Tensor], dict[str, Tensor]]]] = []
        for name, block in self.blocks.items():
            if isinstance(block, DiagonalFactors):
                names = list(block.diagonal)
                flat = torch.cat([block.diagonal[n].reshape(-1) for n in names])

                def unit(idx: Tensor, names: list[str] = names, n_all: int = flat.numel()):
                    E = torch.zeros(idx.numel(), n_all, dtype=self.dtype, device=self.device)
                    E[torch.arange(idx.numel(), device=idx.device), idx] = 1.0
                    parts = torch.split(E, [self.params[n].numel() for n in names], 1)
                    return {n: e.reshape(-1, *self.params[n].shape) for n, e in zip(names, parts)}

                out.append((flat, unit))
                continue
            values, left, right = self._kron_spectrum(name, block)
            G, rows, cols = values.shape

            def vectors(idx: Tensor, block=block, left=left, right=right, dims=(G, rows, cols)):
                G_, r_, c_ = dims
                g, rem = idx // (r_ * c_), idx % (r_ * c_)
                i, j = rem // c_, rem % c_
                outer = left[g, :, i].unsqueeze(2) * right[g, :, j].unsqueeze(1)  # [m, r, c]
                M = torch.zeros(idx.numel(), G_, r_, c_, dtype=self.dtype, device=self.device)
                M[torch.arange(idx.numel(), device=idx.device), g] = outer
                return self._unblock(block, M.permute(1, 2, 3, 0), idx.numel())

            out.append((values.reshape(-1), vectors))
        return out

    def eigvalsh(self) -> Tensor:
        """All ``P`` eigenvalues, ascending, in closed form (products of the factors'
        eigenvalues; corrected eigenvalues for EKFAC; the diagonal of diagonal blocks)."""
        return torch.sort(torch.cat([v for v, _ in self._spectra()])).values

    def eigh(self, k: int | None = None, which: str = "largest") -> tuple[Tensor, Tensor]:
        """The ``k`` largest (or smallest) eigenpairs in closed form: ``(eigenvalues [k],
        eigenvectors [P, k])``, in ``which`` order (like :func:`beyondgrad.linalg.eigsh`).
        Eigenvectors are the Kronecker products of the factors' eigenvectors, laid out over
        the operator's parameters (zero outside their block). ``k=None``: all ``P`` pairs (a
        dense ``[P, P]`` matrix: small models only)."""
        spectra = self._spectra()
        values = torch.cat([v for v, _ in spectra])
        owner = torch.cat(
            [torch.full((v.numel(),), b, device=v.device) for b, (v, _) in enumerate(spectra)]
        )
        starts = torch.cumsum(torch.tensor([0] + [v.numel() for v, _ in spectra[:-1]]), 0)
        chosen = _select(values, k, which, self.shape[0])
        offsets, start = {}, 0
        for n, size in zip(self.names, self.sizes):
            offsets[n] = (start, size)
            start += size
        U = torch.zeros(self.shape[0], chosen.numel(), dtype=self.dtype, device=self.device)
        for b, (_, build) in enumerate(spectra):
            cols = (owner[chosen] == b).nonzero().flatten()
            if cols.numel() == 0:
                continue
            for n, vec in build(chosen[cols] - int(starts[b])).items():
                a, size = offsets[n]
                U[a : a + size, cols] = vec.reshape(cols.numel(), size).T
        return values[chosen], U

    def trace(self) -> Tensor:
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        for b in self.blocks.values():
            if isinstance(b, DiagonalFactors):
                total = total + sum(d.sum() for d in b.diagonal.values())
            else:
                trace_a = torch.diagonal(b.A, dim1=-2, dim2=-1).sum(-1)
                trace_b = torch.diagonal(b.B, dim1=-2, dim2=-1).sum(-1)
                total = total + (trace_a * trace_b).sum()
                if b.bias_block is not None:
                    total = total + torch.diagonal(b.bias_block, dim1=-2, dim2=-1).sum()
        return total


def _select(values: Tensor, k: int | None, which: str, P: int) -> Tensor:
    """Indices of the ``k`` largest/smallest entries of ``values`` in ``which`` order."""
    if which not in ("largest", "smallest"):
        raise ValueError(f"which must be 'largest' or 'smallest', got {which!r}")
    k = P if k is None else k
    if not 1 <= k <= P:
        raise ValueError(f"k must be in [1, {P}], got {k}")
    return torch.sort(values, descending=which == "largest", stable=True).indices[:k]


def _restrict(
    block: KroneckerFactors | DiagonalFactors, wanted: set[str]
) -> KroneckerFactors | DiagonalFactors | None:
    """The principal sub-block of ``block`` over the parameters in ``wanted`` (None: none)."""
    keep = [p for p in block.params if p in wanted]
    if not keep:
        return None
    if len(keep) == len(block.params):
        return block
    if isinstance(block, DiagonalFactors):
        diag = {n: v for n, v in block.diagonal.items() if n in wanted}
        return DiagonalFactors(diag, block.fisher_type, block.R, block.num_data)
    if keep[0] != block.params[0] or block.bias != "joint":
        raise ValueError(
            f"a subset with the bias {keep} but not the weight {block.params[0]!r} of its "
            "Kronecker block is not supported; add the weight"
        )
    A = block.A[..., :-1, :-1]  # the weight rows/columns of the joint A
    return KroneckerFactors(
        A.clone(), block.B, block.order, tuple(keep), None, block.fisher_type,
        block.kfac_approx, block.R, block.num_data, None, block.weight_perm,
    )  # fmt: skip
