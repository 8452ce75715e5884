"""Model surgery with curvature on scikit-learn's bundled digits (nothing is downloaded):
merging and pruning, measured by test accuracy (no timing).

(a) Merging: per seed, one MLP initialization (64-64-64-10, ReLU) is trained twice with Adam,
    once on the training digits 0-4 and once on 5-9 (a shared 10-way head), and the two are
    merged by averaging, Fisher merging (empirical, MC and type-2 diagonal Fishers, each model's
    Fisher on its own training split) and RegMean (alpha 0.9 and 1). Accuracy on the full test
    set (all ten digits), mean and standard deviation over the seeds; the two source models and
    the same initialization trained on all digits are the references.
(b) Pruning without retraining: an MLP (64-128-128-10) and a small CNN (conv 1-8-16, 3x3, max
    pool, linear), three of each (seeds 0-2, ``--prune-seeds``) trained on all training digits,
    are pruned at 50/70/90% of their weights
    (biases kept) by magnitude, OBD (type-2 GGN diagonal), OBS/WoodFisher (damped empirical
    Fisher, blocks of 128, 8 rounds; damping 1e-4, and the damping of a grid with the least
    loss on held-out training examples) and layer-wise OBS (damped input Gram, per layer). The
    curvature comes from 1024 training examples (calibration); each method's curvature is
    computed once per model and reused for every sparsity. Reported: test accuracy and test
    cross-entropy, each the mean over the trained models (the loss separates methods whose
    accuracies on 540 test digits round to the same value).

    python benchmarks/surgery.py [--seeds 5] [--threads 2]
    python benchmarks/surgery.py --smoke      # does it run (tiny, to a temp dir)

Writes ``benchmarks/results/surgery_cpu.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import beyondgrad as bg

RESULTS = Path(__file__).resolve().parent / "results"
SPARSITIES = (0.5, 0.7, 0.9)
DAMPING = 1e-4  # WoodFisher's default
LOSS = nn.CrossEntropyLoss()


def digits(seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(X_train, y_train, X_test, y_test)``: pixels scaled to [0, 1], 540 test digits."""
    from sklearn.datasets import load_digits

    d = load_digits()
    X, y = torch.tensor(d.data, dtype=torch.float32) / 16, torch.tensor(d.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    return X[perm[540:]], y[perm[540:]], X[perm[:540]], y[perm[:540]]


def mlp(seed: int, hidden: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
        nn.Linear(hidden, 10),
    )  # fmt: skip


def cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(16 * 4 * 4, 10),
    )  # fmt: skip


def train(model: nn.Module, X: Tensor, y: Tensor, steps: int, seed: int) -> nn.Module:
    """Adam (lr 1e-3), ``steps`` mini-batches of 64 drawn with replacement."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (64,), generator=gen)
        opt.zero_grad()
        LOSS(model(X[idx]), y[idx]).backward()
        opt.step()
    return model


def accuracy(model: nn.Module, X: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return float((model(X).argmax(1) == y).float().mean())


def test_loss(model: nn.Module, X: Tensor, y: Tensor) -> float:
    """Mean cross-entropy: resolves differences that 540 test digits' accuracy rounds away."""
    with torch.no_grad():
        return float(LOSS(model(X), y))


def merging_run(seed: int, steps: int, split: tuple[Tensor, ...]) -> dict[str, float]:
    """Accuracy on the union test set of every merge of the two half-trained models."""
    Xtr, ytr, Xte, yte = split
    init = mlp(seed, 64)
    lo, hi = ytr < 5, ytr >= 5
    A = train(copy.deepcopy(init), Xtr[lo], ytr[lo], steps, seed)
    B = train(copy.deepcopy(init), Xtr[hi], ytr[hi], steps, seed + 1000)
    joint = train(copy.deepcopy(init), Xtr, ytr, steps, seed + 2000)
    data = [(Xtr[lo], ytr[lo]), (Xtr[hi], ytr[hi])]
    gen = torch.Generator().manual_seed(seed)
    merges: dict[str, Any] = {
        "model A (digits 0-4)": A,
        "model B (digits 5-9)": B,
        "average": bg.merging.average([A, B]),
        "Fisher, empirical": bg.merging.fisher_merge([A, B], LOSS, data, structure="diagonal"),
        "Fisher, MC (1 label)": bg.merging.fisher_merge(
            [A, B], LOSS, data, fisher="mc", generator=gen, structure="diagonal"
        ),
        "Fisher, type-2": bg.merging.fisher_merge(
            [A, B], LOSS, data, fisher="type-2", structure="diagonal"
        ),
        "Fisher (KFAC), empirical": bg.merging.fisher_merge([A, B], LOSS, data, structure="kfac"),
        "Fisher (KFAC), type-2": bg.merging.fisher_merge(
            [A, B], LOSS, data, fisher="type-2", structure="kfac"
        ),
        "RegMean, alpha 0.9": bg.merging.regmean([A, B], LOSS, data, alpha=0.9),
        "RegMean, alpha 1": bg.merging.regmean([A, B], LOSS, data, alpha=1.0),
        **selected_merges(A, B, data, (Xtr, ytr), seed),
        "reference: trained on all digits": joint,
    }
    return {name: accuracy(m, Xte, yte) for name, m in merges.items()}


