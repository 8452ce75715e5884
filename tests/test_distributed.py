"""torch.distributed through operators, quantities, Laplace and influence: gloo ranks on CPU,
each with an uneven shard of one data set, equal the one-process run over the whole data set
(float64, to round-off), and what cannot be reduced exactly raises on every rank.

Every spawned worker runs all its checks and writes the failures it saw; the parent asserts
that none were seen (spawning is slow: one spawn per world size)."""

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
from beyondgrad import linalg, linops

N = 13  # samples of the whole data set; split unevenly over the ranks


def _model() -> nn.Module:
    torch.manual_seed(0)
    kw = {"dtype": torch.float64}
    return nn.Sequential(
        nn.Linear(4, 5, **kw), nn.Tanh(), nn.LayerNorm(5, **kw), nn.Linear(5, 3, **kw)
    ).eval()


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    X = torch.randn(N, 4, generator=g, dtype=torch.float64)
    return X, torch.randint(0, 3, (N,), generator=g)


def _batches(X: torch.Tensor, y: torch.Tensor, size: int = 3) -> list[Any]:
    return [(X[i : i + size], y[i : i + size]) for i in range(0, X.shape[0], size)]


BOUNDS = {2: [0, 8, 13], 4: [0, 5, 8, 11, 13]}  # uneven shards


def _shard(rank: int, world: int) -> slice:
    return slice(BOUNDS[world][rank], BOUNDS[world][rank + 1])


class _Checks:
    def __init__(self) -> None:
        self.failures: list[str] = []

    def close(self, name: str, got: Any, want: Any, rtol: float = 1e-9) -> None:
        try:
            torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * 1e-2)
        except AssertionError as err:
            self.failures.append(f"{name}: {err}")

    def raises(self, name: str, error: type[Exception], fn: Callable[[], Any], match: str) -> None:
        try:
            fn()
        except error as err:
            if match not in str(err):
                self.failures.append(f"{name}: message {err!s} lacks {match!r}")
            return
        self.failures.append(f"{name}: no {error.__name__}")


