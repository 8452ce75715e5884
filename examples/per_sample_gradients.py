"""Per-sample gradients, their norms, and one DP-SGD step with per-sample clipping.

Shows:

* ``bg.BatchGrad()`` gives one gradient per sample (``[N, *shape]`` per parameter), for the
  loss exactly as ``loss_fn`` defines it: with ``reduction="mean"`` they sum to the batch
  gradient.
* ``bg.BatchL2()`` gives the squared per-sample norms per parameter without materializing the
  gradients (the Gram trick where it is cheaper).
* A differentially-private SGD step (clip each sample's gradient to norm ``C``, sum, add
  Gaussian noise ``sigma * C``, average), written with those two quantities.

It checks the per-sample gradients against a loop over single samples, that they sum to the
batch gradient, that ``BatchL2`` equals their squared norms, and that every clipped
per-sample gradient has norm ``<= C``.

Run ``python examples/per_sample_gradients.py`` (``--small`` or ``BEYONDGRAD_EXAMPLES_SMALL=1``
for a tiny run).
"""

from __future__ import annotations

import argparse
import os

import torch
from torch import nn

import beyondgrad as bg


def parse_args() -> argparse.Namespace:
    """The ``--small`` flag (or the ``BEYONDGRAD_EXAMPLES_SMALL=1`` environment variable)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny sizes (seconds)")
    args = parser.parse_args()
    args.small = args.small or os.environ.get("BEYONDGRAD_EXAMPLES_SMALL") == "1"
    return args


def main() -> None:
    """Per-sample gradients, their checks, and one DP-SGD step."""
    args = parse_args()
    N, D, H, C = (8, 6, 16, 3) if args.small else (128, 32, 128, 10)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, H), nn.Tanh(), nn.Linear(H, C)).double()
    loss_fn = nn.CrossEntropyLoss()  # reduction="mean": each g_n carries 1/N
    X, y = torch.randn(N, D, dtype=torch.float64), torch.randint(0, C, (N,))

    res = bg.compute(model, loss_fn, X, y, bg.Grad(), bg.BatchGrad(), bg.BatchL2())
    grads = res[bg.BatchGrad]  # name -> [N, *shape]
    for name, g in grads.items():
        print(f"{name:10s} per-sample gradients {tuple(g.shape)}")

    # check 1: against a loop over single samples (each one's loss scaled by 1/N like the mean)
    for n in range(min(N, 4)):
        model.zero_grad()
        (loss_fn(model(X[n : n + 1]), y[n : n + 1]) / N).backward()
        for name, p in model.named_parameters():
            assert torch.allclose(grads[name][n], p.grad, atol=1e-12), name
    # check 2: they sum to the batch gradient; BatchL2 are their squared norms
    for name, g in grads.items():
        assert torch.allclose(g.sum(0), res.grad[name], atol=1e-12)
        assert torch.allclose(res[bg.BatchL2][name], g.flatten(1).pow(2).sum(1), atol=1e-12)

    # a DP-SGD step on the per-sample-loss gradients N * g_n: clip each to norm <= C (norms
    # from BatchL2), sum, add Gaussian noise of scale sigma * C, average, step
    clip, sigma, lr = 1.0, 1.0, 0.1
    norms = sum(res[bg.BatchL2].values()).sqrt() * N  # whole-model norms of N * g_n
    factors = (clip / (norms + 1e-12)).clamp(max=1.0)  # [N]
    clipped = {name: N * g * factors.view(-1, *[1] * (g.ndim - 1)) for name, g in grads.items()}
    clipped_norms = sum(c.flatten(1).pow(2).sum(1) for c in clipped.values()).sqrt()
    assert bool((clipped_norms <= clip + 1e-9).all()), clipped_norms.max()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator, dtype=p.dtype) * sigma * clip
            p -= lr * (clipped[name].sum(0) + noise) / N
    print(
        f"per-sample norms before clipping: max {norms.max():.3f}, after: max "
        f"{clipped_norms.max():.3f} <= C = {clip}"
    )
    print("OK: per-sample gradients match a per-sample loop and clipped norms are <= C")


if __name__ == "__main__":
    main()