def selected_merges(
    A: nn.Module, B: nn.Module, data: list[tuple[Tensor, Tensor]], union: tuple, seed: int
) -> dict[str, nn.Module]:
    """Averaging and the diagonal Fisher merges with the weights ``(s, 1 - s)`` chosen by
    ``bg.merging.select_weights`` on the union of the training splits (each Fisher computed
    once, merged per candidate with ``fisher_average``)."""
    states = bg.merging.check_compatible([A, B])
    gen = torch.Generator().manual_seed(seed)
    fishers = {
        kind: [bg.merging.diagonal_fisher(m, LOSS, d, kind, 1, gen) for m, d in zip((A, B), data)]
        for kind in ("empirical", "mc", "type-2")
    }

    def model(state: dict[str, Tensor]) -> nn.Module:
        out = copy.deepcopy(A)
        out.load_state_dict(state)
        return out

    merges: dict[str, Any] = {"average": lambda w: bg.merging.average([A, B], w)}
    for kind, label in (("empirical", "empirical"), ("mc", "MC (1 label)"), ("type-2", "type-2")):
        merges[f"Fisher, {label}"] = lambda w, f=fishers[kind]: model(
            bg.merging.fisher_average(states, f, w)
        )
    out = {}
    for name, merge in merges.items():
        weights, _ = bg.merging.select_weights(merge, LOSS, union, count=2)
        out[f"{name}, weights selected"] = merge(weights)
    return out


def merging_rows(seeds: int, steps: int, split: tuple[Tensor, ...]) -> list[dict[str, Any]]:
    runs = [merging_run(seed, steps, split) for seed in range(seeds)]
    rows = []
    for name in runs[0]:
        accs = [r[name] for r in runs]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        diff = [a - r["average"] for a, r in zip(accs, runs, strict=True)]
        rows.append(
            {"method": name, "mean": statistics.mean(accs), "std": std, "runs": accs,
             "wins": sum(d > 0 for d in diff), "worst_vs_average": min(diff)}
        )  # fmt: skip
    return rows


def pruners(
    model: nn.Module,
    calib: list[tuple[Tensor, Tensor]],
    heldout: tuple[Tensor, Tensor],
    rounds: int,
) -> tuple[dict[tuple[str, str], Any], dict[str, float]]:
    """``{(method, scope): prune(sparsity) -> pruned model}``, curvature computed once here, and
    the dampings the held-out rule chose (filled while pruning)."""
    names = bg.pruning.prunable_parameters(model)
    params = dict(model.named_parameters())
    weights = [params[n] for n in names]
    obd = bg.pruning.obd_scores(model, LOSS, calib, curvature="type-2")
    inverses = {
        d: bg.pruning.fisher_inverse(model, LOSS, calib, names, d, block_size=128)
        for d in (*bg.pruning.DAMPING_GRID, DAMPING)
    }
    chosen: dict[str, float] = {}

    def scored(scores: dict[str, Tensor], scope: str) -> Any:
        def run(s: float) -> nn.Module:
            masks = bg.pruning.masks_from_scores(scores, s, scope)
            return bg.pruning.masked_copy(model, masks)

        return run

    def woodfisher(scope: str, damping: float | None) -> Any:
        def run(s: float) -> nn.Module:
            d = damping
            if d is None:  # the rule: least loss on held-out training examples
                grid = {k: inverses[k] for k in bg.pruning.DAMPING_GRID}
                losses = bg.pruning.pruned_losses(model, LOSS, heldout, grid, s, scope, rounds)
                d = chosen[f"{scope} {s}"] = min(losses, key=losses.__getitem__)
            values, masks = bg.pruning.obs_prune_blocks(inverses[d], weights, s, scope, rounds)
            return bg.pruning.masked_copy(model, masks, values)

        return run

    magnitude = {n: params[n].detach().abs() for n in names}
    out: dict[tuple[str, str], Any] = {}
    for scope in ("global", "layer"):
        out[("magnitude", scope)] = scored(magnitude, scope)
        out[("OBD (GGN diagonal)", scope)] = scored(obd, scope)
        out[(f"OBS / WoodFisher, damping {DAMPING:g}", scope)] = woodfisher(scope, DAMPING)
        out[("OBS / WoodFisher, damping by held-out loss", scope)] = woodfisher(scope, None)
    out[("layer-wise OBS", "layer")] = lambda s: (
        bg.pruning.layerwise_obs(model, LOSS, calib, s).model
    )
    return out, chosen