def _operators(check: _Checks, model, loss_fn, shard, full, all_ops: bool) -> None:
    P = sum(p.numel() for p in model.parameters())
    V = torch.randn(P, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for cls in (linops.GGN, linops.Hessian, linops.EmpiricalFisher) if all_ops else (linops.GGN,):
        name = cls.__name__
        A, ref = cls(model, loss_fn, shard), cls(model, loss_fn, full, process_group="local")
        check.close(f"{name} num_data", A.num_data, N)
        check.close(f"{name} @ V", A @ V, ref @ V)
        per_parameter = A @ dict(zip(A.names, A.split(V)))  # summed over the ranks alike
        expected = dict(zip(A.names, ref.split(ref @ V)))
        check.close(f"{name} @ V per parameter", per_parameter, expected)
        if cls is not linops.Hessian:  # the engine's DiagHessian does not cover LayerNorm
            check.close(f"{name} diagonal", A.diagonal(), ref.diagonal())
            check.close(f"{name} trace", A.trace(), ref.trace())
        g = torch.Generator
        vals = linalg.eigsh(A, k=2, generator=g().manual_seed(3), tol=1e-10)[0]
        check.close(
            f"{name} eigsh",
            vals,
            linalg.eigsh(ref, k=2, generator=g().manual_seed(3), tol=1e-10)[0],
        )
        est = linalg.trace(A, 6, generator=g().manual_seed(4))
        check.close(
            f"{name} trace estimate", est, linalg.trace(ref, 6, generator=g().manual_seed(4))
        )
        b = V[:, 0]
        x, x_ref = linalg.solve(A, b, "minres", 1.0), linalg.solve(ref, b, "minres", 1.0)
        check.close(f"{name} minres", x, x_ref, rtol=1e-6)  # to the solver's tolerance
    for cls in (linops.KFAC, linops.EKFAC):
        A = cls(model, loss_fn, shard, fisher_type="type-2")
        ref = cls(model, loss_fn, full, fisher_type="type-2", process_group="local")
        for key, block in ref.blocks.items():
            got = A.blocks[key]
            for t in ("A", "B", "diagonal"):
                if hasattr(block, t):
                    check.close(f"{cls.__name__} {key}.{t}", getattr(got, t), getattr(block, t))
        if cls is linops.EKFAC:
            check.close("EKFAC eigenvalues", A.eigenvalues, ref.eigenvalues)
        check.close(f"{cls.__name__} @ V", A @ V, ref @ V)
    fisher = linops.Fisher(model, loss_fn, shard, generator=torch.Generator().manual_seed(5))
    out = fisher @ V
    gathered = [torch.empty_like(out) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, out)
    check.close("Fisher (MC) equal on every rank", gathered[-1], gathered[0])


def _sum_loss(check: _Checks, model, shard, full) -> None:
    loss_fn = nn.MSELoss(reduction="sum")
    shard = [(X, torch.tanh(X[:, :3])) for X, _ in shard]
    full = [(X, torch.tanh(X[:, :3])) for X, _ in full]
    A, ref = (
        linops.GGN(model, loss_fn, shard),
        linops.GGN(model, loss_fn, full, process_group="local"),
    )
    check.close("GGN sum-loss diagonal", A.diagonal(), ref.diagonal())
    lap = bg.laplace.Laplace(model, loss_fn, shard, structure="kfac")
    ref_lap = bg.laplace.Laplace(model, loss_fn, structure="kfac").fit(full, process_group="local")
    evidence = lap.log_marginal_likelihood()
    check.close("Laplace evidence", evidence, ref_lap.log_marginal_likelihood())
    fit = bg.influence.fit_factors(model, loss_fn, shard, curvature="kfac")
    ref_fit = bg.influence.fit_factors(
        model, loss_fn, full, curvature="kfac", process_group="local"
    )
    check.close("influence num_data", fit.num_data, ref_fit.num_data)
    check.close("influence trace", fit.structure.trace(), ref_fit.structure.trace())


def _results(check: _Checks, model, loss_fn, X, y, sl) -> None:
    def qs() -> tuple[Any, ...]:
        return (bg.Grad(), bg.SumGradSquared(), bg.DiagGGN(), bg.KFAC(fisher_type="type-2"))

    for fn in (loss_fn, nn.CrossEntropyLoss(reduction="sum")):
        full = bg.compute(model, fn, X, y, *qs())
        mine = bg.distributed.all_reduce_result(bg.compute(model, fn, X[sl], y[sl], *qs()))
        check.close(f"reduced loss ({fn.reduction})", mine.loss, full.loss)
        for q in full.quantities():
            for key, value in full[q].items():
                got, what = mine[type(q)][key], f"reduced {type(q).__name__} {key} ({fn.reduction})"
                if isinstance(value, torch.Tensor):
                    check.close(what, got, value)
                    continue
                for t in ("A", "B", "diagonal"):
                    if hasattr(value, t):
                        check.close(f"{what}.{t}", getattr(got, t), getattr(value, t))
                check.close(f"{what} R, N", (got.R, got.num_data), (value.R, value.num_data))
    res = bg.compute(model, loss_fn, X[sl], y[sl], bg.BatchGrad())
    check.raises(
        "BatchGrad",
        NotImplementedError,
        lambda: bg.distributed.all_reduce_result(res),
        "cannot be summed",
    )


def _data_set_loops(check: _Checks, model, loss_fn, shard, full) -> None:
    """The library's other data-set loops: reduced over the ranks (equal to one process over
    the whole data), or refused under the group (no silent rank-local answer) unless called
    inside ``bg.distributed.rank_local()``."""
    diag = linops.Diagonal.from_engine(model, loss_fn, shard, bg.DiagGGN())
    ref = linops.Diagonal.from_engine(model, loss_fn, full, bg.DiagGGN(), process_group="local")
    check.close("Diagonal.from_engine", diag.values, ref.values)
    lap = bg.laplace.Laplace(model, loss_fn, shard, structure="diag")
    ref_lap = bg.laplace.Laplace(model, loss_fn, structure="diag").fit(full, process_group="local")
    check.close(
        "Laplace validation_nll",
        lap.validation_nll(shard),
        ref_lap.validation_nll(full, process_group="local"),
    )
    grid = [0.1, 1.0, 10.0]  # every rank picks the prior of the whole validation set
    chosen = lap.optimize_prior_precision("gridsearch", val_data=shard, grid=grid)
    want = ref_lap.optimize_prior_precision("gridsearch", val_data=full, grid=grid)
    check.close("Laplace gridsearch prior", chosen, want)
    refused: dict[str, Callable[[], Any]] = {
        "Cockpit": lambda: bg.cockpit.Cockpit(model, loss_fn),
        "merging.diagonal_fisher": lambda: bg.merging.diagonal_fisher(model, loss_fn, shard),
        "merging.input_grams": lambda: bg.merging.input_grams(model, loss_fn, shard),
        "merging.kronecker_fisher": lambda: bg.merging.kronecker_fisher(model, loss_fn, shard),
        "pruning.obd": lambda: bg.pruning.obd(model, loss_fn, shard, 0.5),
        "pruning.woodfisher": lambda: bg.pruning.woodfisher(model, loss_fn, shard, 0.5),
        "pruning.layerwise_obs": lambda: bg.pruning.layerwise_obs(model, loss_fn, shard, 0.5),
        "pruning.mean_loss": lambda: bg.pruning.mean_loss(model, loss_fn, shard),
        "pinn.KFACPINN": lambda: bg.pinn.KFACPINN(None),  # type: ignore[arg-type]
        "pinn.ENGD": lambda: bg.pinn.ENGD(None),  # type: ignore[arg-type]
    }
    for name, call in refused.items():
        check.raises(name, NotImplementedError, call, "rank_local")
    check.raises(  # its own refusal, not mean_loss's
        "merging.select_weights", NotImplementedError,
        lambda: bg.merging.select_weights(lambda w: model, loss_fn, shard, 2),
        "bg.merging.select_weights",
    )  # fmt: skip
    with bg.distributed.rank_local():  # explicitly this rank's data: allowed
        bg.cockpit.Cockpit(model, loss_fn)
        local = bg.merging.diagonal_fisher(model, loss_fn, shard, fisher="type-2")
    check.raises(  # the context ends: refused again
        "after rank_local", NotImplementedError, refused["Cockpit"], "rank_local"
    )
    check.close("rank-local diagonal_fisher", local, _local_diagonal_fisher(model, shard))


def _local_diagonal_fisher(model, shard) -> dict[str, torch.Tensor]:
    """This rank's diagonal type-2 Fisher of the mean per-example loss, from the engine."""
    n = sum(y.shape[0] for _, y in shard)
    total: dict[str, torch.Tensor] = {}
    for X, y in shard:
        res = bg.compute(model, nn.CrossEntropyLoss(reduction="sum"), X, y, bg.DiagGGN())
        for k, v in res[bg.DiagGGN].items():
            total[k] = total.get(k, 0) + v
    return {k: v / n for k, v in total.items()}


def _errors(check: _Checks, model, loss_fn, shard, rank: int) -> None:
    A = linops.GGN(model, loss_fn, shard)
    torch.manual_seed(rank)  # the global generator differs per rank
    check.raises(
        "unseeded probes",
        RuntimeError,
        lambda: A @ torch.randn(A.shape[0], dtype=torch.float64),
        "differ between the ranks",
    )
    B = linops.GGN(model, loss_fn, shard, num_data=N + 1)
    check.raises("wrong num_data", ValueError, lambda: B.diagonal(), "hold 13 samples")
    X, y = _data()
    ds = torch.utils.data.TensorDataset(X, y)
    sampler = torch.utils.data.DistributedSampler(ds, shuffle=False)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, sampler=sampler)
    check.raises(
        "padding sampler", ValueError, lambda: linops.GGN(model, loss_fn, loader), "duplicated"
    )
    wide = nn.Linear(4 + rank, 3, dtype=torch.float64)
    data = [(torch.randn(2, 4 + rank, dtype=torch.float64), torch.tensor([0, 1]))]
    check.raises(
        "parameter shapes", RuntimeError, lambda: linops.GGN(wide, loss_fn, data), "disagree"
    )


