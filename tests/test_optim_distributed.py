"""Data-parallel optimizers: 2 gloo ranks with batch B each equal 1 process with batch 2B."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from beyondgrad.optim import KFAC, SINGD, SIRFShampoo

STEPS = 3


def _model() -> nn.Module:
    torch.manual_seed(0)  # float64 at creation: the same draws whatever the default dtype
    kw = {"dtype": torch.float64}
    return nn.Sequential(
        nn.Linear(5, 6, **kw), nn.Tanh(), nn.LayerNorm(6, **kw), nn.Linear(6, 3, **kw)
    )


def _batches():
    g = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(16, 5, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (16,), generator=g),
        )
        for _ in range(STEPS)
    ]


def _optimizer(kind: str, model: nn.Module, loss_fn: nn.Module):
    if kind == "kfac":
        return KFAC(model, loss_fn, fisher_type="type-2", refresh_every=1)
    if kind == "singd":
        return SINGD(model, loss_fn, refresh_every=1, fisher_type="type-2", lr=0.05)
    return SIRFShampoo(model, lr=0.05)


def _run(model, opt, loss_fn, batches):
    for X, y in batches:
        opt.zero_grad()
        with opt.capture():
            loss = loss_fn(model(X), y)
        loss.backward()
        opt.step()


def _worker(rank: int, world: int, path: str, kind: str, wrap: bool, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model = _model()
        net = nn.parallel.DistributedDataParallel(model) if wrap else model
        loss_fn = nn.CrossEntropyLoss()
        opt = _optimizer(kind, net, loss_fn)
        half = [(X[rank * 8 : (rank + 1) * 8], y[rank * 8 : (rank + 1) * 8]) for X, y in _batches()]
        _run(net, opt, loss_fn, half)
        if rank == 0:
            torch.save({n: p.detach() for n, p in model.named_parameters()}, out)
        dist.barrier()  # no rank tears down gloo while the other still talks to it
    finally:
        dist.destroy_process_group()
    open(f"{out}.done{rank}", "w").close()


@pytest.mark.parametrize(
    "kind,wrap", [("kfac", False), ("kfac", True), ("singd", True), ("sirf", False)]
)
def test_two_ranks_equal_one_process_with_double_batch(kind, wrap):
    model = _model()
    loss_fn = nn.CrossEntropyLoss()
    _run(model, _optimizer(kind, model, loss_fn), loss_fn, _batches())
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "params.pt")
        try:
            mp.spawn(_worker, args=(2, os.path.join(tmp, "init"), kind, wrap, out), nprocs=2)
        except mp.ProcessExitedException:
            # gloo's threads occasionally abort at interpreter exit ("terminate called without
            # an active exception") after the work is done; only that case is tolerated
            if not all(os.path.exists(f"{out}.done{r}") for r in range(2)):
                raise
        got = torch.load(out)
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[name], p.detach(), msg=name)
