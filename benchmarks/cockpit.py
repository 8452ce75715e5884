"""Cockpit overhead: a training step with the Cockpit attached, as a ratio to the same plain
training step (SGD, same model and batch) measured in the same process.

Rows: presets ``economy``, ``business``, ``full`` tracked every step, and ``full`` every 16
steps. Each sample times a block of 16 consecutive steps (so schedules average correctly),
plain and tracked blocks interleaved; the median ratio over the samples is reported.
Problems: ``mlp`` and ``cnn`` from :mod:`beyondgrad.problems` (the original Cockpit, 3C3D on
CPU: economy 5.7x, business 12.4x, full 100x every step; 1.34x / 1.76x / 7.2x every 16 steps).

    python benchmarks/cockpit.py [--problems mlp cnn] [--reps 5] [--threads 2] [--device cpu]

Writes ``benchmarks/results/cockpit_<device>.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import beyondgrad as bg
from beyondgrad.problems import make_problem

BLOCK = 16
ROWS = (("economy", 1), ("business", 1), ("full", 1), ("full", 16))


def _block(model, loss_fn, X, y, opt, cockpit, start: int, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for step in range(start, start + BLOCK):
        opt.zero_grad()
        if cockpit is None:
            loss_fn(model(X), y).backward()
        else:
            with cockpit(step, optimizer=opt):
                loss = loss_fn(model(X), y)
                loss.backward()
        opt.step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def measure(problem: str, config: str, every: int, reps: int, device: str) -> dict:
    p = make_problem(problem)
    model, loss_fn = p.model.to(device), p.loss_fn
    X, y = p.X.to(device), p.y.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    cockpit = bg.cockpit.Cockpit(model, loss_fn, config=config, schedule=bg.cockpit.every(every))
    step = 0
    for _ in range(2):  # warm-up both paths
        _block(model, loss_fn, X, y, opt, None, 0, device)
        _block(model, loss_fn, X, y, opt, cockpit, step, device)
        step += BLOCK
    ratios, plain, tracked = [], [], []
    for _ in range(reps):
        base = _block(model, loss_fn, X, y, opt, None, 0, device)
        t = _block(model, loss_fn, X, y, opt, cockpit, step, device)
        step += BLOCK
        plain.append(base / BLOCK * 1e3)
        tracked.append(t / BLOCK * 1e3)
        ratios.append(t / base)
    return {
        "problem": problem,
        "config": config,
        "every": every,
        "ratio": statistics.median(ratios),
        "plain_ms": statistics.median(plain),
        "tracked_ms": statistics.median(tracked),
        "ratios": ratios,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", nargs="+", default=["mlp", "cnn"])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for problem in args.problems:
        for config, every in ROWS:
            row = measure(problem, config, every, args.reps, args.device)
            rows.append(row)
            print(
                f"{problem:4s} {config:9s} every {every:2d}: {row['ratio']:.2f}x "
                f"({row['tracked_ms']:.1f} ms vs {row['plain_ms']:.1f} ms per step)",
                flush=True,
            )
    kind = torch.device(args.device).type
    device = torch.cuda.get_device_name() if kind == "cuda" else f"CPU, {args.threads} threads"
    lines = [
        f"# Cockpit overhead ({device}, torch {torch.__version__})",
        "",
        "Training step with the Cockpit attached / plain SGD training step, same process, "
        f"median over {args.reps} interleaved blocks of {BLOCK} steps. Goals (CPU, every step): "
        "economy <= 1.3x, business <= 1.8x; full every 16 steps <= 1.5x. Original Cockpit on "
        "CPU (3C3D): 5.7x / 12.4x / 100x every step, full every 16: 7.2x. Regenerate: "
        "`python benchmarks/cockpit.py`.",
        "",
        "| problem | preset | tracked every | ratio | ms/step tracked | ms/step plain |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['problem']} | {r['config']} | {r['every']} | {r['ratio']:.2f} | "
            f"{r['tracked_ms']:.1f} | {r['plain_ms']:.1f} |"
        )
    out = Path(__file__).parent / "results" / f"cockpit_{kind}.md"
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
