"""Milliseconds per optimizer step, every optimizer in ONE process, interleaved (issue 12).

On a busy machine absolute times drift; ratios of steps timed back to back do not (much). Per
task, every optimizer (``name`` or ``name:key=value,...`` with options for
``beyondgrad.app.optimizers.make_optimizer``, e.g. ``kfac:damping_mode=pi``) gets its own copy of
the task's model (same seed), a warm-up of ``--warmup`` steps (statistics, the first refreshes),
then ``--rounds`` rounds; in each round every optimizer runs one block of ``--block`` steps
(default 20: a whole refresh period at the library defaults, so statistics and refreshes are
averaged in),
the optimizers in a rotated order per round. Reported: the median ms/step over the rounds and
the median over the rounds of the per-round ratio to the first optimizer (AdamW by default).
The batches are drawn before a block is timed (batch assembly is not timed, as in
``optim_suite.py``); a step is ``zero_grad``, the forward (inside ``capture()``), ``backward``
and ``step``.

Usage (the suite's three tasks, AdamW/KFAC/SINGD, 3 rounds: about 3 minutes on 2 quiet
cores)::

    python benchmarks/optim.py --tasks gpt autoencoder resnet --optimizers adamw kfac singd
    python benchmarks/optim.py --tasks autoencoder gpt --rounds 5
    python benchmarks/optim.py --tasks autoencoder --optimizers adamw kfac kfac:damping_mode=pi
    python benchmarks/optim.py --smoke          # seconds; the numbers mean nothing
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from beyondgrad.app.optimizers import make_optimizer, task_settings
from beyondgrad.app.tasks import make_task

RESULTS = Path(__file__).resolve().parent / "results"
SUITE = {"gpt": "char-gpt", "autoencoder": "autoencoder", "resnet": "digits-resnet"}
"""Task key -> zoo name (as in ``optim_suite.py``)."""
DEFAULT_OPTIMIZERS = ("adamw", "kfac", "singd")


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"kfac:damping_mode=pi,refresh_every=20"`` -> ``("kfac", {...})`` (values parsed as
    Python literals where they are, else kept as strings)."""
    import ast

    name, _, rest = spec.partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key] = value
    return name, options


class Runner:
    """One optimizer on its own copy of a task's model, stepping through its batches."""

    def __init__(self, task_key: str, spec: str, batch_size: int | None, device: str):
        name, options = parse_spec(spec)
        self.spec = spec
        self.task = make_task(SUITE[task_key], 0, batch_size)
        self.model = self.task.model.to(device)
        kw = {**task_settings(self.task.name, name), **options}
        self.opt = make_optimizer(name, self.model, self.task.loss_fn, **kw)
        self.batches = self.task.batches(0)
        self.device = device

    def draw(self, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The next ``n`` batches, on the device."""
        return [tuple(t.to(self.device) for t in next(self.batches)) for _ in range(n)]  # type: ignore[misc]

    def run(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        """Seconds per step over ``batches``."""
        sync = torch.cuda.synchronize if self.device.startswith("cuda") else (lambda: None)
        capture = getattr(self.opt, "capture", contextlib.nullcontext)
        sync()
        start = time.perf_counter()
        for X, y in batches:
            self.opt.zero_grad()
            with capture():
                loss = self.task.loss_fn(self.model(X), y)
            loss.backward()
            self.opt.step()
        sync()
        return (time.perf_counter() - start) / len(batches)


def measure(task_key: str, specs: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Interleaved blocks of every optimizer on one task; per optimizer its samples."""
    runners = [Runner(task_key, s, args.batch_size, args.device) for s in specs]
    for r in runners:
        r.run(r.draw(args.warmup))
    samples: dict[str, list[float]] = {s: [] for s in specs}
    for k in range(args.rounds):
        order = runners[k % len(runners) :] + runners[: k % len(runners)]
        for r in order:
            samples[r.spec].append(r.run(r.draw(args.block)))
    base = samples[specs[0]]
    out = {}
    for s in specs:
        ratios = [a / b for a, b in zip(samples[s], base)]
        out[s] = {
            "ms_per_step": 1e3 * statistics.median(samples[s]),
            "ratio": statistics.median(ratios),
            "samples_ms": [1e3 * x for x in samples[s]],
        }
    return out


def render(meta: dict[str, Any], results: dict[str, dict[str, Any]], base: str) -> str:
    """The markdown table per task."""
    lines = [
        f"# ms per optimizer step, interleaved ({meta['device']})",
        "",
        f"*Generated {meta['date']} by `{meta['command']}`.*",
        "",
        f"* torch {meta['torch']}, {meta['threads']} threads, {meta['machine']}; "
        f"{meta['rounds']} rounds of {meta['block']} steps per optimizer after {meta['warmup']} "
        "warm-up steps, optimizers rotated per round; ratio: median over rounds of the "
        f"per-round ratio to `{base}` (ratios hold on a busy machine, absolute times do not).",
    ]
    for task, cells in results.items():
        lines += ["", f"## {task}", "", f"| optimizer | ms/step | ratio to {base} |",
                  "|---|---:|---:|"]  # fmt: skip
        for spec, c in cells.items():
            lines.append(f"| {spec} | {c['ms_per_step']:.1f} | {c['ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def parser() -> argparse.ArgumentParser:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", choices=list(SUITE), default=list(SUITE))
    p.add_argument("--optimizers", nargs="+", default=list(DEFAULT_OPTIMIZERS),
                   help="name or name:key=value,... (the first: the reference)")  # fmt: skip
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--block", type=int, default=20, help="steps per timed block")
    p.add_argument("--warmup", type=int, default=20, help="untimed steps per optimizer")
    p.add_argument("--batch-size", type=int, default=None, help="(default: the task's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None,
                   help="markdown (default: results/optim_steps_<device>.md)")  # fmt: skip
    p.add_argument("--smoke", action="store_true", help="1 round of 2 steps, batch 8, temp dir")
    return p


def main(argv: list[str] | None = None) -> int:
    """Measure, print and write the tables."""
    args = parser().parse_args(argv)
    if args.smoke:
        args.rounds, args.block, args.warmup = 1, 2, 2
        args.batch_size = args.batch_size or 8
        args.out = args.out or Path(tempfile.mkdtemp(prefix="optim-steps-")) / "steps.md"
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    out = args.out or RESULTS / f"optim_steps_{args.device.split(':')[0]}.md"
    results = {}
    for task in args.tasks:  # print each task's cells as soon as they are measured
        results[task] = measure(task, args.optimizers, args)
        for spec, c in results[task].items():
            print(f"{task} {spec}: {c['ms_per_step']:.1f} ms/step, ratio {c['ratio']:.2f}",
                  flush=True)  # fmt: skip
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python " + " ".join(sys.argv),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()}, {platform.processor() or platform.system()}",
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "rounds": args.rounds,
        "block": args.block,
        "warmup": args.warmup,
        "batch_size": args.batch_size,
    }
    text = render(meta, results, args.optimizers[0])
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
