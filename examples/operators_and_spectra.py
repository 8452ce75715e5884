"""Curvature matrices of a whole data set as linear operators, and their spectra.

Shows:

* ``bg.linops.Hessian`` / ``bg.linops.GGN`` / ``bg.linops.KFAC`` over a data loader: matrices
  you only multiply with (``A @ v``, ``A @ V`` for a block of vectors in one pass over the
  data), of the data-set loss (batches weighted ``N_b / num_data`` for a mean loss).
* ``bg.linalg.eigsh``: the top eigenvalues by Lanczos; ``bg.linalg.trace``: a trace estimate
  (XTrace) next to the exact one-pass ``GGN.trace()``; ``bg.linalg.spectral_density``: the
  eigenvalue density by stochastic Lanczos quadrature, drawn with matplotlib (Agg backend,
  into a temporary directory unless ``--out DIR`` is given).
* ``bg.linops.KFAC(...).eigh(k)``: closed-form top eigenpairs of the Kronecker approximation.

Checked against ``to_dense()`` and ``torch.linalg.eigvalsh`` (float64, small model).

Run ``python examples/operators_and_spectra.py`` (``--small`` or
``BEYONDGRAD_EXAMPLES_SMALL=1`` for a tiny run).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

import beyondgrad as bg


def parse_args() -> argparse.Namespace:
    """``--small`` (or ``BEYONDGRAD_EXAMPLES_SMALL=1``) and ``--out`` for the figure."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny sizes (seconds)")
    parser.add_argument("--out", type=Path, default=None, help="directory for the figure")
    args = parser.parse_args()
    args.small = args.small or os.environ.get("BEYONDGRAD_EXAMPLES_SMALL") == "1"
    return args


def plot_density(grid: torch.Tensor, density: torch.Tensor, evals: torch.Tensor, out: Path) -> Path:
    """Draw the estimated density and the true eigenvalues into ``out/spectrum.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.semilogy(grid, density.clamp(min=1e-8), label="SLQ density")
    ax.plot(evals, torch.full_like(evals, 1e-7), "|", color="k", label="eigenvalues")
    ax.set_xlabel("eigenvalue")
    ax.legend()
    fig.tight_layout()
    path = out / "spectrum.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def main() -> None:
    """Build operators over a loader, compare algorithms with dense linear algebra."""
    args = parse_args()
    N, B, D, H, C = (16, 8, 3, 4, 2) if args.small else (256, 32, 8, 16, 4)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, H), nn.Tanh(), nn.Linear(H, C)).double()
    loss_fn = nn.CrossEntropyLoss()
    X, y = torch.randn(N, D, dtype=torch.float64), torch.randint(0, C, (N,))
    loader = [(X[i : i + B], y[i : i + B]) for i in range(0, N, B)]
    gen = torch.Generator().manual_seed(0)

    Hess = bg.linops.Hessian(model, loss_fn, loader)
    GGN = bg.linops.GGN(model, loss_fn, loader)
    P = Hess.shape[0]
    V = torch.randn(P, 3, dtype=torch.float64)
    dense_h, dense_g = Hess.to_dense(), GGN.to_dense()
    assert torch.allclose(Hess @ V, dense_h @ V, atol=1e-10)  # a block: one pass over the data

    exact = torch.linalg.eigvalsh(dense_h)
    top, _ = bg.linalg.eigsh(Hess, k=3, generator=gen)
    print(f"{P} parameters; Hessian top-3 eigenvalues (Lanczos) {top.tolist()}")
    assert torch.allclose(top, exact.flip(0)[:3], rtol=1e-6, atol=1e-8)

    est, err = bg.linalg.trace(GGN, 2 * P if args.small else 60, method="xtrace", generator=gen)
    print(
        f"GGN trace: exact {GGN.trace():.6f}, dense {dense_g.trace():.6f}, "
        f"XTrace {est:.6f} +- {err:.1e}"
    )
    assert torch.allclose(GGN.trace(), dense_g.trace(), atol=1e-10)

    grid, density = bg.linalg.spectral_density(Hess, num_probes=4, lanczos_steps=20, generator=gen)
    mass = torch.trapezoid(density, grid).item()
    print(f"spectral density on [{grid[0]:.3g}, {grid[-1]:.3g}] integrates to {mass:.3f}")
    assert abs(mass - 1) < 0.05

    K = bg.linops.KFAC(model, loss_fn, loader, fisher_type="type-2")
    vals, vecs = K.eigh(k=2)
    assert torch.allclose(K @ vecs, vecs * vals, atol=1e-8)  # eigenpairs of the operator
    print(f"KFAC top-2 eigenvalues (closed form) {vals.tolist()}")

    out = args.out or Path(tempfile.mkdtemp(prefix="bg_spectrum_"))
    out.mkdir(parents=True, exist_ok=True)
    print(f"figure: {plot_density(grid, density, exact, out)}")
    print("OK: Lanczos eigenvalues, exact trace and KFAC eigenpairs agree with dense algebra")


if __name__ == "__main__":
    main()