def _train(model, X, y, steps: int = 3, opt: Any = None, **kw: Any) -> dict[str, torch.Tensor]:
    if opt is None:
        opt = bg.optim.KFAC(
            model, nn.CrossEntropyLoss(), fisher_type="type-2", refresh_every=1, **kw
        )
    loss_fn = opt.loss_fn or nn.CrossEntropyLoss()
    for _ in range(steps):
        opt.zero_grad()
        with opt.capture():
            loss = loss_fn(model(X), y)
        loss.backward()
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _mlp() -> nn.Module:
    torch.manual_seed(0)  # the same model on every rank and in the parent
    kw = {"dtype": torch.float64}  # float64 at creation: the same draws whatever the default
    return nn.Sequential(
        nn.Linear(4, 6, **kw), nn.Tanh(), nn.Linear(6, 5, **kw), nn.Tanh(), nn.Linear(5, 3, **kw)
    )


def _checkpoint(X, y, rank: int, path: str) -> None:
    """Two steps of 2 ranks (even halves of 12 samples, ownership), saved by rank 0."""
    model = _mlp()
    opt = bg.optim.KFAC(
        model, nn.CrossEntropyLoss(), fisher_type="type-2", refresh_every=1, ownership="owner"
    )
    half = slice(6 * rank, 6 * rank + 6)
    _train(model, X[:12][half], y[:12][half], steps=2, opt=opt)
    if rank == 0:
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)