def pruning_rows(
    name: str, model: nn.Module, split: tuple[Tensor, ...], sizes: dict[str, Any]
) -> list[dict[str, Any]]:
    """Test accuracy of every method and scope at every sparsity for one trained model."""
    Xtr, ytr, Xte, yte = split
    n, sparsities = sizes["calibration"], sizes["sparsities"]
    calib = [(Xtr[i : min(i + 256, n)], ytr[i : min(i + 256, n)]) for i in range(0, n, 256)]
    dense, dense_loss = accuracy(model, Xte, yte), test_loss(model, Xte, yte)
    rows = []
    methods, chosen = pruners(model, calib, (Xtr[n:], ytr[n:]), sizes["rounds"])
    for (method, scope), prune in methods.items():
        accs, losses = {}, {}
        for s in sparsities:
            pruned = prune(s)
            accs[str(s)], losses[f"loss {s}"] = (
                accuracy(pruned, Xte, yte),
                test_loss(pruned, Xte, yte),
            )
        rows.append(
            {"model": name, "dense": dense, "dense_loss": dense_loss, "method": method,
             "scope": scope, **accs, **losses}
        )  # fmt: skip
    rows[0]["chosen_damping"] = chosen
    return rows


def mean_rows(per_seed: list[list[dict[str, Any]]], sparsities: list[float]) -> list[dict]:
    """One row per method and scope: accuracies and test losses averaged over the trained
    models (one per seed), each seed's accuracies kept under ``"runs"``."""
    rows = []
    for i, first in enumerate(per_seed[0]):
        runs = [seed_rows[i] for seed_rows in per_seed]
        keys = ["dense", "dense_loss", *(str(s) for s in sparsities)]
        keys += [f"loss {s}" for s in sparsities]
        row = {k: first[k] for k in ("model", "method", "scope")}
        row |= {k: statistics.mean(r[k] for r in runs) for k in keys}
        row["runs"] = {str(s): [r[str(s)] for r in runs] for s in sparsities}
        if "chosen_damping" in first:
            row["chosen_damping"] = [r["chosen_damping"] for r in runs]
        rows.append(row)
    return rows


def fmt(x: float) -> str:
    return f"{100 * x:.1f}"


