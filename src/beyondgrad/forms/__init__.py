"""Per-row gradient *forms*: the currency every consumer of the engine reads.

A layer rule (:mod:`beyondgrad.rules`) turns what the engine captured for one call of a layer
(its input ``x`` and the backpropagated output gradients ``g``) into one :class:`Form` per
parameter. A form holds the ``K * N`` per-(vector, sample) gradients ``g_{k,n}`` of one
parameter (rows ordered vector-major: row ``k * N + n``) and reduces itself to every quantity
with the cheapest contraction for its shapes, mostly without building the rows.

The interface (all reductions memoized per form):

=============================  =============================================================
``batch_grad()``               the rows, ``[K N, *shape]``
``grad()``                     their sum, ``shape``
``batch_l2()``                 squared norms of the rows, ``[K N]``
``batch_dot()``                Gram matrix of the rows, ``[K N, K N]``
``sum_grad_squared()``         sum of element-wise squares, ``shape``
``batch_sum_grad_squared()``   per sample, over its K rows, ``[N, *shape]``
``cross_dot(other)``           ``[rows, other.rows]`` inner products with another form's rows
``combine(c)``                 ``sum_r c[r, j] g_r``, ``[c, *shape]``
``project(v)``                 ``<g_r, v_j>``, ``[rows, c]``
``dots_with_sum()``            ``<g_r, sum_q g_q>``, ``[rows]``
``entries(rows, flat)``        single entries of rows, ``[E]``
``select(index)``              the form restricted to some samples
``worth_materializing(b)``     whether to build the rows once for several reductions
=============================  =============================================================

Kinds: :class:`OuterForm` (Linear, unfolded convolutions), :class:`ScatterForm` (Embedding),
:class:`SampleForm` (materialized rows: biases, normalization layers, the generic rule) and
the compositions :class:`SumForm`, :class:`ConcatForm`, :class:`PermutedForm`;
:func:`merge_forms` sums the forms of several calls of one parameter.
"""

from .base import Form
from .compose import ConcatForm, PermutedForm, SumForm, merge_forms
from .outer import OuterForm
from .sample import SampleForm
from .scatter import ScatterForm

__all__ = [
    "ConcatForm",
    "Form",
    "OuterForm",
    "PermutedForm",
    "SampleForm",
    "ScatterForm",
    "SumForm",
    "merge_forms",
]
