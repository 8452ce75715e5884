"""The generic rule: per-sample VJPs of a module w.r.t. its own parameters, vmapped.

For a captured call ``out = module(*args, **kwargs)`` with output gradients ``g`` the per-sample
gradient of sample ``n`` is ``vjp_theta(module(args_n), g_n)``. Each sample is evaluated as a batch
of one (the sample axis is re-inserted with length 1), so modules written for batched inputs work
unchanged; ``torch.func.vmap`` runs all samples at once.

Which axis of each tensor is the sample axis: the engine's probe (``axes``, see
:mod:`beyondgrad.engine.samples`) decides it from how the tensors change with the batch size.
Without a probe, a tensor argument is batched along axis 0 if its length there equals the number
of samples ``N``, and shared otherwise (a mask, a lookup table); ``nn.MultiheadAttention`` and
the recurrent layers know their own layout. An output without a sample axis (a call on shared
inputs only) receives per-sample gradients ``[K, N, *output.shape]`` from the engine; its
per-sample gradient is the VJP of the unchanged call with sample ``n``'s cotangent.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..forms import Form, SampleForm

UNKNOWN_AXIS = -1  # engine.samples.UNKNOWN: samples merged with another axis

AxisFn = Callable[[nn.Module, str, Tensor, int], "int | None"]


def _default_axis(module: nn.Module, name: str, t: Tensor, N: int) -> int | None:
    return 0 if t.ndim > 0 and t.shape[0] == N else None


def _mha_axis(module: nn.Module, name: str, t: Tensor, N: int) -> int | None:
    if name in ("query", "key", "value"):
        return 0 if module.batch_first else 1  # type: ignore[union-attr]
    if name == "key_padding_mask":
        return 0
    if name == "attn_mask":
        if t.ndim == 3:
            raise NotImplementedError(
                f"{type(module).__name__}: a 3-d attn_mask ([N*num_heads, L, S]) is not "
                "supported for per-sample quantities; pass a 2-d attn_mask or key_padding_mask"
            )
        return None
    return _default_axis(module, name, t, N)


def _mha_output_axes(module: nn.Module, outputs: list[Tensor | None]) -> list[int | None]:
    first = 0 if module.batch_first else 1  # type: ignore[union-attr]
    return [first, 0][: len(outputs)]


def _rnn_axis(module: nn.Module, name: str, t: Tensor, N: int) -> int | None:
    if name == "input":
        return 0 if module.batch_first else 1  # type: ignore[union-attr]
    if name == "hx":  # [layers * directions, N, H] (a tuple of two for LSTM)
        return 1
    return _default_axis(module, name, t, N)


def _rnn_output_axes(module: nn.Module, outputs: list[Tensor | None]) -> list[int | None]:
    first = 0 if module.batch_first else 1  # type: ignore[union-attr]
    return [first] + [1] * (len(outputs) - 1)  # output, then h_n (and c_n)


_INPUT_AXES: dict[type, AxisFn] = {nn.MultiheadAttention: _mha_axis, nn.RNNBase: _rnn_axis}


def _positional_names(module: nn.Module, count: int) -> list[str]:
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        params = []
    names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return [names[i] if i < len(names) else f"arg{i}" for i in range(count)]


def _loop(
    per_sample: Callable[[list, tuple], dict[str, Tensor]],
    flat_in: list,
    in_axes: list[int | None],
    grads: tuple,
    grad_axes: tuple,
    N: int,
    vectors: int,
) -> dict[str, Tensor]:
    """``per_sample`` evaluated sample by sample (and vector by vector); stacked like vmap."""
    rows: list[dict[str, Tensor]] = []
    for k in range(vectors):
        grads_k = grads if vectors == 1 else tuple(g[k] for g in grads)
        for n in range(N):
            inputs_n = [
                leaf.select(ax, n) if ax is not None else leaf for leaf, ax in zip(flat_in, in_axes)
            ]
            grads_n = tuple(g.select(ax, n) for g, ax in zip(grads_k, grad_axes))
            rows.append(per_sample(inputs_n, grads_n))
    stacked = {name: torch.stack([r[name] for r in rows]) for name in rows[0]}
    if vectors > 1:
        stacked = {name: v.reshape(vectors, N, *v.shape[1:]) for name, v in stacked.items()}
    return stacked


def generic_forms(
    module: nn.Module,
    params: dict[str, nn.Parameter],
    args: tuple,
    kwargs: dict,
    output: Any,
    output_grads: list[Tensor | None],
    num_samples: int,
    vectors: int = 1,
    axes: Any = None,
) -> dict[str, Form]:
    """Per-row gradients of ``params`` (names relative to ``module``) for one call.

    ``output_grads`` lists, for each tensor leaf of ``output`` (pytree order), the ``K``
    backpropagated vectors' gradients w.r.t. it, ``[K, *leaf.shape]`` (``None`` where they do
    not reach the loss; ``[K, N, *leaf.shape]`` for a leaf without a sample axis when
    ``axes`` is given). ``axes``: the probed :class:`~beyondgrad.engine.samples.CallAxes`
    of the call, or ``None`` (the length convention).
    """
    N = num_samples
    flat_in, in_spec, in_axes = _input_axes(module, args, kwargs, N)
    flat_out, _ = tree_flatten(output)
    out_axes = _output_axes(module, flat_out, N)
    if axes is not None:
        in_axes, out_axes = list(axes.inputs), list(axes.outputs)
    used = [i for i, g in enumerate(output_grads) if g is not None]
    shared = [axes is not None and out_axes[i] is None for i in used]
    _check_axes(module, flat_out, in_axes, [out_axes[i] for i in used], used, shared, N)
    grads = tuple(output_grads[i] for i in used)
    # a shared output's gradients carry the sample axis in front: [K, N, *shape]
    grad_axes = tuple(0 if sh else out_axes[i] for i, sh in zip(used, shared))
    primals = {name: p.detach() for name, p in params.items()}
    # every other parameter/buffer of the module enters as a constant (no graph is built)
    constants = {
        name: t.detach()
        for name, t in [*module.named_parameters(), *module.named_buffers()]
        if name not in primals
    }

    def per_sample(flat_in_n: list, grads_n: tuple) -> dict[str, Tensor]:
        flat_b = [
            leaf.unsqueeze(ax) if ax is not None else leaf for leaf, ax in zip(flat_in_n, in_axes)
        ]
        call_args, call_kwargs = tree_unflatten(flat_b, in_spec)

        def f(p: dict[str, Tensor]) -> tuple[Tensor, ...]:
            state = {**constants, **p}
            out = tree_flatten(functional_call(module, state, tuple(call_args), call_kwargs))[0]
            return tuple(out[i] for i in used)

        _, vjp_fn = vjp(f, primals)
        cot = tuple(g if sh else g.unsqueeze(ax) for g, ax, sh in zip(grads_n, grad_axes, shared))
        return vjp_fn(cot)[0]

    per_sample_grads = _vmapped(module, per_sample, flat_in, in_axes, grads, grad_axes, N, vectors)
    return {
        name: SampleForm(v.reshape(vectors * N, *v.shape[1 + (vectors > 1) :]), vectors)
        for name, v in per_sample_grads.items()
    }


def _check_axes(
    module: nn.Module,
    flat_out: list,
    in_axes: list,
    used_axes: list,
    used: list[int],
    shared: list[bool],
    N: int,
) -> None:
    """Refuse calls whose per-sample gradients are undefined or unreadable."""
    name = type(module).__name__
    if UNKNOWN_AXIS in in_axes or UNKNOWN_AXIS in used_axes:
        raise RuntimeError(
            f"generic rule for {name}: a tensor of this call has its samples merged with "
            "another axis (its length changes with the batch size, but not as one axis of "
            f"length {N}); per-sample gradients cannot be read from it"
        )
    for i, ax, sh in zip(used, used_axes, shared):
        if ax is None and not sh:
            raise RuntimeError(
                f"generic rule for {name}: output {i} of shape {tuple(flat_out[i].shape)} "
                f"has no sample axis of length {N}; per-sample gradients are undefined for it"
            )
    if any(shared) and any(ax is not None for ax in in_axes):
        raise RuntimeError(
            f"generic rule for {name}: an output without a sample axis is computed from "
            "batched inputs (the call couples the samples); per-sample gradients are undefined"
        )


def _vmapped(
    module: nn.Module,
    per_sample: Any,
    flat_in: list,
    in_axes: list,
    grads: tuple,
    grad_axes: tuple,
    N: int,
    vectors: int,
) -> dict[str, Tensor]:
    """``per_sample`` vmapped over the samples (and the vectors), or looped where vmap
    cannot run the module."""
    batched = vmap(per_sample, in_dims=(in_axes, grad_axes))
    if vectors > 1:  # one more vmap over the vectors (leading axis of each gradient)
        batched = vmap(batched, in_dims=(None, 0))
    else:
        grads = tuple(g[0] for g in grads)
    try:
        with warnings.catch_warnings():
            # torch's note that some fused kernels (attention) run without a batching rule
            warnings.filterwarnings("ignore", message="There is a performance drop")
            per_sample_grads = batched(flat_in, grads)
    except RuntimeError as err:
        if "random" in str(err).lower():
            raise RuntimeError(
                f"{type(module).__name__} draws random numbers in its forward (e.g. dropout in "
                "training mode); its per-sample gradients cannot be recomputed exactly. Call "
                "model.eval() or disable the randomness for this computation."
            ) from err
        # modules that vmap cannot run (e.g. recurrent layers writing batched values into
        # fresh buffers in place): the same per-sample VJPs, one sample at a time
        per_sample_grads = _loop(per_sample, flat_in, in_axes, grads, grad_axes, N, vectors)
    return per_sample_grads


def _input_axes(
    module: nn.Module, args: tuple, kwargs: dict, N: int
) -> tuple[list, Any, list[int | None]]:
    """The call's flattened (detached) inputs, their pytree spec and each leaf's sample
    axis (``None``: shared by all samples)."""
    axis_fn = next((f for t, f in _INPUT_AXES.items() if isinstance(module, t)), _default_axis)
    names = _positional_names(module, len(args)) + list(kwargs)
    flat_in, in_spec = tree_flatten((args, kwargs))
    flat_in = [t.detach() if isinstance(t, Tensor) else t for t in flat_in]
    leaf_names: list[str] = []
    for name, value in zip(names, [*args, *kwargs.values()]):
        leaf_names += [name] * len(tree_flatten(value)[0])
    in_axes = [
        axis_fn(module, name, leaf, N) if isinstance(leaf, Tensor) else None
        for name, leaf in zip(leaf_names, flat_in)
    ]
    return flat_in, in_spec, in_axes


def _output_axes(module: nn.Module, flat_out: list, N: int) -> list[int | None]:
    """Each output leaf's sample axis."""
    if isinstance(module, nn.MultiheadAttention):
        return _mha_output_axes(module, flat_out)
    if isinstance(module, nn.RNNBase):
        return _rnn_output_axes(module, flat_out)
    return [_default_axis(module, "", t, N) if isinstance(t, Tensor) else None for t in flat_out]
