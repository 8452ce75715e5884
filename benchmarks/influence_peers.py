"""Side by side: ``bg.influence`` and kronfluence (EK-FAC influence) on a small CNN and a small
transformer.

    python benchmarks/influence_peers.py          # writes results/influence_peers_cpu.md + .json
    python benchmarks/influence_peers.py --device cuda
    python benchmarks/influence_peers.py --quick --only-beyondgrad --out /tmp/inf.md  # smoke test

Problems (float32, briefly trained, 2,000 training examples, 100 queries; ``--quick``: 200/10):

* ``cnn``: scikit-learn's 8x8 digits, Conv(1->8, 3) -> GroupNorm(4) -> ReLU -> Conv(8->16, 3)
  -> ReLU -> Linear(576->10), ``CrossEntropyLoss``.
* ``transformer``: a 2-layer pre-LN GPT (``beyondgrad.problems.TinyGPT``, vocab 64, d 32,
  4 heads, 16 tokens, head untied from the embedding) on a seeded next-token task.

Scores are ``g_q^T (C + damping I)^{-1} g_i`` with ``g`` the gradient of one example's summed
loss, ``C`` the EK-FAC of the empirical Fisher of the mean training loss on both sides
(kronfluence: ``use_empirical_fisher=True``, ``damping_factor`` as given; bg:
``fisher_type="empirical"``), so that no Monte-Carlo labels differ between the two.

Conventions that match (checked against kronfluence 1.0.1's sources): per-example gradients of
the summed loss (a sequence's tokens summed); the Kronecker eigenbases of ``A`` (layer inputs,
the bias as a constant input column, convolution patches) and ``B`` (output gradients); the
corrected eigenvalues as the *mean* over training examples of the squared rotated per-example
gradients; the damping added to them as an absolute value (both: ``(lambda + damping)^{-1}``).
Differences: kronfluence eigendecomposes in float64 and keeps float32 factors, bg works in the
model's dtype; kronfluence's default ``damping_factor=None`` heuristic is per module, bg's
default is one value for the model (the script passes the same absolute damping to both);
kronfluence writes its factors and scores to disk (safetensors) inside the timed calls, bg keeps
them in memory.

Rows per problem:

* ``kronfluence``: its tracked modules (``nn.Linear``/``nn.Conv2d`` only: the GroupNorm,
  LayerNorm and Embedding parameters are left out without an error).
* ``bg (same params)``: ``bg.influence`` restricted to those parameters: the agreement column
  is the mean over queries of the Spearman correlation with kronfluence's scores.
* ``bg (all params)``: every parameter (norms and embeddings included); its Spearman column
  says how much the parameters kronfluence leaves out change the ranking.

Columns: time to fit the factors, time to score all queries against all training examples
(medians of ``--reps``, the three methods alternating rep by rep), peak memory of one fit +
score in a forked child (VmHWM above the level before the call, after gc + ``malloc_trim``;
``max_memory_allocated`` on GPU), both from ``harness.py``. Without kronfluence its rows
read ``n/a``.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))

import beyondgrad as bg
from beyondgrad.app.tasks import TinyGPT
from harness import forked_peak_mib, interleaved_medians

DAMPING = 1e-3


def _train(model: nn.Module, X: Tensor, y: Tensor, steps: int) -> nn.Module:
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for i in range(steps):
        idx = torch.arange(i * 64, (i + 1) * 64) % len(y)
        opt.zero_grad()
        F.cross_entropy(model(X[idx]), y[idx]).backward()
        opt.step()
    return model.eval()


def cnn(n_train: int, n_query: int, steps: int) -> dict[str, Any]:
    from sklearn.datasets import load_digits

    data = load_digits()
    X = torch.tensor(data.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(data.target)
    X, y = X.repeat(2, 1, 1, 1)[: n_train + n_query], y.repeat(2)[: n_train + n_query]
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 64, 10),
    )  # fmt: skip
    _train(model, X[:n_train], y[:n_train], steps)
    return dict(name="cnn", model=model, train=(X[:n_train], y[:n_train]),
                query=(X[n_train:], y[n_train:]))  # fmt: skip


def transformer(n_train: int, n_query: int, steps: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    n = n_train + n_query
    start = torch.randint(0, 64, (n, 1), generator=g)
    idx = (start + torch.arange(17) * torch.randint(1, 4, (n, 1), generator=g)) % 64
    X, y = idx[:, :16], idx[:, 1:]
    torch.manual_seed(0)
    model = TinyGPT(vocab=64, d=32, heads=4, layers=2, max_len=16, tied=False)
    _train(model, X[:n_train], y[:n_train], steps)
    return dict(name="transformer", model=model, train=(X[:n_train], y[:n_train]),
                query=(X[n_train:], y[n_train:]))  # fmt: skip


def covered_by_kronfluence(model: nn.Module) -> list[str]:
    return [
        f"{m}.{p}"
        for m, mod in model.named_modules()
        if isinstance(mod, (nn.Linear, nn.Conv2d))
        for p, _ in mod.named_parameters(recurse=False)
    ]


def _batches(pair: tuple[Tensor, Tensor], size: int = 100) -> list[tuple[Tensor, Tensor]]:
    X, y = pair
    return [(X[i : i + size], y[i : i + size]) for i in range(0, len(y), size)]


def bg_fit(p: dict[str, Any], params: list[str] | None) -> bg.influence.InfluenceFactors:
    return bg.influence.fit_factors(p["model"], nn.CrossEntropyLoss(), _batches(p["train"]),
                                    curvature="ekfac", params=params,
                                    fisher_type="empirical")  # fmt: skip


def bg_score(p: dict[str, Any], factors: bg.influence.InfluenceFactors) -> Tensor:
    return bg.influence.scores(p["model"], nn.CrossEntropyLoss(), _batches(p["train"]),
                               _batches(p["query"]), damping=DAMPING, factors=factors)  # fmt: skip


class _Task:
    """kronfluence's ``Task`` for classification / next-token prediction (summed loss)."""

    @staticmethod
    def make() -> Any:
        from kronfluence.task import Task

        class ClassificationTask(Task):
            def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False):
                X, y = batch
                return F.cross_entropy(model(X), y, reduction="sum")

            def compute_measurement(self, batch: Any, model: nn.Module):
                X, y = batch
                return F.cross_entropy(model(X), y, reduction="sum")

        return ClassificationTask()


