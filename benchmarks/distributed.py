"""Per-rank time of KFAC's preconditioner refresh (eigendecompositions of every layer's
factors), replicated (every rank refreshes every layer) against owner-based
(:class:`beyondgrad.optim.Ownership`: each layer on one cost-balanced owner, then broadcast).

    python benchmarks/distributed.py                  # gloo on CPU, 2 and 4 ranks
    python benchmarks/distributed.py --backend nccl   # one rank per GPU (as many as given)
    python benchmarks/distributed.py --quick          # a smoke run: tiny layers, one rep
    python benchmarks/distributed.py --method singd   # whole optimizer steps (kfac, singd,
                                                      # sirfshampoo) refreshing every step

``--method eigen`` (default) times the eigendecompositions alone; the optimizer methods time
``opt.step()`` of an MLP with the same layer widths (statistics all-reduce, refresh,
preconditioning; the forward and backward are not timed).

Prints one line per (world size, rank): the median refresh time of each mode and their ratio
(owner / replicated; ideally close to 1 / world size, plus the broadcasts).
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from beyondgrad.linalg.eigenbasis import symmetric_eigh
from beyondgrad.optim import Ownership
from beyondgrad.optim.ownership import defer_eigen_refresh

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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Any, reps: int, device: torch.device) -> float:
    times = []
    for _ in range(reps):
        dist.barrier()
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


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


def _worker(rank: int, world: int, path: str, args: argparse.Namespace) -> None:
    dist.init_process_group(args.backend, init_method=f"file://{path}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        device = torch.device("cuda", rank) if args.backend == "nccl" else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if args.method != "eigen":
            (prep_r, step_r), (prep_o, step_o) = _optimizer_steps(args, device)
            prep_r(), step_r(), prep_o(), step_o()  # warm up
            t_rep = _time_steps(prep_r, step_r, args.reps, device)
            t_own = _time_steps(prep_o, step_o, args.reps, device)
            print(
                f"{args.method} world {world} rank {rank}: step replicated {t_rep * 1e3:8.2f} ms"
                f"   owner {t_own * 1e3:8.2f} ms   ratio {t_own / t_rep:5.2f}",
                flush=True,
            )
            dist.barrier()
            return
        layers = _layers(args.scale, device)
        owner = Ownership(broadcast_dtype=torch.bfloat16 if args.bf16 else None)

        def replicated() -> None:
            for state in layers.values():
                state["eig"] = _decompose(state, 0.0)

        def owned() -> None:
            for state in layers.values():
                defer_eigen_refresh(owner, state, _decompose, 0.0)
            owner.flush()

        replicated(), owned()  # warm up
        t_rep, t_own = _time(replicated, args.reps, device), _time(owned, args.reps, device)
        print(
            f"world {world} rank {rank}: replicated {t_rep * 1e3:8.2f} ms   owner "
            f"{t_own * 1e3:8.2f} ms   ratio {t_own / t_rep:5.2f}",
            flush=True,
        )
        dist.barrier()
    finally:
        dist.destroy_process_group()


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
    args = parser.parse_args()
    if args.quick:
        args.reps, args.scale = 1, 64
    ranks = args.ranks
    if ranks is None:
        gpus = torch.cuda.device_count() if args.backend == "nccl" else 0
        ranks = [w for w in (2, 4) if args.backend == "gloo" or w <= gpus] or [1]
    print(f"torch {torch.__version__}, backend {args.backend}, layers {WIDTHS} / {args.scale}")
    for world in ranks:
        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(_worker, args=(world, os.path.join(tmp, "init"), args), nprocs=world)


if __name__ == "__main__":
    main()
