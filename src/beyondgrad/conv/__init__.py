"""Convolution toolkit: N-d im2col (``unfold``, ``unfold_transpose``, ``fold``), index
patterns, and convolutions as einsum expressions (``beyondgrad.conv.einsum``)."""

from . import einsum
from .patterns import conv_output_size, conv_transpose_output_size, index_pattern
from .unfold import fold, unfold, unfold_transpose

__all__ = [
    "conv_output_size",
    "conv_transpose_output_size",
    "einsum",
    "fold",
    "index_pattern",
    "unfold",
    "unfold_transpose",
]