class Kronfluence:
    """Factors then pairwise scores with kronfluence, in a temporary output directory."""

    def __init__(self, p: dict[str, Any]):
        from kronfluence.analyzer import Analyzer, prepare_model

        self.p, self.dir = p, tempfile.mkdtemp()
        task = _Task.make()
        model = prepare_model(copy.deepcopy(p["model"]), task)
        self.analyzer = Analyzer("bench", model, task, cpu=not torch.cuda.is_available(),
                                 disable_tqdm=True, output_dir=self.dir)  # fmt: skip
        self.train, self.query = TensorDataset(*p["train"]), TensorDataset(*p["query"])
        self.runs = 0

    def fit(self) -> None:
        from kronfluence.arguments import FactorArguments

        self.runs += 1
        args = FactorArguments(strategy="ekfac", use_empirical_fisher=True)
        self.analyzer.fit_all_factors(f"f{self.runs}", self.train, per_device_batch_size=100,
                                      factor_args=args, overwrite_output_dir=True)  # fmt: skip

    def score(self) -> Tensor:
        from kronfluence.arguments import ScoreArguments

        args = ScoreArguments(damping_factor=DAMPING)
        self.analyzer.compute_pairwise_scores(
            "s", f"f{self.runs}", self.query, self.train, per_device_query_batch_size=100,
            per_device_train_batch_size=100, score_args=args, overwrite_output_dir=True,
        )  # fmt: skip
        return self.analyzer.load_pairwise_scores("s")["all_modules"]


def spearman(a: Tensor, b: Tensor) -> float:
    """Mean over queries (rows) of the Spearman rank correlation."""
    from scipy.stats import spearmanr

    A, B = a.double().cpu().numpy(), b.double().cpu().numpy()
    rows = [spearmanr(x, y).statistic for x, y in zip(A, B)]
    return float(sum(rows) / len(rows))


