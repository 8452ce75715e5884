"""Side by side: ``bg.laplace.Laplace`` and laplace-torch on laplace-torch's own kinds of examples.

    python benchmarks/laplace_peers.py            # writes results/laplace_peers_cpu.md + .json
    python benchmarks/laplace_peers.py --device cuda
    python benchmarks/laplace_peers.py --quick --out /tmp/lp.md     # smoke test (minutes)

Examples (float64, no downloads beyond scikit-learn's bundled digits):

* ``regression``: 1-d ``y = sin(x) + 0.3 eps`` (150 training points on [0, 8], 50 held out),
  MLP 1-50-1 tanh, ``MSELoss``, ``sigma_noise = 0.3``.
* ``digits``: scikit-learn's 8x8 digits (1,280 training images in 5 equal batches of 256, 517
  held out), MLP 64-32-10 tanh, ``CrossEntropyLoss``.

Each example is trained twice: with biases and without (``bias=False`` everywhere); the
bias-free twin is where the two libraries' KFAC conventions coincide (below).

Rows: subset (all weights, last layer) x structure (``full``, ``diag``, ``kfac``; GGN, prior
precision 1, the same ``sigma_noise``). Columns: the log marginal likelihood of both libraries
and their relative difference; the largest relative difference of the GLM functional variance
``J P^{-1} J^T`` on the held-out inputs (and of the predictive mean, and for classification of
the probit probabilities); the time of fit + evidence and of the GLM predictive on the held-out
split (medians of at least ``--reps`` calls, more for calls of milliseconds: about 0.5 s of
bg's, at most 300; the libraries alternating rep by rep), and the peak memory of one
fit + evidence + predictive in a forked child (``harness.forked_peak_mib``: VmHWM above
the level before the call, after gc + ``malloc_trim``). A second
table: held-out NLL and ECE of the MAP and of each library's GLM predictive (``kfac``, the
prior precision each library's own marginal-likelihood optimization finds).

Conventions, and why numbers differ where they do (copied into the results file):

* Both use ``P = H / sigma^2 + prior`` with ``H`` the GGN of ``0.5 * sum ||y - f||^2`` (bg: the
  GGN of the summed MSE times ``1 / (2 sigma^2)``: the same matrix), the same Gaussian
  normalizer, the same probit link and the same last layer (the last module with parameters).
* ``full``: laplace-torch's curvlinops backend multiplies its GGN operator with a *float32*
  identity (``torch.eye`` without a dtype), so its ``H`` is a float32 product (relative error
  ~1e-7 of the largest entry, ~1e-4 in the evidence); bg's is float64.
* ``kfac``: laplace-torch keeps a weight and its bias in separate Kronecker blocks (``B kron A``
  and ``B``), bg in one joint block (the bias as a constant input column, ``B kron [A, a; a^T,
  1]``): laplace-torch's matrix is bg's with the weight-bias cross terms ``B kron a`` dropped,
  a different approximation (where ``B`` is the same for every sample, as for a last layer
  with one output under MSE, the joint block is the exact GGN block and the separate one is
  not). Without biases both are ``B kron A`` with ``A`` the mean input
  second moment and ``B`` the summed output-gradient second moment: the bias-free rows agree
  to rounding. laplace-torch sums per-batch factors (batch means of ``A``, ``B`` rescaled by
  ``M_b / N``), which equals the data set's KFAC only for equal batch sizes (hence 5 x 256).
* With the empirical Fisher laplace-torch scales ``H`` by ``1/sigma^2``, bg by ``1/sigma^4``
  (the empirical Fisher of the Gaussian negative log-likelihood); this script uses the GGN.

laplace-torch needs its own environment (curvlinops, BackPACK, ASDL, torchmetrics; no
torchvision); without it the peer columns read ``n/a``.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import itertools
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))

import beyondgrad as bg
from harness import forked_peak_mib, interleaved_medians

STRUCTURES = {"full": "full", "diag": "diag", "kfac": "kron"}  # bg name -> laplace-torch name
CASES = [  # (subset, structure, with biases)
    ("all", "full", True), ("all", "diag", True), ("all", "kfac", True), ("all", "kfac", False),
    ("last_layer", "full", True), ("last_layer", "diag", True), ("last_layer", "kfac", True),
    ("last_layer", "kfac", False),
]  # fmt: skip
PEER_SUBSET = {"all": "all", "last_layer": "last_layer"}


def _mlp(sizes: list[int], bias: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(sizes):
        layers += [nn.Linear(a, b, bias=bias), nn.Tanh()]
    return nn.Sequential(*layers[:-1]).double()


def _train(model: nn.Module, loss_fn: nn.Module, X: Tensor, y: Tensor, steps: int) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model(X), y).backward()
        opt.step()
    model.eval()


def _models(sizes: list[int], loss_fn: nn.Module, train: tuple[Tensor, Tensor], seed: int,
            steps: int) -> dict[bool, nn.Module]:  # fmt: skip
    out = {}
    for bias in (True, False):
        torch.manual_seed(seed)
        out[bias] = _mlp(sizes, bias)
        _train(out[bias], loss_fn, *train, steps)
    return out


def regression(seed: int, steps: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    X = torch.rand(200, 1, generator=g, dtype=torch.float64) * 8
    y = torch.sin(X) + 0.3 * torch.randn(200, 1, generator=g, dtype=torch.float64)
    train, test = (X[:150], y[:150]), (X[150:], y[150:])
    return dict(name="regression", models=_models([1, 50, 1], nn.MSELoss(), train, seed, steps),
                loss_fn=nn.MSELoss(), likelihood="regression", train=train, test=test,
                sigma=0.3)  # fmt: skip


def digits(seed: int, steps: int) -> dict[str, Any]:
    from sklearn.datasets import load_digits

    data = load_digits()
    X = torch.tensor(data.data, dtype=torch.float64) / 16.0
    y = torch.tensor(data.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    X, y = X[perm], y[perm]
    n = 1280  # 5 equal batches of 256 (laplace-torch's KFAC sums per-batch factors)
    train, test = (X[:n], y[:n]), (X[n:], y[n:])
    models = _models([64, 32, 10], nn.CrossEntropyLoss(), train, seed, steps)
    return dict(name="digits", models=models, loss_fn=nn.CrossEntropyLoss(),
                likelihood="classification", train=train, test=test, sigma=1.0)  # fmt: skip


def _loader(pair: tuple[Tensor, Tensor], batch: int = 256) -> DataLoader:
    return DataLoader(TensorDataset(*pair), batch_size=batch, shuffle=False)


def bg_fit(p: dict[str, Any], case: tuple[str, str, bool], prior: Any = 1.0) -> Any:
    """bg's Laplace fitted, and its evidence (computed once, as a user would)."""
    subset, structure, bias = case
    la = bg.laplace.Laplace(p["models"][bias], p["loss_fn"], _loader(p["train"]),
                            structure=structure, subset=subset, prior_precision=prior,
                            sigma_noise=p["sigma"])  # fmt: skip
    la.lml = la.log_marginal_likelihood().detach()
    return la