def render(meta: dict[str, Any], merging: list[dict], pruning: list[dict]) -> str:
    """The markdown report."""
    lines = [
        "# Model surgery on digits: merging and pruning (accuracy, CPU)",
        "",
        f"Command: `{meta['command']}`; {meta['date']}; torch {meta['torch']}, "
        f"{meta['threads']} threads, {meta['machine']}; beyondgrad commit {meta['git']}; "
        f"wall time {meta['wall_s']:.0f} s, CPU time {meta.get('cpu_s', float('nan')):.0f} s.",
        "",
        f"## Merging (test accuracy on all ten digits, %, {meta['seeds']} seeds)",
        "",
        *(
            [
                f"This section is the earlier run's (commit {meta['reused_merging']}), reused "
                "with `--reuse-merging`: the timings above are for the pruning part only.",
                "",
            ]
            if meta.get("reused_merging")
            else []
        ),
        f"Two MLPs from one initialization, trained {meta['steps_merge']} Adam steps on digits "
        "0-4 and 5-9 respectively (shared 10-way head), merged with equal weights, and (rows "
        "*weights selected*) with the weights `(s, 1 - s)`, `s = 0.1, ..., 0.9`, whose merged "
        "model has the least cross-entropy on the union of the two training splits "
        "(`bg.merging.select_weights`; the test set plays no part in the choice).",
        "",
        "| method | mean | std | seeds above average | worst seed vs average | per seed |",
        "|---|---|---|---|---|---|",
    ]
    for r in merging:
        runs = " ".join(fmt(a) for a in r["runs"])
        lines.append(
            f"| {r['method']} | {fmt(r['mean'])} | {fmt(r['std'])} | "
            f"{r['wins']}/{len(r['runs'])} | {100 * r['worst_vs_average']:+.1f} | {runs} |"
        )
    sp = meta["sparsities"]
    seeds = meta.get("prune_seeds", 1)
    for model in dict.fromkeys(r["model"] for r in pruning):
        rows = [r for r in pruning if r["model"] == model]
        lines += [
            "",
            f"## Pruning {model} without retraining (test accuracy %, and test cross-entropy "
            f"in parentheses; mean of {seeds} trained models; dense {fmt(rows[0]['dense'])} "
            f"({rows[0].get('dense_loss', float('nan')):.3f}))",
            "",
            "| method | scope | " + " | ".join(f"{int(100 * s)}% sparse" for s in sp) + " |",
            "|---|---|" + "---|" * len(sp),
        ]
        for r in rows:
            cells = " | ".join(
                fmt(r[str(s)]) + (f" ({r[f'loss {s}']:.3f})" if f"loss {s}" in r else "")
                for s in sp
            )
            lines.append(f"| {r['method']} | {r['scope']} | {cells} |")
        chosen = rows[0].get("chosen_damping", {})
        for i, picked in enumerate(chosen if isinstance(chosen, list) else [chosen]):
            picks = ", ".join(f"{k}: {v:g}" for k, v in picked.items())
            lines += ["", f"Dampings chosen by the held-out rule, model {i} (scope sparsity: "
                      f"damping): {picks}."]  # fmt: skip
    return "\n".join([*lines, "", *meta["notes"], ""])


NOTES = [
    "Notes:",
    "",
    "* Sparsity is the fraction of the weights (Linear and conv weights, not biases) set to "
    "zero; `global` ranks all weights together, `layer` prunes every weight tensor to the same "
    "fraction. No retraining, no fine-tuning after pruning.",
    "* Curvature from 1024 training examples (4 batches of 256). OBD: saliency "
    "`w^2 diag(GGN)/2`. OBS / WoodFisher: `F = lambda I + (1/N) sum_n g_n g_n^T`, block-diagonal "
    "over 128 consecutive weights, inverted by Woodbury updates; weights removed in 8 rounds, "
    "joint OBS update per block and round (`bg.pruning.woodfisher`), with two dampings: the "
    "library's default 1e-4 (fixed before any run), and the damping chosen by a rule on "
    "training data (`bg.pruning.pruned_losses`, as in `bg.pruning.select_damping`): for each "
    "scope and sparsity, the candidate of 1e-9, 1e-8, ..., 1e-2 whose pruned model has the "
    "least cross-entropy on the training examples not used for the Fisher (the 233 training "
    "digits after the first 1024); the test set plays no part in the choice. "
    "Layer-wise OBS: `H = X^T X/count + 0.01 mean(diag) I` per layer, SparseGPT-style column "
    "sweep, biases absorb compensation.",
    "* Merging: every Fisher is each model's own, averaged over its own training split. "
    "Diagonal Fisher merging (Matena & Raffel): element-wise Fisher-weighted mean, floor 1e-8. "
    "Fisher (KFAC): per layer `F_i = B_i kron A_i` (`bg.merging.fisher_merge`'s default, "
    '`structure="kfac"`; the diagonal rows pass `structure="diagonal"`), factors damped by '
    "0.1 x their mean eigenvalue (the default; 1e-3 "
    "gave within 1 point in an exploratory 10-seed run on this test set), the merged layer solves "
    "`sum_i B_i W A_i = sum_i B_i W_i A_i` exactly. RegMean uses each model's layer-input Gram "
    "matrices (KFAC A factors, i.e. `B_i = I`) on its own split.",
    "* Why the diagonal Fisher with equal weights is not reliably above averaging here: the "
    "merged model's accuracy is set mostly by the balance between the two halves of the classes "
    "(how often digits 0-4 win the argmax over 5-9), and a diagonal weighting tilts every layer "
    "towards the model with the larger Fisher (model B's empirical Fisher is about 2.5x model "
    "A's; normalizing each model's Fisher to equal total mass, per model or per tensor, "
    "relative floors of 0.01-1 x the mean, the union of both splits as Fisher data, or leaving "
    "the head to plain averaging each won on 4-8 of 10 seeds with worst seeds 3-17 points below "
    "averaging, in an earlier exploratory run). Choosing the weights on training data, as "
    "Matena & Raffel tune them on validation data, restores the balance: the diagonal Fisher "
    "merges then beat averaging on 8-9 of 10 seeds by 9 points on average, while averaging "
    "with selected weights has the accuracy of equal weights on every seed. The diagonal drops "
    "the correlations between a layer's inputs, which is what lets RegMean and the KFAC Fisher "
    "keep each model's layer outputs on its own data with equal weights.",
]


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seeds", type=int, default=10, help="merging seeds")
    p.add_argument("--prune-seeds", type=int, default=3, help="trained models per pruned family")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="markdown path (JSON next to it)")
    p.add_argument("--smoke", action="store_true", help="tiny run, to a temp dir unless --out")
    p.add_argument(
        "--reuse-merging",
        type=Path,
        default=None,
        help="take the merging section from this earlier JSON result instead of rerunning it",
    )
    return p.parse_args(argv)


