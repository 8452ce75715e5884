"""Per-sample gradient *forms*: how a parameter's per-sample gradients are represented.

A rule turns what the engine captured for a layer (its inputs ``x`` and the backpropagated output
gradients ``g``) into one form per parameter. A form knows how to reduce itself to every
first-order quantity, choosing the cheapest contraction for its shapes; most never build the
``[N, *shape]`` tensor of per-sample gradients unless it is asked for.

Three forms cover every layer:

* :class:`OuterForm` -- ``grad_n = sum_s G[n, s]^T A[n, s]`` (``nn.Linear`` weights; later the
  unfolded convolutions). ``s`` runs over the *shared axis* (sequence positions, several calls).
* :class:`ScatterForm` -- ``grad_n = sum_s onehot(I[n, s]) G[n, s]^T`` (``nn.Embedding``).
* :class:`SampleForm` -- the per-sample gradients themselves, ``[N, *shape]`` (biases,
  normalization layers, the generic rule, and sums of forms of different kinds).

Conventions: ``N`` is the number of samples (the leading axis of the model input); the per-sample
gradients sum to the gradient of the loss as ``loss_fn`` defines it (so they carry the reduction
factor, e.g. 1/N for ``reduction="mean"``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from torch import Tensor

# Chunking bound for temporaries of per-sample gradients that are reduced right away
# (sum of squares with a shared axis): number of elements per chunk.
_CHUNK_ELEMENTS = 1 << 24


class Form(ABC):
    """Per-sample gradients of one parameter of shape ``shape`` for ``num_samples`` samples.

    The public reductions are memoized per form, so several quantities requested together
    share work (e.g. ``Variance`` reuses ``Grad`` and ``SumGradSquared``); once the per-sample
    gradients are materialized, the other reductions read them instead of recomputing.
    Subclasses implement the ``_``-prefixed methods.
    """

    shape: torch.Size
    num_samples: int

    @abstractmethod
    def select(self, index: Tensor) -> Form:
        """The form restricted to the samples ``index`` (a 1-d long tensor)."""

    def _memo(self, key: str, fn) -> Tensor:
        cache = self.__dict__.setdefault("_cache", {})
        if key not in cache:
            cache[key] = fn()
        return cache[key]

    def seed(self, key: str, value: Tensor) -> None:
        """Provide a reduction computed elsewhere (e.g. the gradient from autograd)."""
        self.__dict__.setdefault("_cache", {})[key] = value

    @property
    def materialized(self) -> bool:
        return "batch_grad" in self.__dict__.get("_cache", {})

    def batch_grad(self, out: Tensor | None = None) -> Tensor:
        """Per-sample gradients, ``[N, *shape]``; written into ``out`` if given (memory reuse
        across calls: a fresh allocation of this size costs more than computing it)."""
        if out is None:
            return self._memo("batch_grad", self._batch_grad)
        if out.shape != (self.num_samples, *self.shape):
            raise ValueError(
                f"out has shape {tuple(out.shape)}, expected {(self.num_samples, *self.shape)}"
            )
        self.__dict__.setdefault("_cache", {})["batch_grad"] = self._batch_grad(out)
        return out

    def grad(self) -> Tensor:
        """Sum of the per-sample gradients, ``shape``."""
        if self.materialized:
            return self._memo("grad", lambda: self.batch_grad().sum(0))
        return self._memo("grad", self._grad)

    def batch_l2(self) -> Tensor:
        """Squared Euclidean norms of the per-sample gradients, ``[N]``."""
        if self.materialized:
            return self._memo("batch_l2", lambda: Form._batch_l2(self))
        return self._memo("batch_l2", self._batch_l2)

    def batch_dot(self) -> Tensor:
        """Inner products of per-sample gradients, ``[N, N]``."""
        if self.materialized:
            return self._memo("batch_dot", lambda: Form._batch_dot(self))
        return self._memo("batch_dot", self._batch_dot)

    def sum_grad_squared(self) -> Tensor:
        """Sum over samples of the element-wise squared per-sample gradients, ``shape``."""
        if self.materialized:
            return self._memo("sgs", lambda: Form._sum_grad_squared(self))
        return self._memo("sgs", self._sum_grad_squared)

    # -- defaults from materialized per-sample gradients --------------------------------------
    @abstractmethod
    def _batch_grad(self, out: Tensor | None = None) -> Tensor: ...

    def _grad(self) -> Tensor:
        return self.batch_grad().sum(0)

    def _batch_l2(self) -> Tensor:
        return self.batch_grad().flatten(1).pow(2).sum(1)

    def _batch_dot(self) -> Tensor:
        flat = self.batch_grad().flatten(1)
        return flat @ flat.T

    def _sum_grad_squared(self) -> Tensor:
        return self.batch_grad().pow(2).sum(0)


class SampleForm(Form):
    """Materialized per-sample gradients ``values`` of shape ``[N, *shape]``."""

    def __init__(self, values: Tensor):
        self.values = values
        self.shape = values.shape[1:]
        self.num_samples = values.shape[0]

    def select(self, index: Tensor) -> SampleForm:
        return SampleForm(self.values.index_select(0, index))

    def _batch_grad(self, out: Tensor | None = None) -> Tensor:
        return self.values if out is None else out.copy_(self.values)

    def _grad(self) -> Tensor:
        return self.values.sum(0)


class OuterForm(Form):
    """``grad_n = sum_s G[n, s]^T A[n, s]`` reshaped to ``shape``.

    ``A``: ``[N, S, I]`` (layer inputs, the *input side*), ``G``: ``[N, S, O]`` (output
    gradients, the *output side*), with ``prod(shape) == O * I`` and the row-major layout
    ``[O, I]`` of ``nn.Linear.weight``.
    """

    def __init__(self, A: Tensor, G: Tensor, shape: torch.Size):
        if A.shape[:2] != G.shape[:2]:
            raise ValueError(f"OuterForm: A {tuple(A.shape)} and G {tuple(G.shape)} disagree")
        self.A, self.G, self.shape = A, G, torch.Size(shape)
        self.num_samples = A.shape[0]

    @property
    def _sizes(self) -> tuple[int, int, int, int]:
        N, S, I = self.A.shape
        return N, S, I, self.G.shape[2]

    def select(self, index: Tensor) -> OuterForm:
        return OuterForm(self.A.index_select(0, index), self.G.index_select(0, index), self.shape)

    def _batch_grad(self, out: Tensor | None = None) -> Tensor:
        N, S, I, O = self._sizes
        target = None if out is None else out.view(N, O, I)
        if S == 1:
            res = torch.mul(self.G.reshape(N, O, 1), self.A.reshape(N, 1, I), out=target)
        else:
            res = torch.bmm(self.G.transpose(1, 2), self.A, out=target)
        return res.reshape(N, *self.shape)

    def _grad(self) -> Tensor:
        N, S, I, O = self._sizes
        return (self.G.reshape(N * S, O).T @ self.A.reshape(N * S, I)).reshape(self.shape)

    def _batch_l2(self) -> Tensor:
        N, S, I, O = self._sizes
        if S == 1:
            return self.A.reshape(N, I).pow(2).sum(1) * self.G.reshape(N, O).pow(2).sum(1)
        if S * (I + O) <= I * O:  # Gram trick: sum_{s,t} (A_s . A_t)(G_s . G_t)
            gram_a = torch.bmm(self.A, self.A.transpose(1, 2))
            gram_g = torch.bmm(self.G, self.G.transpose(1, 2))
            return (gram_a * gram_g).sum((1, 2))
        return Form._batch_l2(self)

    def _batch_dot(self) -> Tensor:
        N, S, I, O = self._sizes
        gram_cost = (N * S) ** 2 * (I + O)
        materialize_cost = N * S * I * O + N * N * I * O
        if gram_cost <= materialize_cost:
            A, G = self.A.reshape(N * S, I), self.G.reshape(N * S, O)
            return ((A @ A.T) * (G @ G.T)).reshape(N, S, N, S).sum((1, 3))
        return Form._batch_dot(self)

    def _sum_grad_squared(self) -> Tensor:
        N, S, I, O = self._sizes
        if S == 1:
            return (self.G.reshape(N, O).pow(2).T @ self.A.reshape(N, I).pow(2)).reshape(self.shape)
        # materialize per-sample gradients chunk by chunk; their sum is the gradient, kept
        # for free (Variance needs both)
        chunk = max(1, _CHUNK_ELEMENTS // max(1, I * O))
        total = self.A.new_zeros(O, I)
        grad = self.A.new_zeros(O, I)
        for start in range(0, N, chunk):
            stop = min(N, start + chunk)
            per_sample = torch.bmm(self.G[start:stop].transpose(1, 2), self.A[start:stop])
            grad += per_sample.sum(0)
            total += per_sample.square_().sum(0)
        if "grad" not in self.__dict__.get("_cache", {}):
            self.seed("grad", grad.reshape(self.shape))
        return total.reshape(self.shape)


class ScatterForm(Form):
    """``grad_n[v] = sum_{s : I[n, s] = v} G[n, s]``: an embedding table ``[num, d]``.

    ``index``: ``[N, S]`` long, ``G``: ``[N, S, d]``. Rows of ``G`` whose index must not receive
    gradient (``padding_idx``) are expected to be zeroed by the rule.
    """

    def __init__(self, index: Tensor, G: Tensor, num: int):
        self.index, self.G, self.num = index, G, num
        self.shape = torch.Size((num, G.shape[-1]))
        self.num_samples = index.shape[0]

    def select(self, index: Tensor) -> ScatterForm:
        return ScatterForm(
            self.index.index_select(0, index), self.G.index_select(0, index), self.num
        )

    def _flat(self) -> tuple[Tensor, Tensor]:
        N, S = self.index.shape
        return self.index.reshape(N * S), self.G.reshape(N * S, -1)

    def _grad(self) -> Tensor:
        idx, G = self._flat()
        return G.new_zeros(self.shape).index_add_(0, idx, G)

    def _batch_grad(self, out: Tensor | None = None) -> Tensor:
        N, S = self.index.shape
        idx, G = self._flat()
        sample = torch.arange(N, device=idx.device).repeat_interleave(S)
        res = (
            G.new_zeros(N * self.num, G.shape[1])
            if out is None
            else out.view(N * self.num, -1).zero_()
        )
        res.index_add_(0, sample * self.num + idx, G)
        return res.reshape(N, *self.shape)

    def _batch_l2(self) -> Tensor:
        same = self.index.unsqueeze(2) == self.index.unsqueeze(1)
        gram_g = torch.bmm(self.G, self.G.transpose(1, 2))
        return (gram_g * same).sum((1, 2))

    def _batch_dot(self) -> Tensor:
        N, S = self.index.shape
        idx, G = self._flat()
        same = idx.unsqueeze(1) == idx.unsqueeze(0)
        return ((G @ G.T) * same).reshape(N, S, N, S).sum((1, 3))

    def _sum_grad_squared(self) -> Tensor:
        N, S = self.index.shape
        idx, G = self._flat()
        sample = torch.arange(N, device=idx.device).repeat_interleave(S)
        keys, inverse = torch.unique(sample * self.num + idx, return_inverse=True)
        rows = G.new_zeros(keys.numel(), G.shape[1]).index_add_(0, inverse, G)
        return G.new_zeros(self.shape).index_add_(0, keys % self.num, rows.pow(2))


class SumForm(Form):
    """The sum of forms of one parameter that cannot be merged into one (e.g. a weight tied
    between an ``nn.Embedding`` and an ``nn.Linear``)."""

    def __init__(self, parts: Sequence[Form]):
        self.parts = list(parts)
        self.shape = self.parts[0].shape
        self.num_samples = self.parts[0].num_samples

    def select(self, index: Tensor) -> SumForm:
        return SumForm([p.select(index) for p in self.parts])

    def _grad(self) -> Tensor:
        return sum((p.grad() for p in self.parts[1:]), self.parts[0].grad())

    def _batch_grad(self, out: Tensor | None = None) -> Tensor:
        first = self.parts[0]._batch_grad(out)
        if out is None:
            first = first.clone()
        for p in self.parts[1:]:
            first += p.batch_grad()
        return first

    def _batch_l2(self) -> Tensor:
        """``|sum_i a_i|^2 = sum_i |a_i|^2 + 2 sum_{i<j} <a_i, a_j>`` with cross terms that avoid
        materializing where a contraction exists (outer x scatter: a tied embedding)."""
        total = sum((p.batch_l2() for p in self.parts[1:]), self.parts[0].batch_l2())
        for i, a in enumerate(self.parts):
            for b in self.parts[i + 1 :]:
                total = total + 2 * _cross_dot(a, b)
        return total


class ConcatForm(Form):
    """A parameter whose leading axis is the concatenation of the parts' parameters (the
    groups of a grouped convolution)."""

    def __init__(self, parts: Sequence[Form]):
        self.parts = list(parts)
        first = self.parts[0].shape
        self.shape = torch.Size((sum(p.shape[0] for p in self.parts), *first[1:]))
        self.num_samples = self.parts[0].num_samples

    def select(self, index: Tensor) -> ConcatForm:
        return ConcatForm([p.select(index) for p in self.parts])

    def _batch_grad(self, out: Tensor | None = None) -> Tensor:
        return torch.cat([p.batch_grad() for p in self.parts], 1, out=out)

    def _grad(self) -> Tensor:
        return torch.cat([p.grad() for p in self.parts], 0)

    def _batch_l2(self) -> Tensor:
        return sum((p.batch_l2() for p in self.parts[1:]), self.parts[0].batch_l2())

    def _batch_dot(self) -> Tensor:
        return sum((p.batch_dot() for p in self.parts[1:]), self.parts[0].batch_dot())

    def _sum_grad_squared(self) -> Tensor:
        return torch.cat([p.sum_grad_squared() for p in self.parts], 0)


class PermutedForm(Form):
    """The parameter is ``base``'s parameter with its axes permuted by ``perm`` (the weight of
    a transposed convolution, ``[C_in, C_out, *K]``, from an outer form over
    ``[C_out, C_in, *K]``)."""

    def __init__(self, base: Form, perm: Sequence[int]):
        self.base, self.perm = base, tuple(perm)
        self.shape = torch.Size(base.shape[p] for p in self.perm)
        self.num_samples = base.num_samples

    def select(self, index: Tensor) -> PermutedForm:
        return PermutedForm(self.base.select(index), self.perm)

    def _batch_grad(self, out: Tensor | None = None) -> Tensor:
        res = self.base.batch_grad().permute(0, *(p + 1 for p in self.perm))
        return res if out is None else out.copy_(res)

    def _grad(self) -> Tensor:
        return self.base.grad().permute(self.perm)

    def _batch_l2(self) -> Tensor:
        return self.base.batch_l2()

    def _batch_dot(self) -> Tensor:
        return self.base.batch_dot()

    def _sum_grad_squared(self) -> Tensor:
        return self.base.sum_grad_squared().permute(self.perm)


def _cross_dot(a: Form, b: Form) -> Tensor:
    """Per-sample inner products ``<a_n, b_n>``, ``[N]``."""
    if isinstance(a, ScatterForm) and isinstance(b, OuterForm):
        a, b = b, a
    if isinstance(a, OuterForm) and isinstance(b, ScatterForm):
        # <sum_t G_t A_t^T, sum_s onehot(I_s) E_s^T> = sum_{t,s} G[t, I_s] (A_t . E_s)
        N, T, _ = a.G.shape
        S = b.index.shape[1]
        inner = torch.bmm(a.A, b.G.transpose(1, 2))  # [N, T, S]
        picked = a.G.gather(2, b.index.unsqueeze(1).expand(N, T, S))  # G[n, t, I[n, s]]
        return (inner * picked).sum((1, 2))
    return (a.batch_grad() * b.batch_grad()).flatten(1).sum(1)


def merge_forms(forms: Sequence[Form]) -> Form:
    """One form for the sum of ``forms`` (all of one parameter, same samples).

    Outer and scatter forms of equal feature sizes are merged by concatenating their shared
    axes (exact: the per-sample gradient is a sum over that axis); anything else becomes a
    :class:`SumForm`.
    """
    if len(forms) == 1:
        return forms[0]
    first = forms[0]
    if all(isinstance(f, OuterForm) for f in forms):
        feats = {(f.A.shape[2], f.G.shape[2]) for f in forms}  # type: ignore[attr-defined]
        if len(feats) == 1:
            return OuterForm(
                torch.cat([f.A for f in forms], 1),  # type: ignore[attr-defined]
                torch.cat([f.G for f in forms], 1),  # type: ignore[attr-defined]
                first.shape,
            )
    if all(isinstance(f, ScatterForm) for f in forms):
        return ScatterForm(
            torch.cat([f.index for f in forms], 1),  # type: ignore[attr-defined]
            torch.cat([f.G for f in forms], 1),  # type: ignore[attr-defined]
            first.num,  # type: ignore[attr-defined]
        )
    if all(isinstance(f, ConcatForm) for f in forms) and len({len(f.parts) for f in forms}) == 1:  # type: ignore[attr-defined]
        return ConcatForm([merge_forms(parts) for parts in zip(*(f.parts for f in forms))])  # type: ignore[attr-defined]
    if all(isinstance(f, PermutedForm) for f in forms) and len({f.perm for f in forms}) == 1:  # type: ignore[attr-defined]
        return PermutedForm(merge_forms([f.base for f in forms]), forms[0].perm)  # type: ignore[attr-defined]
    if all(isinstance(f, SampleForm) for f in forms):
        return SampleForm(sum((f.values for f in forms[1:]), forms[0].values))  # type: ignore[attr-defined]
    return SumForm(forms)