OPTIMIZERS: dict[str, Callable[..., Any]] = {
    "KFAC": lambda m, **kw: bg.optim.KFAC(
        m, nn.CrossEntropyLoss(), fisher_type="type-2", refresh_every=1, **kw
    ),
    "KFAC, blocks of 4": lambda m, **kw: bg.optim.KFAC(  # block-diagonal sides broadcast
        m, nn.CrossEntropyLoss(), fisher_type="type-2", refresh_every=1, max_block=4, **kw
    ),
    "SINGD": lambda m, **kw: bg.optim.SINGD(  # warm start: once, on the owner
        m, nn.CrossEntropyLoss(), fisher_type="type-2", refresh_every=1, warm_start=True, **kw
    ),
    "SINGD, blocks of 4": lambda m, **kw: bg.optim.SINGD(  # block-diagonal K, C broadcast
        m, nn.CrossEntropyLoss(), fisher_type="type-2", refresh_every=1, max_block=4, **kw
    ),
    "SIRFShampoo": lambda m, **kw: bg.optim.SIRFShampoo(m, refresh_every=1, warm_start=True, **kw),
}


def _ownership(check: _Checks, X, y) -> None:
    """Owned refreshes equal the replicated ones bit for bit (float64 broadcasts); with
    bfloat16 broadcasts every rank holds the same parameters."""
    for kind, make in OPTIMIZERS.items():
        model = _mlp()
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        replicated = _train(model, X, y, opt=make(model))
        model.load_state_dict(start)
        opt = make(model, ownership="owner")
        owned = _train(model, X, y, opt=opt)
        for name, value in replicated.items():
            check.close(f"{kind} ownership {name}", owned[name], value, rtol=0.0)
        used = set(opt.ownership.owners.values())
        if used != set(range(min(dist.get_world_size(), len(opt.layers)))):
            check.failures.append(f"{kind}: owners {opt.ownership.owners} leave ranks idle")
        model.load_state_dict(start)
        low = _train(
            model,
            X,
            y,
            opt=make(model, ownership=bg.optim.Ownership(broadcast_dtype=torch.bfloat16)),
        )
        for name, value in low.items():
            gathered = [torch.empty_like(value) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, value)
            check.close(
                f"{kind} bf16 ownership equal on every rank {name}", gathered[-1], gathered[0]
            )


def _dcp_checkpoint(check: _Checks, X, y, rank: int, path: str) -> None:
    """Per optimizer: 2 steps on 2 ranks (owned refreshes), saved through
    ``torch.distributed.checkpoint``; a fresh model and optimizer loaded from it continue
    exactly as the uninterrupted run (bit for bit). The parent resumes it in one process."""
    half = slice(6 * rank, 6 * rank + 6)
    X, y = X[:12][half], y[:12][half]
    for kind, make in OPTIMIZERS.items():
        model = _mlp()
        uninterrupted = _train(model, X, y, steps=3, opt=make(model, ownership="owner"))
        model = _mlp()
        opt = make(model, ownership="owner")
        _train(model, X, y, steps=2, opt=opt)
        bg.distributed.checkpoint.save(f"{path}.{kind}", {"model": model, "optim": opt})
        model = _mlp()
        opt = make(model, ownership="owner")
        bg.distributed.checkpoint.load(f"{path}.{kind}", {"model": model, "optim": opt})
        resumed = _train(model, X, y, steps=1, opt=opt)
        for name, value in uninterrupted.items():
            check.close(f"{kind} DCP resume {name}", resumed[name], value, rtol=0.0)

    class RankLocal:  # a state that differs between the ranks must not be saved silently
        def state_dict(self) -> dict[str, Any]:
            return {"x": torch.full((2,), float(rank))}

    check.raises(
        "rank-local state",
        RuntimeError,
        lambda: bg.distributed.checkpoint.save(f"{path}.local", {"obj": RankLocal()}),
        "differs between the ranks",
    )


def _owner_failure(check: _Checks) -> None:
    """A refresh that raises on its owner raises on every rank (no rank waits forever)."""
    own = bg.optim.Ownership()

    def fail() -> tuple[torch.Tensor, ...]:
        raise FloatingPointError("boom")

    own.defer("layer", 1.0, fail, [((2,), torch.float64)], lambda r: None)
    error = FloatingPointError if dist.get_rank() == 0 else RuntimeError
    check.raises(
        "failed owned refresh",
        error,
        own.flush,
        "boom" if error is FloatingPointError else "failed on its owner",
    )