def bg_predict(la: Any, X: Tensor) -> dict[str, Tensor]:
    with torch.no_grad():
        f = la.model(X)
    out = {"mean": f.reshape(len(f), -1), "var": la.functional_variance(X)}
    if la.likelihood != "regression":
        out["probs"] = la.predictive(X)
    return out


def peer_fit(p: dict[str, Any], case: tuple[str, str, bool], prior: Any = 1.0) -> Any:
    from laplace import Laplace as PeerLaplace

    subset, structure, bias = case
    model = p["models"][bias]
    if subset == "last_layer":  # laplace-torch wraps (and changes) the model: its own copy
        model = copy.deepcopy(model)
    la = PeerLaplace(model, p["likelihood"], subset_of_weights=PEER_SUBSET[subset],
                     hessian_structure=STRUCTURES[structure], sigma_noise=p["sigma"],
                     prior_precision=prior)  # fmt: skip
    la.fit(_loader(p["train"]))
    la.lml = la.log_marginal_likelihood().detach()
    return la


def peer_predict(la: Any, X: Tensor) -> dict[str, Tensor]:
    mean, var = la._glm_predictive_distribution(X)  # the functional mean and variance
    out = {"mean": mean.reshape(len(mean), -1), "var": var}
    if la.likelihood != "regression":
        out["probs"] = la(X, pred_type="glm", link_approx="probit")
    return out


def nll_ece(pred: Any, y: Tensor, likelihood: str, bins: int = 10) -> tuple[float, float]:
    """Mean negative log predictive density and (classification) expected calibration error;
    ``pred``: probabilities, or ``(mean [N, 1], variance [N, 1, 1])`` of ``y``."""
    pred = tuple(t.cpu() for t in pred) if isinstance(pred, tuple) else pred.cpu()
    y = y.cpu()
    if likelihood == "regression":
        mean, var = pred
        var = var.reshape(len(y), -1)[:, :1]
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


