"""Per-rank time of KFAC's preconditioner refresh (eigendecompositions of every layer's
factors), replicated (every rank refreshes every layer) against owner-based
(:class:`beyondgrad.optim.Ownership`: each refresh on one cost-balanced owner, then
broadcast), with owners per layer (what ``bg.optim.KFAC(ownership="owner")`` does: its
pi-damping couples a layer's two factors) and per factor (each eigendecomposition alone).

    python benchmarks/distributed.py                  # gloo on CPU, 2 and 4 ranks
    python benchmarks/distributed.py --reps 5 --out table.md  # also write the markdown table
    python benchmarks/distributed.py --backend nccl   # one rank per GPU (as many as given)
    python benchmarks/distributed.py --quick          # a smoke run: tiny layers, one rep
    python benchmarks/distributed.py --method singd   # whole optimizer steps (kfac, singd,
                                                      # sirfshampoo) refreshing every step

``--method eigen`` (default) times the eigendecompositions alone; the optimizer methods time
``opt.step()`` of an MLP with the same layer widths (statistics all-reduce, refresh,
preconditioning; the forward and backward are not timed).

Every rank runs ONE torch thread (``torch.set_num_threads(1)``), so ranks do not share a
core's threads with each other (the machine needs a core per rank for the wall times; the CPU
times, ``time.process_time()``, are less disturbed by a shared machine). Prints, per (world
size, rank), the median refresh time (wall and CPU) of each mode and the ratio owner /
replicated, next to its bound from the factor costs (``d^3`` per factor): the largest rank's
share of the cost under the cost-balanced owners (at best ``max(1 / world, largest unit /
total)``); the broadcasts come on top.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from beyondgrad.linalg.eigenbasis import symmetric_eigh
from beyondgrad.optim import Ownership
from beyondgrad.optim.ownership import assign_owners, defer_eigen_refresh

WIDTHS = [(512, 256), (256, 1024), (1024, 384), (384, 768), (768, 128), (128, 512)]


def _layers(scale: int, device: torch.device) -> dict[str, dict[str, Any]]:
    """Random SPD factors per layer (the same on every rank)."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for i, (a, b) in enumerate(WIDTHS):
        a, b = max(a // scale, 2), max(b // scale, 2)
        Xa, Xb = torch.randn(a, 2 * a, generator=g), torch.randn(b, 2 * b, generator=g)
        A, B = (Xa @ Xa.T / a).to(device), (Xb @ Xb.T / b).to(device)
        out[f"layer{i}"] = {"A": A, "B": B, "order": "B kron A", "params": (f"layer{i}.weight",)}
    return out


def _decompose(state: dict[str, Any], damping: float) -> tuple[torch.Tensor, ...]:
    la, qa = symmetric_eigh(state["A"][None])
    lb, qb = symmetric_eigh(state["B"][None])
    return (lb, qb, la, qa)


def _unit_costs(scale: int, per: str) -> dict[str, float]:
    """The refresh cost (``d^3`` per eigendecomposition) of each owned unit: a layer (both
    factors) or a single factor."""
    costs: dict[str, float] = {}
    for i, (a, b) in enumerate(WIDTHS):
        a, b = max(a // scale, 2), max(b // scale, 2)
        if per == "layer":
            costs[f"layer{i}"] = float(a**3 + b**3)
        else:
            costs[f"layer{i}.A"], costs[f"layer{i}.B"] = float(a**3), float(b**3)
    return costs


def bounds(scale: int, world: int, per: str) -> tuple[float, float]:
    """Owner / replicated refresh cost ratios: the cost-balanced owners' largest rank load
    over the total, and the ideal ``max(1 / world, largest unit / total)``."""
    costs = _unit_costs(scale, per)
    total = sum(costs.values())
    owners = assign_owners(costs, world)
    load = [sum(c for n, c in costs.items() if owners[n] == r) for r in range(world)]
    return max(load) / total, max(1.0 / world, max(costs.values()) / total)


def _defer_factors(owner: Ownership, name: str, state: dict[str, Any]) -> None:
    """Each factor's eigendecomposition on its own owner (cost ``d^3``)."""
    for side in ("A", "B"):
        d = state[side].shape[-1]
        like = [((1, d), state[side].dtype), ((1, d, d), state[side].dtype)]

        def store(result: tuple[torch.Tensor, ...], side: str = side) -> None:
            state[f"eig{side}"] = result

        owner.defer(
            f"{name}.{side}",
            float(d**3),
            lambda side=side: symmetric_eigh(state[side][None]),
            like,
            store,
        )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fns: dict[str, Any], reps: int, device: torch.device) -> dict[str, tuple[float, float]]:
    """Median (wall, CPU) seconds of each function, the functions interleaved rep by rep."""
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in fns}
    for _ in range(reps):
        for key, fn in fns.items():
            dist.barrier()
            _sync(device)
            start, cpu = time.perf_counter(), time.process_time()
            fn()
            _sync(device)
            times[key].append((time.perf_counter() - start, time.process_time() - cpu))
    return {
        k: (statistics.median(t[0] for t in v), statistics.median(t[1] for t in v))
        for k, v in times.items()
    }