def _worker(rank: int, world: int, path: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    check = _Checks()
    try:
        torch.set_num_threads(1)
        model, loss_fn = _model(), nn.CrossEntropyLoss()
        X, y = _data()
        sl = _shard(rank, world)
        shard, full = _batches(X[sl], y[sl]), _batches(X, y, 4)
        parts = [  # 4 ranks on few cores are slow: the cheaper half of the checks there
            lambda: _operators(check, model, loss_fn, shard, full, world == 2),
            lambda: _sum_loss(check, model, shard, full),
            lambda: _results(check, model, loss_fn, X, y, sl),
            lambda: _errors(check, model, loss_fn, shard, rank),
            lambda: _data_set_loops(check, model, loss_fn, shard, full),
            lambda: _ownership(check, X[sl], y[sl]),
            lambda: _owner_failure(check),
            lambda: _checkpoint(X, y, rank, f"{out}.ckpt"),
            lambda: _dcp_checkpoint(check, X, y, rank, f"{out}.dcp"),
        ]
        for part in parts if world == 2 else [parts[i] for i in (0, 2, 3, 4, 5, 6)]:
            try:
                part()
            except Exception:  # reported to the parent
                check.failures.append(traceback.format_exc())
                break  # the ranks may no longer agree on the collectives
        torch.save(check.failures, f"{out}.{rank}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_equal_one_process_over_the_whole_data(world):
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "failures")
        try:
            mp.spawn(_worker, args=(world, os.path.join(tmp, "init"), out), nprocs=world)
        except mp.ProcessExitedException:
            # gloo's threads occasionally abort at interpreter exit after the work is done
            if not all(os.path.exists(f"{out}.{r}") for r in range(world)):
                raise
        failures = [f"rank {r}: {f}" for r in range(world) for f in torch.load(f"{out}.{r}")]
        assert not failures, "\n".join(failures)
        if world == 2:
            _resume_in_one_process(torch.load(f"{out}.ckpt"))
            _dcp_resume_in_one_process(f"{out}.dcp")


def _resume_in_one_process(saved: dict[str, Any]) -> None:
    """The state of 2 ranks resumes in 1 process: the optimizer state is replicated (owned
    refreshes are broadcast), so a plain state_dict of rank 0 holds all of it."""
    X, y = _data()
    X, y = X[:12], y[:12]
    model = _mlp()
    uninterrupted = _train(model, X, y, steps=3)
    model = _mlp()
    model.load_state_dict(saved["model"])
    opt = bg.optim.KFAC(model, nn.CrossEntropyLoss(), fisher_type="type-2", refresh_every=1)
    opt.load_state_dict(saved["opt"])
    resumed = _train(model, X, y, steps=1, opt=opt)
    for name, value in uninterrupted.items():
        torch.testing.assert_close(resumed[name], value, msg=name)


def _dcp_resume_in_one_process(path: str) -> None:
    """The DCP checkpoints of 2 ranks resume in 1 process (another world size) and continue
    the uninterrupted one-process run (to round-off: the ranks summed in another order)."""
    X, y = _data()
    X, y = X[:12], y[:12]
    for kind, make in OPTIMIZERS.items():
        model = _mlp()
        uninterrupted = _train(model, X, y, steps=3, opt=make(model))
        model = _mlp()
        opt = make(model)
        bg.distributed.checkpoint.load(f"{path}.{kind}", {"model": model, "optim": opt})
        assert opt.steps == 2
        resumed = _train(model, X, y, steps=1, opt=opt)
        for name, value in uninterrupted.items():
            torch.testing.assert_close(resumed[name], value, msg=f"{kind} {name}")


def test_owners_balance_the_cost():
    from beyondgrad.optim.ownership import assign_owners

    owners = assign_owners({"a": 8.0, "b": 1.0, "c": 7.0, "d": 2.0}, 2)
    assert owners == {"a": 0, "c": 1, "d": 1, "b": 0}
    assert assign_owners({"a": 1.0}, 4) == {"a": 0}


@pytest.mark.parametrize("kind", ["SINGD", "SIRFShampoo"])
def test_owned_refresh_in_one_process_equals_the_plain_one(kind):
    """Without a group, ``ownership="owner"`` refreshes on a scratch copy and copies back:
    the trajectory is the plain one bit for bit (also with a warm start and stacked factors)."""
    X, y = _data()
    model = _mlp()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    plain = _train(model, X, y, opt=OPTIMIZERS[kind](model))
    model.load_state_dict(start)
    owned = _train(model, X, y, opt=OPTIMIZERS[kind](model, ownership="owner"))
    for name, value in plain.items():
        assert torch.equal(owned[name], value), name
