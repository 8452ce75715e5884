"""Side by side: ``bg.laplace.Laplace`` and laplace-torch on laplace-torch's own kinds of examples.

    python benchmarks/laplace_peers.py            # writes results/laplace_peers_cpu.md + .json
    python benchmarks/laplace_peers.py --device cuda
    python benchmarks/laplace_peers.py --quick --only-beyondgrad --out /tmp/lp.md   # smoke test

Examples (float64, all weights, no downloads beyond scikit-learn's bundled digits):

* ``regression``: 1-d ``y = sin(x) + 0.3 eps`` (150 points on [0, 8]), MLP 1-50-1 tanh,
  ``MSELoss``, ``sigma_noise = 0.3``; held-out points on [0, 8].
* ``digits``: scikit-learn's 8x8 digits (1,797 images, 70/30 split), MLP 64-32-10 tanh,
  ``CrossEntropyLoss``.

Per structure (``full``, ``diag``, ``kfac``; GGN, prior precision 1): the log marginal
likelihood of both libraries, the largest difference of their GLM predictives (probit link for
classification; mean and variance for regression) on the held-out split, the fit + predict
time (median of ``--reps``, the two libraries alternating rep by rep) and the peak memory of
one fit + predict in a forked child (VmHWM above the level at the fork). Then each library's
held-out NLL and ECE with the prior precision that maximizes bg's marginal likelihood.

Conventions where they match: both use ``P = H / sigma^2 + prior`` with ``H`` the GGN of
``0.5 * sum ||y - f||^2`` (bg: the GGN of the summed MSE times ``1 / (2 sigma^2)``: the same
matrix), the same Gaussian normalizer and the same probit link. Where they differ: laplace-torch's
``kron`` (curvlinops backend) keeps separate Kronecker blocks for a weight and its bias, bg's
``kfac`` one joint block (the bias as an extra input column), so the ``kfac`` rows compare two
different approximations (their evidence differs by a small amount, reported, not asserted).
With the empirical Fisher laplace-torch scales ``H`` by ``1/sigma^2``, bg by ``1/sigma^4`` (the
empirical Fisher of the Gaussian negative log-likelihood); this script uses the GGN only.

laplace-torch needs its own environment (it pulls curvlinops, BackPACK, ASDL, torchmetrics and,
through torchvision, possibly another torch); without it the peer rows read ``n/a``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import beyondgrad as bg

STRUCTURES = {"full": "full", "diag": "diag", "kfac": "kron"}  # bg name -> laplace-torch name


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(sizes):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1]).double()


def _train(model: nn.Module, loss_fn: nn.Module, X: Tensor, y: Tensor, steps: int) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model(X), y).backward()
        opt.step()
    model.eval()


def regression(seed: int, steps: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    X = torch.rand(200, 1, generator=g, dtype=torch.float64) * 8
    y = torch.sin(X) + 0.3 * torch.randn(200, 1, generator=g, dtype=torch.float64)
    torch.manual_seed(seed)
    model = _mlp([1, 50, 1])
    _train(model, nn.MSELoss(), X[:150], y[:150], steps)
    return dict(name="regression", model=model, loss_fn=nn.MSELoss(), likelihood="regression",
                train=(X[:150], y[:150]), test=(X[150:], y[150:]), sigma=0.3)  # fmt: skip


def digits(seed: int, steps: int) -> dict[str, Any]:
    from sklearn.datasets import load_digits

    data = load_digits()
    X = torch.tensor(data.data, dtype=torch.float64) / 16.0
    y = torch.tensor(data.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    X, y = X[perm], y[perm]
    n = int(0.7 * len(y))
    torch.manual_seed(seed)
    model = _mlp([64, 32, 10])
    _train(model, nn.CrossEntropyLoss(), X[:n], y[:n], steps)
    return dict(name="digits", model=model, loss_fn=nn.CrossEntropyLoss(),
                likelihood="classification", train=(X[:n], y[:n]), test=(X[n:], y[n:]),
                sigma=1.0)  # fmt: skip


def _loader(pair: tuple[Tensor, Tensor], batch: int = 256) -> DataLoader:
    return DataLoader(TensorDataset(*pair), batch_size=batch, shuffle=False)


def bg_fit_predict(p: dict[str, Any], structure: str, prior: float) -> tuple[Tensor, Any]:
    la = bg.laplace.Laplace(p["model"], p["loss_fn"], _loader(p["train"]), structure=structure,
                            prior_precision=prior, sigma_noise=p["sigma"])  # fmt: skip
    return la.log_marginal_likelihood().detach(), la.predictive(p["test"][0])


def peer_fit_predict(p: dict[str, Any], structure: str, prior: float) -> tuple[Tensor, Any]:
    from laplace import Laplace as PeerLaplace

    la = PeerLaplace(p["model"], p["likelihood"], subset_of_weights="all",
                     hessian_structure=STRUCTURES[structure], sigma_noise=p["sigma"],
                     prior_precision=prior)  # fmt: skip
    la.fit(_loader(p["train"]))
    lml = la.log_marginal_likelihood().detach()
    X = p["test"][0]
    if p["likelihood"] == "regression":
        mean, var = la(X, pred_type="glm")
        return lml, (mean, var + p["sigma"] ** 2 * torch.eye(var.shape[-1], dtype=var.dtype))
    return lml, la(X, pred_type="glm", link_approx="probit")


def nll_ece(pred: Any, y: Tensor, likelihood: str, bins: int = 10) -> tuple[float, float]:
    """Mean negative log predictive density and (classification) expected calibration error."""
    pred = tuple(t.cpu() for t in pred) if isinstance(pred, tuple) else pred.cpu()
    y = y.cpu()
    if likelihood == "regression":
        mean, var = pred
        var = torch.diagonal(var, dim1=1, dim2=2)
        nll = 0.5 * (torch.log(2 * torch.pi * var) + (y - mean) ** 2 / var)
        return float(nll.mean()), float("nan")
    nll = -pred.clamp_min(1e-12).log().gather(1, y[:, None]).mean()
    conf, label = pred.max(1)
    ece = torch.zeros((), dtype=pred.dtype)
    edges = torch.linspace(0, 1, bins + 1, dtype=pred.dtype)
    for lo, hi in itertools.pairwise(edges):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            gap = (conf[inside].mean() - (label[inside] == y[inside]).double().mean()).abs()
            ece += inside.double().mean() * gap
    return float(nll), float(ece)


def _vmhwm_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM"):
                return int(line.split()[1])
    return 0


def peak_memory_mib(fn: Callable[[], Any]) -> float:
    """Peak resident memory of ``fn()`` in a forked child, above the level at the fork (CPU);
    ``torch.cuda.max_memory_allocated`` in this process on GPU."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()
        fn()
        return torch.cuda.max_memory_allocated() / 2**20
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current level
        base = _vmhwm_kib()
        fn()
        os.write(write, str((_vmhwm_kib() - base) / 1024).encode())
        os._exit(0)
    os.close(write)
    value = os.read(read, 64).decode()
    os.waitpid(pid, 0)
    return float(value) if value else float("nan")


