"""Where an optimizer step's time goes, over one refresh period (issue 12).

Per task and optimizer (``name`` or ``name:key=value,...`` as in ``benchmarks/optim.py``): the
task's model, a few untimed warm-up steps, then ``--steps`` steps (default 20: one refresh
period of the factory's settings) split into phases by CPU time (``time.process_time``, one
torch thread by default: load on a shared machine disturbs it less than wall time):

* ``forward``: ``zero_grad``, the forward pass and the loss, inside ``capture()``;
* ``statistics``: the exit of ``capture()`` (KFAC/SINGD: the engine's backward of the curvature
  vectors and its Kronecker sums, on statistics steps only);
* ``backward``: ``loss.backward()``;
* ``step``: ``opt.step()`` (refreshes, preconditioning, update, fallback).

A second pass over another ``--steps`` steps runs under ``torch.profiler`` and reports per
step the time of the heaviest operators, the eigendecompositions (``linalg_eigh``), the matrix
products (``mm``, ``bmm``, ``addmm``) and the host synchronizations (``aten::item`` calls;
``_local_scalar_dense``). The profiler's own overhead inflates its times; the phase split of
the first pass is the one to quote.

Usage::

    python benchmarks/optim_profile.py --tasks gpt --optimizers adamw kfac singd
    python benchmarks/optim_profile.py --tasks autoencoder --optimizers kfac:damping_mode=pi
    python benchmarks/optim_profile.py --smoke   # seconds; the numbers mean nothing
"""

from __future__ import annotations

import argparse
import contextlib
import time
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from beyondgrad.app.optimizers import make_optimizer, task_settings
from beyondgrad.app.tasks import make_task

SUITE = {"gpt": "char-gpt", "autoencoder": "autoencoder", "resnet": "digits-resnet"}
"""Task key -> zoo name (as in ``optim_suite.py``)."""
PHASES = ("forward", "statistics", "backward", "step")
MATMULS = ("aten::mm", "aten::bmm", "aten::addmm")
SYNCS = ("aten::item", "aten::_local_scalar_dense")


def _spec(spec: str) -> tuple[str, dict[str, Any]]:
    from optim import parse_spec  # benchmarks/optim.py, next to this file

    return parse_spec(spec)


def build(task_key: str, spec: str, batch_size: int | None) -> tuple[Any, Any, Any]:
    """``(task, optimizer, batch iterator)`` for one optimizer spec on a fresh model."""
    name, options = _spec(spec)
    task = make_task(SUITE[task_key], 0, batch_size)
    kw = {**task_settings(task.name, name), **options}
    return task, make_optimizer(name, task.model, task.loss_fn, **kw), task.batches(0)


def timed_step(task: Any, opt: Any, X: torch.Tensor, y: torch.Tensor) -> list[float]:
    """One training step; the CPU seconds of each of :data:`PHASES`."""
    capture = getattr(opt, "capture", contextlib.nullcontext)()
    t0 = time.process_time()
    opt.zero_grad()
    capture.__enter__()
    loss = task.loss_fn(task.model(X), y)
    t1 = time.process_time()
    capture.__exit__(None, None, None)
    t2 = time.process_time()
    loss.backward()
    t3 = time.process_time()
    opt.step()
    t4 = time.process_time()
    return [t1 - t0, t2 - t1, t3 - t2, t4 - t3]


def profile_one(task_key: str, spec: str, args: argparse.Namespace) -> dict[str, Any]:
    """The phase split (ms per step) and the profiler's operator totals (ms per step)."""
    task, opt, batches = build(task_key, spec, args.batch_size)
    for _ in range(args.warmup):
        timed_step(task, opt, *next(batches))
    phases = [0.0] * len(PHASES)
    for _ in range(args.steps):
        phases = [a + b for a, b in zip(phases, timed_step(task, opt, *next(batches)))]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            timed_step(task, opt, *next(batches))
    events = prof.key_averages()
    per = 1e3 / args.steps

    def total(keys: tuple[str, ...]) -> float:
        return sum(e.self_cpu_time_total for e in events if e.key in keys) / 1e3 / args.steps

    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.top]
    return {
        "phases_ms": {k: v * per for k, v in zip(PHASES, phases)},
        "eigh_ms": total(("aten::_linalg_eigh",)),
        "eigh_calls": sum(e.count for e in events if e.key == "aten::_linalg_eigh") / args.steps,
        "matmul_ms": total(MATMULS),
        "syncs": sum(e.count for e in events if e.key == "aten::item") / args.steps,
        "profiled_ms": total(tuple(e.key for e in events)),
        "top": [(e.key, e.self_cpu_time_total / 1e3 / args.steps, e.count) for e in top],
    }


def report(task_key: str, spec: str, r: dict[str, Any]) -> str:
    """A plain-text block for one (task, optimizer)."""
    ph = r["phases_ms"]
    lines = [
        f"{task_key} {spec}: {sum(ph.values()):.1f} ms/step CPU = "
        + " + ".join(f"{k} {v:.1f}" for k, v in ph.items()),
        f"  profiled {r['profiled_ms']:.1f} ms/step: matmuls {r['matmul_ms']:.1f}, eigh "
        f"{r['eigh_ms']:.1f} ({r['eigh_calls']:.1f} calls/step), host syncs {r['syncs']:.1f}/step",
    ]
    lines += [f"    {k[:44]:44s} {ms:8.2f} ms/step  ({n} calls)" for k, ms, n in r["top"]]
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", choices=list(SUITE), default=list(SUITE))
    p.add_argument("--optimizers", nargs="+", default=["adamw", "kfac", "singd"])
    p.add_argument("--steps", type=int, default=20, help="steps per pass (a refresh period)")
    p.add_argument("--warmup", type=int, default=12, help="untimed steps first")
    p.add_argument("--batch-size", type=int, default=None, help="(default: the task's)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--top", type=int, default=12, help="operators listed per run")
    p.add_argument("--smoke", action="store_true", help="2 steps, batch 8")
    return p


def main(argv: list[str] | None = None) -> int:
    """Profile every (task, optimizer) and print the blocks."""
    args = parser().parse_args(argv)
    if args.smoke:
        args.steps, args.warmup, args.top = 2, 1, 3
        args.batch_size = args.batch_size or 8
    torch.set_num_threads(args.threads)
    for task_key in args.tasks:
        for spec in args.optimizers:
            print(report(task_key, spec, profile_one(task_key, spec, args)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