def _rel(a: Tensor, b: Tensor) -> float:
    """Largest entry of ``|a - b|`` over the largest entry of ``|b|``."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def curvlinops_ggn(p: dict[str, Any], bias: bool) -> Tensor:
    """The GGN of the summed loss from curvlinops' operator times a *float64* identity: the
    check that laplace-torch's ``full`` differs from bg only by its float32 identity."""
    from curvlinops import GGNLinearOperator

    model = p["models"][bias]
    loss = type(p["loss_fn"])(reduction="sum")
    params = [q for q in model.parameters() if q.requires_grad]
    op = GGNLinearOperator(model, loss, params, list(_loader(p["train"])),
                           check_deterministic=False)  # fmt: skip
    eye = torch.eye(op.shape[0], dtype=params[0].dtype, device=params[0].device)
    return torch.as_tensor(op @ eye)


def agreement(la: Any, pl: Any, X: Tensor) -> dict[str, float]:
    ours, theirs = bg_predict(la, X), peer_predict(pl, X)
    out = {
        "lml_peer": float(pl.lml),
        "lml_rel": abs(float(la.lml) - float(pl.lml)) / abs(float(pl.lml)),
        "mean_rel": _rel(ours["mean"], theirs["mean"]),
        "var_rel": _rel(ours["var"], theirs["var"]),
    }
    if "probs" in ours:
        out["probs_diff"] = float((ours["probs"] - theirs["probs"]).abs().max())
    return out


def _reps(fn: Any, reps: int, seconds: float = 0.5, cap: int = 300) -> int:
    """At least ``reps``, more for calls of milliseconds: about ``seconds`` of bg's calls
    (at most ``cap``), so that the medians of short calls are not a handful of noisy ones."""
    start = time.perf_counter()
    fn()
    once = time.perf_counter() - start
    return max(reps, min(cap, int(seconds / max(once, 1e-9))))


def compare(p: dict[str, Any], case: tuple[str, str, bool], reps: int,
            peer: bool) -> dict[str, Any]:  # fmt: skip
    subset, structure, bias = case
    X = p["test"][0]
    la = bg_fit(p, case)
    row: dict[str, Any] = {"problem": p["name"], "subset": subset, "structure": structure,
                           "bias": bias, "params": la.num_params,
                           "lml_bg": float(la.lml)}  # fmt: skip
    fits = {"bg": lambda: bg_fit(p, case)}
    preds = {"bg": lambda: bg_predict(la, X)}
    both = {"bg": lambda: bg_predict(bg_fit(p, case), X)}
    if peer:
        pl = peer_fit(p, case)
        row.update(agreement(la, pl, X))
        if structure == "full" and subset == "all":
            row["H_rel_curvlinops_float64"] = _rel(la.curvature.to_dense(), curvlinops_ggn(p, bias))
        fits["peer"] = lambda: peer_fit(p, case)
        preds["peer"] = lambda: peer_predict(pl, X)
        both["peer"] = lambda: peer_predict(peer_fit(p, case), X)
    fit_s = interleaved_medians(fits, _reps(fits["bg"], reps))
    predict_s = interleaved_medians(preds, _reps(preds["bg"], reps))
    for key in fits:
        row[f"fit_s_{key}"], row[f"predict_s_{key}"] = fit_s[key], predict_s[key]
        row[f"peak_mib_{key}"] = forked_peak_mib(both[key])
    return row


def calibration(p: dict[str, Any], peer: bool) -> dict[str, Any]:
    """Held-out NLL/ECE (``kfac``, all weights, with biases) with the prior precision each
    library's own marginal-likelihood optimization finds (Adam on the log prior, 100 steps,
    learning rate 0.1, a scalar prior)."""
    case = ("all", "kfac", True)
    X, y = p["test"]
    la = bg_fit(p, case)
    prior = float(la.optimize_prior_precision(n_steps=100, lr=0.1))
    out: dict[str, Any] = {"problem": p["name"], "prior_bg": prior}
    with torch.no_grad():
        f = p["models"][True](X)
    map_pred = (f, p["sigma"] ** 2 * torch.ones(len(y), 1, 1, dtype=f.dtype))
    if p["likelihood"] != "regression":
        map_pred = torch.softmax(f, -1)
    out["map"] = nll_ece(map_pred, y, p["likelihood"])
    out["bg"] = nll_ece(la.predictive(X), y, p["likelihood"])
    if peer:
        pl = peer_fit(p, case)
        pl.optimize_prior_precision(method="marglik", n_steps=100, lr=0.1)
        out["prior_peer"] = float(pl.prior_precision.reshape(-1)[0])
        pred = pl(X, pred_type="glm", link_approx="probit")
        if p["likelihood"] == "regression":
            pred = (pred[0], pred[1] + p["sigma"] ** 2)
        out["peer"] = nll_ece(pred, y, p["likelihood"])
    return out