def alternate(fns: dict[str, Callable[[], Any]], reps: int) -> dict[str, float]:
    """Median seconds per candidate, candidates alternating rep by rep (after one warm-up)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(reps):
        for key, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def _max_diff(a: Any, b: Any) -> float:
    if isinstance(a, tuple):
        return max(_max_diff(x, y) for x, y in zip(a, b))
    return float((a - b).abs().max())


def compare(p: dict[str, Any], structure: str, reps: int, peer: bool) -> dict[str, Any]:
    lml, pred = bg_fit_predict(p, structure, 1.0)
    row: dict[str, Any] = {"problem": p["name"], "structure": structure, "lml_bg": float(lml)}
    fns = {"bg": lambda: bg_fit_predict(p, structure, 1.0)}
    if peer:
        lml_peer, pred_peer = peer_fit_predict(p, structure, 1.0)
        row.update(lml_peer=float(lml_peer), pred_max_diff=_max_diff(pred, pred_peer))
        fns["peer"] = lambda: peer_fit_predict(p, structure, 1.0)
    seconds = alternate(fns, reps)
    for key, fn in fns.items():
        row[f"seconds_{key}"] = seconds[key]
        row[f"peak_mib_{key}"] = peak_memory_mib(fn)
    return row


def calibration(p: dict[str, Any], peer: bool) -> dict[str, Any]:
    """Held-out NLL/ECE with the prior precision maximizing bg's evidence (``kfac``)."""
    la = bg.laplace.Laplace(p["model"], p["loss_fn"], _loader(p["train"]), structure="kfac",
                            sigma_noise=p["sigma"])  # fmt: skip
    prior = float(la.optimize_prior_precision(n_steps=200))
    X, y = p["test"]
    out: dict[str, Any] = {"problem": p["name"], "prior_precision": prior}
    with torch.no_grad():
        f = p["model"](X)
    map_pred = (f, p["sigma"] ** 2 * torch.ones(len(y), 1, 1, dtype=f.dtype))
    if p["likelihood"] != "regression":
        map_pred = torch.softmax(f, -1)
    out["map"] = nll_ece(map_pred, y, p["likelihood"])
    out["bg"] = nll_ece(la.predictive(X), y, p["likelihood"])
    if peer:
        out["peer"] = nll_ece(peer_fit_predict(p, "kfac", prior)[1], y, p["likelihood"])
    return out