def run_problem(p: dict[str, Any], reps: int, peer: bool) -> list[dict[str, Any]]:
    """The rows of one problem: kronfluence and both bg variants, their fits and scores timed
    interleaved (one call of each per rep), peak memory of fit + score in a forked child."""
    same = covered_by_kronfluence(p["model"])
    variants = {"bg (same params)": same, "bg (all params)": None}
    factors = {label: bg_fit(p, params) for label, params in variants.items()}
    fits = {label: (lambda params=params: bg_fit(p, params)) for label, params in variants.items()}
    scores = {label: (lambda f=f: bg_score(p, f)) for label, f in factors.items()}
    reference, kf = None, None
    if peer:
        kf = Kronfluence(p)
        kf.fit()
        reference = kf.score()
        fits, scores = {"kronfluence": kf.fit, **fits}, {"kronfluence": kf.score, **scores}
    fit_s, score_s = interleaved_medians(fits, reps), interleaved_medians(scores, reps)
    rows = []
    if kf is not None:
        mem = forked_peak_mib(lambda: (kf.fit(), kf.score()))
        n_same = sum(dict(p["model"].named_parameters())[n].numel() for n in same)
        rows.append(dict(problem=p["name"], method="kronfluence", params=n_same,
                         fit_s=fit_s["kronfluence"], score_s=score_s["kronfluence"],
                         peak_mib=mem, spearman=1.0))  # fmt: skip
    for label, params in variants.items():
        mem = forked_peak_mib(lambda params=params: bg_score(p, bg_fit(p, params)))
        S = bg_score(p, factors[label])
        rho = None if reference is None else spearman(S, reference)
        rows.append(dict(problem=p["name"], method=label,
                         params=factors[label].structure.num_params, fit_s=fit_s[label],
                         score_s=score_s[label], peak_mib=mem, spearman=rho))  # fmt: skip
    return rows


def _has_peer() -> bool:
    try:
        import kronfluence  # noqa: F401
    except Exception:
        return False
    return True


def write(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    host = platform.processor() or platform.machine()
    try:
        kf_version = importlib.metadata.version("kronfluence")
    except importlib.metadata.PackageNotFoundError:
        kf_version = "not installed"
    head = (f"torch {torch.__version__}, {torch.get_num_threads()} threads, device "
            f"{args.device}, {host}; kronfluence {kf_version}; damping {DAMPING}; "
            f"{args.n_train} training examples, {args.n_query} queries, "
            f"{args.reps} reps")  # fmt: skip
    lines = ["# bg.influence vs kronfluence (EK-FAC, empirical Fisher)", "", head, "",
             "| problem | method | parameters covered | fit s | score s | peak MiB | "
             "Spearman vs kronfluence |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        rho = "n/a" if r["spearman"] is None else f"{r['spearman']:.4f}"
        lines.append(f"| {r['problem']} | {r['method']} | {r['params']} | {r['fit_s']:.3g} | "
                     f"{r['score_s']:.3g} | {r['peak_mib']:.1f} | {rho} |")  # fmt: skip
    notes = __doc__.split("Conventions that match")[1].split("Rows per problem")[0]
    lines += ["", "## Conventions", "", "Conventions that match" + notes.rstrip()]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    payload = {"environment": head, "command": " ".join(sys.argv), "rows": rows}
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1))
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--problems", nargs="+", default=["cnn", "transformer"])
    parser.add_argument("--quick", action="store_true", help="200 train / 10 queries, 1 rep")
    parser.add_argument("--only-beyondgrad", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    default = Path(__file__).parent / "results" / f"influence_peers_{args.device}.md"
    args.out = args.out or str(default)
    peer = not args.only_beyondgrad and _has_peer()
    if not peer and not args.only_beyondgrad:
        print("kronfluence not importable: its rows read n/a", file=sys.stderr)
    n_train, n_query, steps = (200, 10, 20) if args.quick else (2000, 100, 300)
    args.n_train, args.n_query = n_train, n_query
    args.reps = reps = 1 if args.quick else args.reps
    rows = []
    makers = {"cnn": cnn, "transformer": transformer}
    for name in args.problems:
        p = makers[name](n_train, n_query, steps)
        p["model"].to(args.device)
        for key in ("train", "query"):
            p[key] = tuple(t.to(args.device) for t in p[key])
        rows += run_problem(p, reps, peer)
    write(rows, args)


if __name__ == "__main__":
    main()