def _has_peer() -> bool:
    try:
        import laplace  # noqa: F401
    except Exception:
        return False
    return True


def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _fmt(value: Any, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _row_cells(r: dict[str, Any]) -> list[str]:
    probs = r.get("probs_diff")
    return [r["problem"], r["subset"], r["structure"] + ("" if r["bias"] else " (no bias)"),
            str(r["params"]), f"{r['lml_bg']:.6g}", _fmt(r.get("lml_peer"), ".6g"),
            _fmt(r.get("lml_rel"), ".1e"), _fmt(r.get("mean_rel"), ".1e"),
            _fmt(r.get("var_rel"), ".1e"), _fmt(probs, ".1e"),
            f"{r['fit_s_bg']:.3g}", _fmt(r.get("fit_s_peer"), ".3g"),
            f"{r['predict_s_bg']:.3g}", _fmt(r.get("predict_s_peer"), ".3g"),
            f"{r['peak_mib_bg']:.1f}", _fmt(r.get("peak_mib_peer"), ".1f")]  # fmt: skip


def write(
    rows: list[dict[str, Any]], calib: list[dict[str, Any]], args: argparse.Namespace
) -> None:
    versions = ", ".join(f"{k} {_version(k)}" for k in ("laplace-torch", "curvlinops-for-pytorch"))
    head = (f"torch {torch.__version__}, {torch.get_num_threads()} threads, device "
            f"{args.device}, {platform.processor() or platform.machine()}; {versions}; "
            f"at least {args.reps} reps (about 0.5 s of bg's calls, at most 300)")  # fmt: skip
    lines = ["# bg.laplace vs laplace-torch", "", head, "",
             "Relative differences: largest entry of the difference over the largest entry of "
             "laplace-torch's value; `probs`: largest absolute difference of the probit "
             "probabilities. Times: fit + evidence, and the GLM predictive on the held-out "
             "split (seconds); peak memory of both in a forked child. Why numbers differ: "
             "the last section.", "",
             "| problem | subset | structure | P | log ML bg | log ML laplace-torch | rel diff "
             "| mean | variance | probs | fit s bg | fit s peer | predict s bg | predict s peer "
             "| MiB bg | MiB peer |", "|" + "---|" * 16]  # fmt: skip
    lines += ["| " + " | ".join(_row_cells(r)) + " |" for r in rows]
    lines += ["", "| problem | prior bg | prior laplace-torch | NLL / ECE MAP | bg (kfac, GLM) | "
              "laplace-torch (kron, GLM) |", "|---|---|---|---|---|---|"]  # fmt: skip
    for c in calib:
        fmt = lambda v: "n/a" if v is None else f"{v[0]:.4f} / {v[1]:.4f}"  # noqa: E731
        lines.append(f"| {c['problem']} | {c['prior_bg']:.4g} | {_fmt(c.get('prior_peer'), '.4g')} "
                     f"| {fmt(c['map'])} | {fmt(c['bg'])} | {fmt(c.get('peer'))} |")  # fmt: skip
    notes = __doc__.split("Conventions, and why numbers differ")[1].split("laplace-torch needs")[0]
    lines += ["", "## Why numbers differ", "", notes.split("\n", 1)[1].strip()]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    payload = {"environment": head, "command": " ".join(sys.argv), "rows": rows,
               "calibration": calib}  # fmt: skip
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1))
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--problems", nargs="+", default=["regression", "digits"])
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
    args.reps = 1 if args.quick else args.reps
    makers = {"regression": regression, "digits": digits}
    rows, calib = [], []
    for name in args.problems:
        p = makers[name](0, steps)
        for m in p["models"].values():
            m.to(args.device)
        for key in ("train", "test"):
            p[key] = tuple(t.to(args.device) for t in p[key])
        for case in CASES:
            rows.append(compare(p, case, args.reps, peer))
            print(rows[-1], file=sys.stderr, flush=True)
        calib.append(calibration(p, peer))
    write(rows, calib, args)


if __name__ == "__main__":
    main()
