"""FSDP2 (``fully_shard``, DTensor parameters) with the optimizers, on 2 gloo ranks (float64):
the trajectory equals one process over the whole batch, the per-element state stays sharded,
and a checkpoint through ``torch.distributed.checkpoint`` resumes bit-identically on 2 ranks
and continues the one-process run in one process (another world size, unsharded)."""

from __future__ import annotations

import os
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import beyondgrad as bg

fsdp = pytest.importorskip("torch.distributed.fsdp")


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    kw = {"dtype": torch.float64}
    return nn.Sequential(
        nn.Linear(4, 6, **kw), nn.Tanh(), nn.LayerNorm(6, **kw), nn.Linear(6, 5, **kw),
        nn.Tanh(), nn.Linear(5, 3, **kw),
    )  # fmt: skip


def _sharded() -> nn.Module:
    model = _mlp()
    for layer in model:
        if any(True for _ in layer.parameters()):
            fsdp.fully_shard(layer)  # uneven shards: 6 -> 3+3, 5 -> 3+2, 3 -> 2+1 rows
    return fsdp.fully_shard(model)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(12, 4, generator=g, dtype=torch.float64), torch.randint(
        3, (12,), generator=g
    )


OPTIMIZERS: dict[str, Callable[..., Any]] = {
    "KFAC": lambda m, **kw: bg.optim.KFAC(
        m, nn.CrossEntropyLoss(), fisher_type="type-2", refresh_every=1, **kw
    ),
    "SINGD": lambda m, **kw: bg.optim.SINGD(
        m, nn.CrossEntropyLoss(), fisher_type="type-2", refresh_every=1, **kw
    ),
    "SIRFShampoo": lambda m, **kw: bg.optim.SIRFShampoo(m, refresh_every=1, **kw),
}


def _train(model, opt, X, y, steps: int) -> dict[str, torch.Tensor]:
    loss_fn = opt.loss_fn or nn.CrossEntropyLoss()
    for _ in range(steps):
        opt.zero_grad()
        with opt.capture():
            loss = loss_fn(model(X), y)
        loss.backward()
        opt.step()
    return {
        n: bg.distributed.fsdp.full_tensor(p.detach()).clone() for n, p in model.named_parameters()
    }


def _quantities(model, X, y) -> dict[str, Any]:
    res = bg.compute(
        model, nn.CrossEntropyLoss(), X, y, bg.Grad(), bg.DiagGGN(), bg.KFAC(fisher_type="type-2")
    )
    if dist.is_initialized():
        res = bg.distributed.all_reduce_result(res)
    kfac = {k: (v.A, v.B) if hasattr(v, "A") else v.diagonal for k, v in res[bg.KFAC].items()}
    return {"grad": res[bg.Grad], "diag": res[bg.DiagGGN], "kfac": kfac}


def _worker(rank: int, path: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
    failures: list[str] = []
    try:
        torch.set_num_threads(1)
        X, y = _data()
        X, y = X[6 * rank : 6 * rank + 6], y[6 * rank : 6 * rank + 6]
        torch.save(_quantities(_sharded(), X, y), f"{out}.quantities.{rank}")
        try:
            bg.linops.GGN(_sharded(), nn.CrossEntropyLoss(), [(X, y)])
            failures.append("GGN of an FSDP2 model: no error")
        except NotImplementedError as err:
            if "fully_shard" not in str(err):
                failures.append(f"GGN of an FSDP2 model: {err}")
        for kind, make in OPTIMIZERS.items():
            model = _sharded()
            opt = make(model, ownership="owner")
            params = _train(model, opt, X, y, 3)
            torch.save(params, f"{out}.{kind}.{rank}")
            state = [
                v for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.ndim
            ]
            if not state or not all(bg.distributed.fsdp.is_sharded(v) for v in state):
                failures.append(f"{kind}: per-element state not sharded")
            model = _sharded()
            opt = make(model, ownership="owner")
            _train(model, opt, X, y, 2)
            bg.distributed.checkpoint.save(f"{out}.{kind}.dcp", {"model": model, "optim": opt})
            model = _sharded()
            opt = make(model, ownership="owner")
            bg.distributed.checkpoint.load(f"{out}.{kind}.dcp", {"model": model, "optim": opt})
            resumed = _train(model, opt, X, y, 1)
            for name, value in params.items():
                if not torch.equal(resumed[name], value):
                    failures.append(f"{kind} DCP resume on 2 ranks: {name} differs")
    except Exception:
        failures.append(traceback.format_exc())
    torch.save(failures, f"{out}.failures.{rank}")
    dist.barrier()
    dist.destroy_process_group()


def test_fully_sharded_optimizers_equal_one_process():
    X, y = _data()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out")
        try:
            mp.spawn(_worker, args=(os.path.join(tmp, "init"), out), nprocs=2)
        except mp.ProcessExitedException:
            # gloo's threads occasionally abort at interpreter exit after the work is done
            if not all(os.path.exists(f"{out}.failures.{r}") for r in range(2)):
                raise
        failures = [f for r in range(2) for f in torch.load(f"{out}.failures.{r}")]
        assert not failures, "\n".join(failures)
        torch.testing.assert_close(torch.load(f"{out}.quantities.0"), _quantities(_mlp(), X, y))
        for kind, make in OPTIMIZERS.items():
            model = _mlp()
            want = _train(model, make(model), X, y, 3)
            got = [torch.load(f"{out}.{kind}.{r}") for r in range(2)]
            for name, value in want.items():
                torch.testing.assert_close(got[0][name], value, msg=f"{kind} {name}")
                assert torch.equal(got[1][name], got[0][name]), f"{kind} {name}"
            model = _mlp()  # the sharded checkpoint resumes unsharded in one process
            opt = make(model)
            bg.distributed.checkpoint.load(f"{out}.{kind}.dcp", {"model": model, "optim": opt})
            resumed = _train(model, opt, X, y, 1)
            for name, value in want.items():
                torch.testing.assert_close(resumed[name], value, msg=f"{kind} resumed {name}")
