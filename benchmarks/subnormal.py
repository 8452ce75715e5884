"""What subnormal floats cost: each call with PyTorch's default floating-point mode and with
flush-to-zero (``torch.set_flush_denormal(True)`` before the first parallel operation, so that
the worker threads inherit it), in fresh processes alternating round by round.

A very confident softmax produces probabilities below float32's smallest normal number
(``1.2e-38``), and everything backpropagated from them runs through such numbers, which x86
CPUs (Intel's most) handle in microcode. The table also gives each problem's share of
subnormal probabilities. Rows: a plain forward+backward, per-sample gradients, MC
``DiagGGN``, KFAC (MC) (``bg.compute``), and the product of ``bg.linops.KFAC`` (MC) with 16
vectors.

    python benchmarks/subnormal.py [--problems mlp cnn transformer] [--rounds 3] [--threads 2]

Writes ``benchmarks/results/subnormal_cpu.md`` (and ``.json``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import beyondgrad as bg
import harness as h
from beyondgrad.app.tasks import make_problem

MODES = ("default", "flush-to-zero")
RESULTS = Path(__file__).resolve().parent / "results"


def subnormal_share(problem: str) -> float:
    """The share of the problem's softmax probabilities (class axis 1) that are subnormal."""
    p = make_problem(problem)
    with torch.no_grad():
        prob = p.model(p.X).softmax(1)
    return float(((prob > 0) & (prob < torch.finfo(prob.dtype).tiny)).float().mean())


def _cells(problem: str) -> dict[str, tuple[Callable[[], Any], int]]:
    """``name -> (call, calls per timing sample)`` on a fresh instance of ``problem``."""
    p = make_problem(problem)
    gen = torch.Generator().manual_seed(0)

    def compute(q: Any) -> Callable[[], Any]:
        return lambda: bg.compute(p.model, p.loss_fn, p.X, p.y, q, generator=gen)

    def plain() -> None:
        p.model.zero_grad(set_to_none=True)
        p.loss_fn(p.model(p.X), p.y).backward()

    op = bg.linops.KFAC(p.model, p.loss_fn, [(p.X, p.y)], fisher_type="mc")
    V = torch.randn(16, op.shape[0], generator=gen).T
    return {
        "forward+backward": (plain, 5),
        "per-sample gradients": (compute(bg.BatchGrad()), 2),
        "MC DiagGGN": (compute(bg.DiagGGN(mc_samples=1)), 2),
        "KFAC (MC)": (compute(bg.KFAC(fisher_type="mc")), 2),
        "KFAC (MC) @ V, 16 columns": (lambda: op @ V, 2),
    }


def child(mode: str, problems: list[str], threads: int) -> dict[str, float]:
    """One process: the mode (before any parallel work), then each cell's median of 5
    samples after 2 warm-up calls (ms)."""
    if mode == "flush-to-zero" and not torch.set_flush_denormal(True):
        raise SystemExit("this CPU has no flush-to-zero mode")
    torch.set_num_threads(threads)
    out: dict[str, float] = {}
    for problem in problems:
        for name, (call, n) in _cells(problem).items():
            for _ in range(2):
                call()
            samples = [h.time_sample(call, n, "cpu") * 1e3 for _ in range(5)]
            out[f"{problem}|{name}"] = statistics.median(samples)
    return out


def run(args: argparse.Namespace) -> dict[str, dict[str, list[float]]]:
    """``{cell: {mode: [ms per round]}}``, the modes alternating round by round."""
    found: dict[str, dict[str, list[float]]] = {}
    for r in range(args.rounds):
        for mode in MODES if r % 2 == 0 else MODES[::-1]:
            cmd = [sys.executable, __file__, "--child", mode, "--threads", str(args.threads)]
            cmd += ["--problems", *args.problems]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"the {mode} process failed:\n{done.stderr[-3000:]}")
            text = done.stdout
            for cell, ms in json.loads(text.strip().splitlines()[-1]).items():
                found.setdefault(cell, {}).setdefault(mode, []).append(ms)
            h.log(f"round {r + 1}/{args.rounds}: {mode} done")
    return found


def render(env: dict[str, Any], found: dict[str, dict[str, list[float]]], shares: dict) -> str:
    """The markdown table: medians over the rounds, and their ratio."""
    lines = [
        "# Subnormal floats: PyTorch's default mode against flush-to-zero",
        "",
        f"*Generated {env['date']} by `{env['command']}`.*",
        "",
        f"* **Machine**: {env['machine']}; torch {env['torch']}, {env['threads']} threads; "
        f"beyondgrad at commit {env['git']}; {env['rounds']} rounds of fresh processes.",
        "* **Subnormal probabilities**: "
        + ", ".join(f"{k} {100 * v:.1f} %" for k, v in shares.items())
        + " of the softmax outputs.",
        "",
        "| problem | call | default [ms] | flush-to-zero [ms] | default / flush-to-zero |",
        "|---|---|---:|---:|---:|",
    ]
    for cell, modes in found.items():
        problem, name = cell.split("|")
        a, b = (statistics.median(modes[m]) for m in MODES)
        lines.append(f"| {problem} | {name} | {a:.3g} | {b:.3g} | **{a / b:.2f}** |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", nargs="+", default=["mlp", "cnn", "transformer"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "subnormal_cpu.md")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.problems, args.threads)))
        return
    found = run(args)
    shares = {p: subnormal_share(p) for p in args.problems}
    env = {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "command": "python benchmarks/subnormal.py " + " ".join(sys.argv[1:]),
        "machine": f"{h.cpu_model()}, {os.cpu_count()} logical CPUs",
        "torch": torch.__version__,
        "threads": args.threads,
        "git": h.git_revision(),
        "rounds": args.rounds,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(env, found, shares))
    payload = {"env": env, "shares": shares, "runs": found}
    args.out.with_suffix(".json").write_text(json.dumps(payload, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
