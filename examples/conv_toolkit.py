"""The convolution toolkit: N-d im2col, index patterns, and convolutions as einsums.

Shows:

* ``bg.conv.unfold`` (any number of spatial dimensions; ``F.unfold`` in 2-d) turns a
  convolution into one matrix product: ``conv(x, W) == W.reshape(C_out, -1) @ unfold(x)``.
* ``bg.conv.index_pattern``: the binary tensor ``Pi[k, o, i]`` saying which input position
  feeds which output position through which kernel tap.
* ``bg.conv.einsum``: a grouped 3-d convolution, its per-sample weight gradients and its
  KFAC-reduce input factor as einsum contractions over index patterns (the unfolded input is
  never formed for KFAC-reduce).

Everything is compared with ``torch.nn.functional`` and autograd in float64.

Run ``python examples/conv_toolkit.py`` (``--small`` or ``BEYONDGRAD_EXAMPLES_SMALL=1`` for a
tiny run).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

import beyondgrad as bg


def parse_args() -> argparse.Namespace:
    """The ``--small`` flag (or the ``BEYONDGRAD_EXAMPLES_SMALL=1`` environment variable)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny sizes (seconds)")
    args = parser.parse_args()
    args.small = args.small or os.environ.get("BEYONDGRAD_EXAMPLES_SMALL") == "1"
    return args


def main() -> None:
    """Check unfold, index patterns and einsum convolutions against PyTorch."""
    args = parse_args()
    N, C, S = (2, 4, 6) if args.small else (8, 8, 12)
    torch.manual_seed(0)
    kw = {"dtype": torch.float64}

    # 2-d: unfold equals F.unfold, and a convolution is one matrix product
    x = torch.randn(N, C, S, S, **kw)
    W = torch.randn(5, C, 3, 3, **kw)
    U = bg.conv.unfold(x, 3, dilation=1, padding=1, stride=2)
    assert torch.equal(U, F.unfold(x, 3, dilation=1, padding=1, stride=2))
    y = (W.reshape(5, -1) @ U).reshape(N, 5, *F.conv2d(x, W, padding=1, stride=2).shape[2:])
    assert torch.allclose(y, F.conv2d(x, W, padding=1, stride=2), atol=1e-12)
    print(f"unfold {tuple(x.shape)} -> {tuple(U.shape)}; conv2d as one matmul: ok")

    # 1-d index pattern: which input feeds which output through which tap
    Pi = bg.conv.index_pattern(5, 3, stride=2, padding=1)  # [K, O, I]
    print(f"index pattern for I=5, K=3, stride 2, padding 1: shape {tuple(Pi.shape)}")
    print(Pi.sum(0).int())  # [O, I]: 1 where output o reads input i

    # 3-d grouped convolution, per-sample weight gradients and KFAC-reduce via einsum
    x3 = torch.randn(N, C, S, S, S, **kw)
    W3 = torch.randn(6, C // 2, 2, 3, 3, **kw, requires_grad=True)
    hyper = {"stride": (2, 1, 1), "padding": (0, 1, 2), "dilation": (1, 1, 2), "groups": 2}
    y3 = bg.conv.einsum.forward(x3, W3, **hyper)
    assert torch.allclose(y3, F.conv3d(x3, W3, **hyper), atol=1e-12)
    dy = torch.randn_like(y3)
    (grad,) = torch.autograd.grad(F.conv3d(x3, W3, **hyper), W3, dy)
    per_sample = bg.conv.einsum.weight_vjp(x3, dy, (2, 3, 3), per_sample=True, **hyper)
    assert torch.allclose(per_sample.sum(0), grad, atol=1e-10)
    A = bg.conv.einsum.kfac_reduce(x3, (2, 3, 3), **hyper)  # [G, C/G * prod(K)]^2
    u = bg.conv.unfold(x3, (2, 3, 3), hyper["dilation"], hyper["padding"], hyper["stride"])
    u = u.mean(-1).reshape(N, 2, -1).transpose(0, 1)  # [G, N, C/G * prod(K)]
    assert torch.allclose(A, u.transpose(1, 2) @ u, atol=1e-10)
    print(
        f"grouped conv3d, per-sample weight grads {tuple(per_sample.shape)}, "
        f"KFAC-reduce factor {tuple(A.shape)}: ok"
    )
    print("OK: unfold, einsum convolutions and their VJPs equal torch.nn.functional and autograd")


if __name__ == "__main__":
    main()