def meta_data(args: argparse.Namespace, argv: list[str] | None, sizes: dict) -> dict[str, Any]:
    try:
        import harness

        git, machine = harness.git_revision(), harness.cpu_model()
    except Exception:  # the harness is optional here
        git, machine = None, platform.processor() or "unknown CPU"
    return {
        "date": dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "command": "python benchmarks/surgery.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": machine,
        "git": git,
        "smoke": args.smoke,
        "seeds": args.seeds,
        "prune_seeds": args.prune_seeds,
        **sizes,
        "notes": NOTES,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    split = digits()
    sizes = {"steps_merge": 300, "steps_prune": 800, "sparsities": list(SPARSITIES)}
    sizes.update(calibration=1024, rounds=8, hidden=128)
    if args.smoke:
        args.seeds = args.prune_seeds = 1
        sizes = {"steps_merge": 5, "steps_prune": 5, "sparsities": [0.5]}
        sizes.update(calibration=64, rounds=1, hidden=16)
    reused = None
    if args.reuse_merging is not None:
        reused = json.loads(args.reuse_merging.read_text())
        merging, args.seeds = reused["merging"], reused["meta"]["seeds"]
    else:
        merging = merging_rows(args.seeds, sizes["steps_merge"], split)
    pruning: list[dict] = []
    hidden = sizes["hidden"]
    models = (
        (f"an MLP (64-{hidden}-{hidden}-10)", lambda seed: mlp(seed, hidden)),
        ("a CNN (conv 8, 16)", cnn),
    )
    for name, make in models:
        per_seed = []
        for seed in range(args.prune_seeds):
            model = train(make(seed), split[0], split[1], sizes["steps_prune"], seed)
            per_seed.append(pruning_rows(name, model, split, sizes))
        pruning += mean_rows(per_seed, sizes["sparsities"])
    meta = meta_data(args, argv, sizes)
    if reused is not None:
        old = reused["meta"]
        # a reused file may itself have reused its merging section: name the run that made it
        meta["reused_merging"] = old.get("reused_merging") or f"{old['git']}, {old['date']}"
    meta["wall_s"] = time.perf_counter() - start
    meta["cpu_s"] = time.process_time()
    out = args.out
    if out is None:
        out = (Path(tempfile.mkdtemp()) if args.smoke else RESULTS) / "surgery_cpu.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(meta, merging, pruning))
    payload = {"meta": meta, "merging": merging, "pruning": pruning}
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1))
    print(out.read_text())
    print(f"wrote {out} and {out.with_suffix('.json').name}")


if __name__ == "__main__":
    main()