def _has_peer() -> bool:
    try:
        import laplace  # noqa: F401
    except Exception:
        return False
    return True


def write(
    rows: list[dict[str, Any]], calib: list[dict[str, Any]], args: argparse.Namespace
) -> None:
    head = (f"torch {torch.__version__}, {torch.get_num_threads()} threads, device "
            f"{args.device}, {platform.processor() or platform.machine()}")  # fmt: skip
    lines = ["# bg.laplace vs laplace-torch", "", head, "",
             "| problem | structure | log ML bg | log ML laplace-torch | max pred diff | "
             "fit+predict s bg | s laplace-torch | peak MiB bg | MiB laplace-torch |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        nan = float("nan")
        cells = [r["problem"], r["structure"], f"{r['lml_bg']:.6g}",
                 f"{r.get('lml_peer', nan):.6g}",
                 f"{r.get('pred_max_diff', float('nan')):.2e}", f"{r['seconds_bg']:.3g}",
                 f"{r.get('seconds_peer', float('nan')):.3g}", f"{r['peak_mib_bg']:.1f}",
                 f"{r.get('peak_mib_peer', float('nan')):.1f}"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| problem | prior precision | NLL / ECE MAP | bg (kfac, GLM) | laplace-torch |",
              "|---|---|---|---|---|"]  # fmt: skip
    for c in calib:
        fmt = lambda v: "n/a" if v is None else f"{v[0]:.4f} / {v[1]:.4f}"  # noqa: E731
        lines.append(f"| {c['problem']} | {c['prior_precision']:.4g} | {fmt(c['map'])} | "
                     f"{fmt(c['bg'])} | {fmt(c.get('peer'))} |")  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"rows": rows, "calibration": calib}, indent=1))
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="1 rep, short training")
    parser.add_argument("--only-beyondgrad", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out = args.out or str(
        Path(__file__).parent / "results" / f"laplace_peers_{args.device}.md"
    )
    peer = not args.only_beyondgrad and _has_peer()
    if not peer and not args.only_beyondgrad:
        print("laplace-torch not importable: peer columns read n/a", file=sys.stderr)
    steps = 50 if args.quick else 1000
    reps = 1 if args.quick else args.reps
    rows, calib = [], []
    for make in (regression, digits):
        p = make(0, steps)
        p["model"].to(args.device)
        for key in ("train", "test"):
            p[key] = tuple(t.to(args.device) for t in p[key])
        rows += [compare(p, s, reps, peer) for s in STRUCTURES]
        calib.append(calibration(p, peer))
    write(rows, calib, args)


if __name__ == "__main__":
    main()
