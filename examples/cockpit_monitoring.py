"""Watching a training run with the Cockpit: instruments per step, a log and a dashboard.

Shows:

* ``bg.cockpit.Cockpit(model, loss_fn, config="economy", log_dir=...)`` wraps the forward pass
  and ``loss.backward()`` of each tracked step (``with cockpit(step, optimizer=opt):``) and
  computes its instruments (loss, gradient norm, distance travelled, update size, the
  normalized step length Alpha, the norm/inner-product/orthogonality tests of the gradient
  noise, the gradient noise scale, per-sample gradient histograms) from the same backward
  pass, for any optimizer.
* Every tracked step is a dict (yielded by the block, and one JSON line in
  ``log_dir/cockpit.jsonl``); ``cockpit.plot(path)`` draws the dashboard (matplotlib, Agg
  backend, into a temporary directory unless ``--out DIR`` is given).

It checks two instruments against their definitions: ``GradNorm`` against the gradient that
autograd wrote to ``.grad``, and ``NormTest``,
``sqrt(sum_n ||g_n - g||^2 / (B (B - 1))) / ||g||``, against per-sample gradients from
``bg.compute(..., bg.BatchGrad())``.

Run ``python examples/cockpit_monitoring.py`` (``--small`` or ``BEYONDGRAD_EXAMPLES_SMALL=1``
for a tiny run).
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from pathlib import Path

import torch
from torch import Tensor, nn

import beyondgrad as bg


def parse_args() -> argparse.Namespace:
    """``--small`` (or ``BEYONDGRAD_EXAMPLES_SMALL=1``) and ``--out`` for the run directory."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny sizes (seconds)")
    parser.add_argument("--out", type=Path, default=None, help="run directory (log, dashboard)")
    args = parser.parse_args()
    args.small = args.small or os.environ.get("BEYONDGRAD_EXAMPLES_SMALL") == "1"
    return args


def norm_test(model: nn.Module, loss_fn: nn.Module, X: Tensor, y: Tensor) -> float:
    """NormTest from its definition, with the per-sample-loss gradients ``g_n = B * BatchGrad``."""
    B = X.shape[0]
    res = bg.compute(model, loss_fn, X, y, bg.BatchGrad())
    G = torch.cat([g.flatten(1) for g in res[bg.BatchGrad].values()], dim=1).double() * B
    g = G.mean(0)
    return math.sqrt((G - g).pow(2).sum() / (B * (B - 1))) / g.norm().item()


def main() -> None:
    """Train a small classifier with SGD and the Cockpit attached."""
    args = parse_args()
    N, B, D, H, C, steps = (64, 16, 6, 16, 3, 6) if args.small else (2048, 64, 20, 64, 5, 60)
    torch.manual_seed(0)
    X = torch.randn(N, D)
    y = (X[:, :C] + 0.5 * torch.randn(N, C)).argmax(1)
    model = nn.Sequential(nn.Linear(D, H), nn.ReLU(), nn.Linear(H, C))
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    out = args.out or Path(tempfile.mkdtemp(prefix="bg_cockpit_"))
    cockpit = bg.cockpit.Cockpit(model, loss_fn, config="economy", log_dir=out)

    for step in range(steps):
        i = (step * B) % N
        Xb, yb = X[i : i + B], y[i : i + B]
        expected = norm_test(model, loss_fn, Xb, yb)
        opt.zero_grad()
        with cockpit(step, optimizer=opt) as record:
            loss = loss_fn(model(Xb), yb)
            loss.backward()
        grad_norm = torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item()
        opt.step()
        assert math.isclose(record["GradNorm"], grad_norm, rel_tol=1e-4)
        assert math.isclose(record["NormTest"], expected, rel_tol=1e-4)
        if step % max(1, steps // 6) == 0:
            alpha = record.get("Alpha", float("nan"))  # needs the previous step
            print(
                f"step {step:3d}  loss {record['Loss']:.3f}  |g| {record['GradNorm']:.3f}  "
                f"NormTest {record['NormTest']:.2f}  Alpha {alpha:+.2f}"
            )

    import matplotlib

    matplotlib.use("Agg")
    paths = cockpit.plot(out / "dashboard.png")
    records = bg.cockpit.load(out)
    assert len(records) == steps and all(r["step"] == s for s, r in enumerate(records))
    print(f"log: {out / 'cockpit.jsonl'} ({len(records)} steps); dashboard: {paths[0]}")
    print("OK: GradNorm and NormTest equal their definitions on every step")


if __name__ == "__main__":
    main()
