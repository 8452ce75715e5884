"""torchvision and timm models (random weights, nothing downloaded) at tiny input sizes or
widths: beyondgrad's quantities against float64 brute-force oracles (correctness, not timing),
and which rule serves each parameter.

    python benchmarks/zoo_vision.py            # writes benchmarks/results/zoo_vision_cpu.md
    python benchmarks/zoo_vision.py --cost     # writes benchmarks/results/zoo_vision_cost_cpu.md

``--cost``: float32, N = 8 images, eval mode, 2 threads: BatchL2, DiagGGN (MC, 1 sample) and
KFAC (MC) relative to one plain forward+backward, interleaved (``harness.timed_reps``).

Needs torchvision and timm, which PyPI ships for a torch that is not the project's CPU torch
2.13 (its torchvision fails to import there: ``operator torchvision::nms does not exist``).
Use a separate venv: ``python3.11 -m venv venv && venv/bin/pip install torch==2.14.1
torchvision==0.29.1 timm numpy scipy pytest && venv/bin/pip install --no-deps -e .``. The
checks are those of ``tests/test_zoo_vision.py`` (run there by pytest, skipped without
torchvision/timm).
"""

from __future__ import annotations

import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from torch import nn

import beyondgrad as bg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import test_zoo_vision as zv  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
import harness  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
QUANTITIES = ("BatchGrad", "BatchL2", "DiagGGN", "GGN @ v", "KFAC head (N=1)")


def rules(build, size: int) -> str:
    """``rule: count`` over the parameters (``bg.coverage``)."""
    torch.manual_seed(0)
    model = build().double().eval()
    X = torch.randn(zv.N, 3, size, size, dtype=torch.float64)
    y = torch.randint(0, zv.CLASSES, (zv.N,))
    table = bg.coverage(model, nn.CrossEntropyLoss(), X, y)
    counts = Counter(row.rule for row in table)
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))


def row(name: str, build, size: int) -> str:
    """One markdown row: parameters, each quantity's relative error, rules."""
    params = sum(p.numel() for p in build().parameters())
    start = time.perf_counter()
    try:
        errors = zv.run_case(build, size)
        cells = [
            f"{errors[q]:.1e} {'ok' if errors[q] < zv.TOLERANCE else 'FAIL'}" for q in QUANTITIES
        ]
    except Exception as err:  # recorded in the table, not hidden
        cells = [f"error: {type(err).__name__}: {str(err)[:80]}"] + [""] * (len(QUANTITIES) - 1)
    wall = time.perf_counter() - start
    print(f"{name}: {cells} ({wall:.0f} s)", flush=True)
    return f"| {name} | {size} | {params:,} | " + " | ".join(cells) + f" | {rules(build, size)} |"


COSTS = {
    "BatchL2": lambda: [bg.BatchL2()],
    "DiagGGN (MC, 1)": lambda: [bg.DiagGGN(mc_samples=1)],
    "KFAC (MC, 1)": lambda: [bg.KFAC(fisher_type="mc")],
}


def cost_row(name: str, build, size: int, cfg: harness.Config) -> str:
    """One markdown row: forward+backward ms and each quantity's time relative to it."""
    torch.manual_seed(0)
    model = build().float().eval()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(8, 3, size, size, generator=g)
    y = torch.randint(0, zv.CLASSES, (8,), generator=g)
    loss_fn = nn.CrossEntropyLoss()

    def plain() -> None:
        model.zero_grad(set_to_none=True)
        loss_fn(model(X), y).backward()

    cells, base = [], float("nan")
    for make in COSTS.values():
        qs = make()

        def cand(qs: list = qs) -> object:
            return bg.compute(model, loss_fn, X, y, *qs)

        try:
            cand()  # probes outside the timed calls
            timing = harness.timed_reps(plain, cand, cfg)
            base = 1e3 * statistics.median(timing.base)
            cells.append(f"{statistics.median(timing.cand) / statistics.median(timing.base):.2f}")
        except Exception as err:  # recorded in the table, not hidden
            cells.append(f"error: {type(err).__name__}: {str(err)[:60]}")
    print(f"{name}: {base:.1f} ms, {cells}", flush=True)
    return f"| {name} | {size} | {base:.1f} | " + " | ".join(cells) + " |"


def cost_table(cases: dict) -> None:
    """The ``--cost`` table (see the module docstring)."""
    torch.set_num_threads(2)
    cfg = harness.Config(
        device="cpu", reps=5, threads=2, warmup=1, target_s=0.05, max_cell_s=20,
        cell_timeout_s=120, only_beyondgrad=True, quick=False,
    )  # fmt: skip
    lines = [
        "# Vision zoo: cost relative to one forward+backward (CPU)",
        "",
        f"Command: `python benchmarks/zoo_vision.py --cost`. torch {torch.__version__}, 2 "
        f"threads, {harness.cpu_model()}. float32, N = 8 random images, eval mode; median of "
        "interleaved samples (`harness.timed_reps`). Models as in `zoo_vision_cpu.md`.",
        "",
        "| model | image | fwd+bwd ms | " + " | ".join(COSTS) + " |",
        "|---" * (3 + len(COSTS)) + "|",
    ]
    lines += [cost_row(name, build, size, cfg) for name, (build, size) in cases.items()]
    (RESULTS / "zoo_vision_cost_cpu.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    import timm
    import torchvision

    cases = {
        "plain-torch PatternNet": (zv.PatternNet, 8),
        **{f"torchvision {k}": v for k, v in sorted(zv.torchvision_models().items())},
        **{f"timm {k}": v for k, v in sorted(zv.timm_models().items())},
    }
    if "--cost" in sys.argv[1:]:
        cost_table(cases)
        return
    torch.set_num_threads(1)  # the machine is shared; correctness only
    lines = [
        "# Vision zoo: correctness against float64 brute-force oracles (CPU)",
        "",
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, timm "
        f"{timm.__version__}; float64, eval mode, N = {zv.N} random images, "
        f"{zv.CLASSES} classes, CrossEntropyLoss. Cells: the largest relative error over the "
        f"parameters (norm of the difference / norm of the oracle) and ok below "
        f"{zv.TOLERANCE:g}. Oracles: BatchGrad/BatchL2 a per-sample loop of parameter "
        "copies; DiagGGN and `linops.GGN @ v` one backward per sample and output coordinate "
        "(`J^T S`); KFAC: every Conv2d/Linear weight has a Kronecker block, and with one "
        "sample the classifier's `B kron A` equals its exact GGN block. Generated by "
        "`benchmarks/zoo_vision.py`; the same checks are `tests/test_zoo_vision.py`.",
        "",
        "| model | image | parameters | " + " | ".join(QUANTITIES) + " | rules (parameters) |",
        "|---" * (4 + len(QUANTITIES)) + "|",
    ]
    for name, (build, size) in cases.items():
        lines.append(row(name, build, size))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "zoo_vision_cpu.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
