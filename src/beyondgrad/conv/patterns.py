"""Index patterns: a convolution along one spatial dimension as a binary tensor.

``Pi[k, o, i] = 1`` iff input position ``i`` feeds output position ``o`` through kernel tap
``k``. For a convolution with stride ``s``, dilation ``d`` and left padding ``p``::

    Pi[k, o, i] = [i == o * s - p + k * d]

and for the transposed convolution (the adjoint map, with output length
``O_t = (I - 1) s - 2 p + d (K - 1) + op + 1``)::

    Pi_t[k, o, i] = [o == i * s - p + k * d]

Padding is an int (both sides), a pair ``(left, right)``, ``"valid"`` (0) or ``"same"``
(``d (K - 1)`` in total, the extra unit on the right, as in PyTorch). Patterns are cached per
(sizes, hyper-parameters, device, dtype).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch
from torch import Tensor

Padding = int | str | tuple[int, int]


def _pair_padding(padding: Padding, kernel_size: int, dilation: int) -> tuple[int, int]:
    if isinstance(padding, str):
        if padding == "valid":
            return 0, 0
        if padding == "same":
            total = dilation * (kernel_size - 1)
            return total // 2, total - total // 2
        raise ValueError(f"padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
    if isinstance(padding, int):
        return padding, padding
    left, right = padding
    return int(left), int(right)


def _check_positive(**values: int) -> None:
    for name, v in values.items():
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")


def conv_output_size(
    input_size: int, kernel_size: int, stride: int = 1, padding: Padding = 0, dilation: int = 1
) -> int:
    """Output length of a convolution along one dimension.

    Args:
        input_size: Input length ``I`` (positive).
        kernel_size: Kernel length ``K`` (positive).
        stride: Stride ``s`` (positive).
        padding: Zero padding: an int (both sides), a pair ``(left, right)``, ``"valid"`` or
            ``"same"`` (stride 1 only, as in PyTorch).
        dilation: Dilation ``d`` (positive).

    Returns:
        ``O = (I + left + right - d (K - 1) - 1) // s + 1``.

    Raises:
        ValueError: On a non-positive size or hyper-parameter, an unknown padding string,
            ``"same"`` with a stride, or a kernel that does not fit the padded input.
    """
    _check_positive(
        input_size=input_size, kernel_size=kernel_size, stride=stride, dilation=dilation
    )
    left, right = _pair_padding(padding, kernel_size, dilation)
    if isinstance(padding, str) and padding == "same" and stride != 1:
        raise ValueError("padding='same' needs stride 1 (as in PyTorch)")
    span = input_size + left + right - dilation * (kernel_size - 1)
    if span < 1:
        raise ValueError(
            f"kernel (size {kernel_size}, dilation {dilation}) is larger than the padded input "
            f"({input_size} + {left} + {right})"
        )
    return (span - 1) // stride + 1


def conv_transpose_output_size(
    input_size: int,
    kernel_size: int,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
    output_padding: int = 0,
) -> int:
    """Output length of a transposed convolution along one dimension.

    Args:
        input_size: Input length ``I`` (positive).
        kernel_size: Kernel length ``K`` (positive).
        stride: Stride ``s`` (positive).
        padding: Padding ``p`` of the convolution this one transposes (an int).
        dilation: Dilation ``d`` (positive).
        output_padding: Extra length on the right, ``0 <= op < max(s, d)``.

    Returns:
        ``O_t = (I - 1) s - 2 p + d (K - 1) + op + 1``.

    Raises:
        ValueError: On a non-positive size or hyper-parameter, an ``output_padding`` out of
            range, or an empty output.
    """
    _check_positive(
        input_size=input_size, kernel_size=kernel_size, stride=stride, dilation=dilation
    )
    if not 0 <= output_padding < max(stride, dilation):
        raise ValueError(
            f"output_padding must be smaller than stride or dilation, got {output_padding}"
        )
    out = (
        (input_size - 1) * stride - 2 * padding + dilation * (kernel_size - 1) + output_padding + 1
    )
    if out < 1:
        raise ValueError(f"transposed convolution output would be empty ({out})")
    return out


@lru_cache(maxsize=512)
def _pattern(
    input_size: int,
    kernel_size: int,
    stride: int,
    left: int,
    dilation: int,
    output_size: int,
    transposed: bool,
    device: torch.device,
    dtype: torch.dtype,
) -> Tensor:
    k = torch.arange(kernel_size, device=device).view(-1, 1, 1)
    if transposed:  # o == i * s - p + k * d, shape [K, O_t, I]
        o = torch.arange(output_size, device=device).view(1, -1, 1)
        i = torch.arange(input_size, device=device).view(1, 1, -1)
        hit = o == i * stride - left + k * dilation
    else:  # i == o * s - p + k * d, shape [K, O, I]
        o = torch.arange(output_size, device=device).view(1, -1, 1)
        i = torch.arange(input_size, device=device).view(1, 1, -1)
        hit = i == o * stride - left + k * dilation
    return hit.to(dtype)


def index_pattern(
    input_size: int,
    kernel_size: int,
    stride: int = 1,
    padding: Padding = 0,
    dilation: int = 1,
    *,
    transposed: bool = False,
    output_padding: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The index pattern ``Pi[k, o, i]`` of one spatial dimension (see the module docstring).

    ``Pi[k, o, i] = 1`` iff input position ``i`` feeds output position ``o`` through kernel tap
    ``k``. With ``transposed=True`` it describes ``conv_transpose`` with the given
    hyper-parameters; ``O`` is then the transposed convolution's output length.

    Args:
        input_size: Input length ``I``.
        kernel_size: Kernel length ``K``.
        stride: Stride.
        padding: Zero padding as in ``conv_output_size`` (an int when ``transposed``).
        dilation: Dilation.
        transposed: Describe the transposed convolution instead.
        output_padding: Extra output length on the right (``transposed`` only).
        device: Device of the result (default CPU).
        dtype: Dtype of the result (default float32).

    Returns:
        A binary tensor of shape ``[K, O, I]``, cached per arguments (do not modify it in
        place).

    Raises:
        ValueError: On invalid sizes or hyper-parameters, or a non-integer padding with
            ``transposed=True``.
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if transposed:
        if not isinstance(padding, int):
            raise ValueError("transposed convolutions take an integer padding")
        out = conv_transpose_output_size(
            input_size, kernel_size, stride, padding, dilation, output_padding
        )
        return _pattern(input_size, kernel_size, stride, padding, dilation, out, True, dev, dtype)
    out = conv_output_size(input_size, kernel_size, stride, padding, dilation)
    left, _ = _pair_padding(padding, kernel_size, dilation)
    return _pattern(input_size, kernel_size, stride, left, dilation, out, False, dev, dtype)


def as_tuple(value: int | Sequence[int], dims: int, name: str) -> tuple[int, ...]:
    """Broadcast an int hyper-parameter to ``dims`` spatial dimensions."""
    if isinstance(value, int):
        return (value,) * dims
    value = tuple(int(v) for v in value)
    if len(value) != dims:
        raise ValueError(f"{name} needs {dims} entries, got {value}")
    return value


def as_paddings(padding: Padding | Sequence[int], dims: int) -> tuple[Padding, ...]:
    """Broadcast a padding spec (int, str, or one int per dimension) to ``dims`` dimensions."""
    if isinstance(padding, (int, str)):
        return (padding,) * dims
    padding = tuple(padding)
    if len(padding) != dims:
        raise ValueError(f"padding needs {dims} entries, got {padding}")
    return padding  # type: ignore[return-value]