def _optimizer_steps(args: argparse.Namespace, device: torch.device) -> tuple[Any, Any]:
    """Two step functions (replicated, owner) of one optimizer on an MLP of ``WIDTHS``."""
    from torch import nn

    import beyondgrad as bg

    widths = [max(a // args.scale, 2) for a, _ in WIDTHS] + [max(WIDTHS[-1][1] // args.scale, 2)]
    torch.manual_seed(0)
    layers = [nn.Linear(i, o) for i, o in itertools.pairwise(widths)]
    model = nn.Sequential(*[m for layer in layers for m in (layer, nn.Tanh())][:-1]).to(device)
    X = torch.randn(32, widths[0], device=device)
    Y = torch.randn(32, widths[-1], device=device)
    loss_fn = nn.MSELoss()

    def make(ownership: Any) -> Any:
        if args.method == "kfac":
            return bg.optim.KFAC(model, loss_fn, refresh_every=1, ownership=ownership, lr=0.0)
        if args.method == "singd":
            return bg.optim.SINGD(model, loss_fn, refresh_every=1, ownership=ownership, lr=0.0)
        return bg.optim.SIRFShampoo(model, refresh_every=1, ownership=ownership, lr=0.0)

    def stepper(opt: Any) -> Any:
        def step() -> None:
            opt.step()

        def prepare() -> None:
            opt.zero_grad()
            with opt.capture():
                loss = loss_fn(model(X), Y)
            loss.backward()

        return prepare, step

    return stepper(make(None)), stepper(make("owner"))


def _time_steps(prepare: Any, step: Any, reps: int, device: torch.device) -> float:
    times = []
    for _ in range(reps):
        prepare()
        dist.barrier()
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _eigen_modes(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The refresh of every layer: replicated, owned per layer, owned per factor."""
    layers = _layers(args.scale, device)
    owner = Ownership(broadcast_dtype=torch.bfloat16 if args.bf16 else None)

    def replicated() -> None:
        for state in layers.values():
            state["eig"] = _decompose(state, 0.0)

    def per_layer() -> None:
        for state in layers.values():
            defer_eigen_refresh(owner, state, _decompose, 0.0)
        owner.flush()

    def per_factor() -> None:
        for name, state in layers.items():
            _defer_factors(owner, name, state)
        owner.flush()

    return {"replicated": replicated, "layer": per_layer, "factor": per_factor}


def _optimizer_worker(world: int, rank: int, args: argparse.Namespace, device: Any) -> None:
    (prep_r, step_r), (prep_o, step_o) = _optimizer_steps(args, device)
    prep_r(), step_r(), prep_o(), step_o()  # warm up
    t_rep = _time_steps(prep_r, step_r, args.reps, device)
    t_own = _time_steps(prep_o, step_o, args.reps, device)
    print(
        f"{args.method} world {world} rank {rank}: step replicated {t_rep * 1e3:8.2f} ms"
        f"   owner {t_own * 1e3:8.2f} ms   ratio {t_own / t_rep:5.2f}",
        flush=True,
    )


def _worker(rank: int, world: int, path: str, args: argparse.Namespace, out: str) -> None:
    dist.init_process_group(args.backend, init_method=f"file://{path}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)  # one thread per rank: ranks do not share a core's threads
        device = torch.device("cuda", rank) if args.backend == "nccl" else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if args.method != "eigen":
            _optimizer_worker(world, rank, args, device)
        else:
            modes = _eigen_modes(args, device)
            for fn in modes.values():  # warm up
                fn()
            torch.save(_time(modes, args.reps, device), f"{out}.{rank}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _rows(world: int, scale: int, times: list[dict[str, tuple[float, float]]]) -> list[str]:
    """Markdown rows: per rank the replicated and owned times, ratios and bounds."""
    out = []
    for per in ("layer", "factor"):
        greedy, ideal = bounds(scale, world, per)
        for rank, t in enumerate(times):
            (rw, rc), (ow, oc) = t["replicated"], t[per]
            out.append(
                f"| {world} | {rank} | {per} | {rw * 1e3:.0f} | {ow * 1e3:.0f} | {ow / rw:.2f} "
                f"| {rc * 1e3:.0f} | {oc * 1e3:.0f} | {oc / rc:.2f} | {greedy:.2f} | {ideal:.2f} |"
            )
    return out


HEADER = (
    "| world | rank | owners per | replicated ms | owner ms | ratio | replicated CPU ms "
    "| owner CPU ms | CPU ratio | balanced bound | ideal bound |\n"
    "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    parser.add_argument("--ranks", type=int, nargs="+", default=None)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--scale", type=int, default=1, help="divide every layer width by this")
    parser.add_argument("--bf16", action="store_true", help="broadcast in bfloat16")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny layers, one rep")
    parser.add_argument(
        "--method", default="eigen", choices=["eigen", "kfac", "singd", "sirfshampoo"]
    )
    parser.add_argument("--out", default=None, help="also write the markdown table here")
    args = parser.parse_args()
    if args.quick:
        args.reps, args.scale = 1, 64
    ranks = args.ranks
    if ranks is None:
        gpus = torch.cuda.device_count() if args.backend == "nccl" else 0
        ranks = [w for w in (2, 4) if args.backend == "gloo" or w <= gpus] or [1]
    title = (
        f"torch {torch.__version__}, backend {args.backend}, one torch thread per rank, "
        f"{os.cpu_count()} CPUs, {args.reps} reps (medians, modes interleaved), KFAC factors "
        f"of layers {WIDTHS} / {args.scale}"
    )
    print(title)
    rows = []
    for world in ranks:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "times")
            mp.spawn(_worker, args=(world, os.path.join(tmp, "init"), args, out), nprocs=world)
            if args.method == "eigen":
                rows += _rows(world, args.scale, [torch.load(f"{out}.{r}") for r in range(world)])
    if args.method != "eigen":
        return
    table = "\n".join([HEADER, *rows])
    print(table)
    if args.out:
        Path(args.out).write_text(_document(title, table, args, ranks))


def _document(title: str, table: str, args: argparse.Namespace, ranks: list[int]) -> str:
    command = f"python benchmarks/distributed.py --ranks {' '.join(map(str, ranks))}"
    return (
        "# Preconditioner refresh per rank: replicated vs owner-based (gloo)\n\n"
        f"Command: `{command} --reps {args.reps} --out {args.out}`; {title}.\n\n"
        'Owners per layer: what `bg.optim.KFAC(ownership="owner")` does; per factor: each '
        "eigendecomposition on its own owner. Ratio: owner / replicated (ideally the bound). "
        "Balanced bound: the largest rank's share of the refresh cost (`d^3` per factor) under "
        "the cost-balanced owners; ideal bound: `max(1 / world, largest unit / total)`. The "
        "wall times need a core per rank; the CPU times (`time.process_time()`) are less "
        "disturbed by a shared machine.\n\n"
        f"{table}\n"
    )


if __name__ == "__main__":
    main()
