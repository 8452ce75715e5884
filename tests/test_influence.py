"""bg.influence against dense float64 formulas: per-example gradients by parameter copies
(oracles), the full GGN from the oracles, and each structure's own matrix (the KFAC/EKFAC
operators' dense matrices, the GGN diagonal); every parameter of a transformer covered."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import beyondgrad as bg
from models import TinyGPT, _init
from oracles.curvature import ggn
from oracles.first_order import per_sample_grads


def problem(loss: str, seed: int = 0):
    torch.manual_seed(seed)
    K = 3 if loss == "ce" else 2
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, K)).double()
    X, Xq = torch.randn(7, 3, dtype=torch.float64), torch.randn(3, 3, dtype=torch.float64)
    if loss == "ce":
        y, yq, loss_fn = torch.randint(0, K, (7,)), torch.randint(0, K, (3,)), nn.CrossEntropyLoss()
    else:
        y, yq = torch.randn(7, K, dtype=torch.float64), torch.randn(3, K, dtype=torch.float64)
        loss_fn = nn.MSELoss()
    train = [(X[:4], y[:4]), (X[4:], y[4:])]  # uneven chunks
    return model, loss_fn, (X, y), (Xq, yq), train, [(Xq, yq)]


def flat_grads(model, loss_fn, X, y) -> torch.Tensor:
    """``[N, P]``: each example's own (summed-loss) gradient, by parameter copies."""
    grads = per_sample_grads(model, type(loss_fn)(reduction="sum"), X, y)
    return torch.cat([g.reshape(g.shape[0], -1) for g in grads.values()], 1)


def dense_scores(C, Gq, Gt, damping):
    eye = torch.eye(C.shape[0], dtype=C.dtype)
    return Gq @ torch.linalg.solve(C + damping * eye, Gt.T)


def structure_matrix(curvature, model, loss_fn, X, y, train):
    """The matrix ``C`` each curvature stands for (mean over the 7 training examples)."""
    loss_sum = type(loss_fn)(reduction="sum")
    if curvature in ("full", "diag"):
        H = ggn(model, loss_sum, X, y)["full"] / 7
        return H if curvature == "full" else torch.diag(torch.diagonal(H))
    cls = bg.linops.KFAC if curvature == "kfac" else bg.linops.EKFAC
    return cls(model, loss_sum, train, fisher_type="type-2").to_dense() / 7


@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize("curvature", ["full", "ekfac", "kfac", "diag"])
def test_scores_match_dense_formula(curvature, loss):
    model, loss_fn, (X, y), (Xq, yq), train, query = problem(loss)
    C = structure_matrix(curvature, model, loss_fn, X, y, train)
    Gt, Gq = flat_grads(model, loss_fn, X, y), flat_grads(model, loss_fn, Xq, yq)
    damping = 0.05
    expected = dense_scores(C, Gq, Gt, damping)
    S = bg.influence.scores(model, loss_fn, train, query, curvature=curvature, damping=damping)
    assert S.shape == (3, 7)
    torch.testing.assert_close(S, expected, atol=1e-9, rtol=1e-8)
    selfs = bg.influence.self_influence(model, loss_fn, train, curvature=curvature, damping=damping)
    torch.testing.assert_close(selfs, torch.diagonal(dense_scores(C, Gt, Gt, damping)))
    # one example per chunk (a budget below one example's gradient), in the curvature
    # passes too: the same numbers
    factors = bg.influence.fit_factors(model, loss_fn, train, curvature=curvature, grad_budget=1)
    kw = dict(damping=damping, factors=factors, grad_budget=1)
    S1 = bg.influence.scores(model, loss_fn, train, query, **kw)
    torch.testing.assert_close(S1, expected, atol=1e-9, rtol=1e-8)
    selfs1 = bg.influence.self_influence(model, loss_fn, train, **kw)
    torch.testing.assert_close(selfs1, selfs, atol=1e-9, rtol=1e-8)
    sizes = [len(g["0.bias"]) for g in bg.influence.example_gradients(
        model, loss_fn, train, ["0.bias"], budget=1)]  # fmt: skip
    assert sizes == [1] * 7


def test_full_curvature_is_the_linops_ggn_of_the_mean_loss():
    """For cross-entropy with class indices, C is bg.linops.GGN(model, loss_fn, train)."""
    model, loss_fn, (_X, _y), _, train, _ = problem("ce")
    factors = bg.influence.fit_factors(model, loss_fn, train, curvature="full")
    C = factors.structure.to_dense() / factors.num_data
    torch.testing.assert_close(C, bg.linops.GGN(model, loss_fn, train).to_dense())


def test_identity_top_k_and_default_damping():
    model, loss_fn, (X, y), (Xq, yq), train, query = problem("ce")
    S = bg.influence.scores(model, loss_fn, train, query, curvature="identity")
    Gt, Gq = flat_grads(model, loss_fn, X, y), flat_grads(model, loss_fn, Xq, yq)
    torch.testing.assert_close(S, Gq @ Gt.T)
    values, idx = bg.influence.top_k(S, 2)
    assert idx.shape == (3, 2)
    torch.testing.assert_close(values, S.gather(1, idx))
    assert bool((values[:, 0] >= values[:, 1]).all()) and bool((values[:, 1:] >= S.min()).all())
    with pytest.raises(ValueError, match="k must be"):
        bg.influence.top_k(S, 8)
    factors = bg.influence.fit_factors(model, loss_fn, train, curvature="diag")
    C = structure_matrix("diag", model, loss_fn, X, y, train)
    damping = 0.1 * torch.trace(C).item() / C.shape[0]
    assert factors.default_damping() == pytest.approx(damping, rel=1e-12)
    torch.testing.assert_close(
        bg.influence.scores(model, loss_fn, train, query, factors=factors),
        dense_scores(C, Gq, Gt, damping),
    )


def test_low_rank_query_compression():
    """Rank >= n_query is exact; rank r is the per-parameter truncated SVD of the
    preconditioned query gradients."""
    model, loss_fn, (X, y), (Xq, yq), train, query = problem("ce")
    factors = bg.influence.fit_factors(model, loss_fn, train, curvature="kfac")
    exact = bg.influence.scores(model, loss_fn, train, query, damping=0.1, factors=factors)
    same = bg.influence.scores(model, loss_fn, train, query, damping=0.1, factors=factors,
                               query_rank=3)  # fmt: skip
    torch.testing.assert_close(same, exact)
    Gt, Gq = flat_grads(model, loss_fn, X, y), flat_grads(model, loss_fn, Xq, yq)
    C = structure_matrix("kfac", model, loss_fn, X, y, train)
    pre = torch.linalg.solve(C + 0.1 * torch.eye(C.shape[0], dtype=C.dtype), Gq.T)
    expected, start = 0, 0
    for p in model.parameters():
        block = pre[start : start + p.numel()]
        U, S, Vh = torch.linalg.svd(block, full_matrices=False)
        expected = expected + Gt[:, start : start + p.numel()] @ (U[:, :1] * S[:1]) @ Vh[:1]
        start += p.numel()
    low = bg.influence.scores(model, loss_fn, train, query, damping=0.1, factors=factors,
                              query_rank=1)  # fmt: skip
    torch.testing.assert_close(low, expected.T)
    assert not torch.allclose(low, exact)
    with pytest.raises(ValueError, match="query_rank"):
        bg.influence.scores(model, loss_fn, train, query, factors=factors, query_rank=0)


def test_factors_reused_and_saved(tmp_path):
    model, loss_fn, _, _, train, query = problem("ce")
    factors = bg.influence.fit_factors(model, loss_fn, train, curvature="ekfac")
    S = bg.influence.scores(model, loss_fn, train, query, damping=0.1, factors=factors)
    path = str(tmp_path / "factors.pt")
    factors.save(path)
    loaded = bg.influence.InfluenceFactors.load(path)
    S2 = bg.influence.scores(model, loss_fn, train, query, damping=0.1, factors=loaded)
    torch.testing.assert_close(S2, S, atol=0, rtol=0)
    with pytest.raises(ValueError, match="fitted for"):
        bg.influence.scores(model, loss_fn, train, query, curvature="kfac", factors=loaded)
    # progress bars: with tqdm and, blocked, without it (same numbers)
    torch.testing.assert_close(
        bg.influence.scores(
            model, loss_fn, train, query, damping=0.1, factors=factors, progress=True
        ),
        S,
    )


def test_tqdm_is_optional(monkeypatch):
    """No module of beyondgrad imports tqdm at import time; without it, no bar."""
    root = Path(bg.__file__).parent
    for path in root.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:  # module-level statements only
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not any(n.startswith("tqdm") for n in names), path
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    assert list(bg.influence.progress_bar([1, 2], True, "x")) == [1, 2]


def test_every_transformer_parameter_covered():
    """Embeddings, LayerNorms, attention and MLP weights: EK-FAC influence over all of them
    equals the dense formula with the EK-FAC matrix."""
    torch.manual_seed(0)
    model = TinyGPT(vocab=5, d=4, heads=2, T=3, attention=("hand",))
    model.head.weight = nn.Parameter(model.tok.weight.detach().clone())  # untie
    model = _init(model, 0)
    idx, targets = torch.randint(0, 5, (4, 3)), torch.randint(0, 5, (4, 3))
    loss_fn = nn.CrossEntropyLoss()
    train, query = [(idx[:2], targets[:2]), (idx[2:], targets[2:])], [(idx[:1], targets[:1])]
    factors = bg.influence.fit_factors(model, loss_fn, train, curvature="ekfac")
    names = [n for n, _ in model.named_parameters()]
    assert factors.names == names and any("ln" in n for n in names) and "tok.weight" in names
    C = bg.linops.EKFAC(model, nn.CrossEntropyLoss(reduction="sum"), train, fisher_type="type-2")
    C = C.to_dense() / 4
    Gt, Gq = (
        flat_grads(model, loss_fn, idx, targets),
        flat_grads(model, loss_fn, idx[:1], targets[:1]),
    )
    S = bg.influence.scores(model, loss_fn, train, query, damping=0.01, factors=factors)
    torch.testing.assert_close(S, dense_scores(C, Gq, Gt, 0.01), atol=1e-9, rtol=1e-7)


def test_invalid_arguments_raise():
    model, loss_fn, _, _, train, query = problem("ce")
    with pytest.raises(ValueError, match="curvature"):
        bg.influence.scores(model, loss_fn, train, query, curvature="hessian")
    with pytest.raises(ValueError, match="unknown"):
        bg.influence.fit_factors(model, loss_fn, train, params=["nope"])
    with pytest.raises(ValueError, match="damping"):
        bg.influence.scores(model, loss_fn, train, query, curvature="diag", damping=-1.0)


def test_chunked_preconditioning():
    """Preconditioning a column at a time equals the whole block (EK-FAC, dense check)."""
    model, loss_fn, (X, y), _, train, _ = problem("ce")
    factors = bg.influence.fit_factors(model, loss_fn, train, curvature="ekfac")
    C = structure_matrix("ekfac", model, loss_fn, X, y, train)
    M = torch.randn(C.shape[0], 5, dtype=torch.float64)
    expected = torch.linalg.solve(C + 0.3 * torch.eye(C.shape[0], dtype=torch.float64), M)
    torch.testing.assert_close(factors.precondition(M, 0.3, chunk=1), expected)
    torch.testing.assert_close(factors.precondition(M, 0.3), expected)


def _engine_objects() -> int:
    """Objects of the engine's own classes that the collector tracks (sessions, recorders,
    layer calls, statistics, ...)."""
    import gc

    def engine(o: object) -> bool:
        module = type(o).__dict__.get("__module__", "")
        return isinstance(module, str) and module.startswith("beyondgrad.engine")

    return sum(engine(o) for o in gc.get_objects())


def test_a_pass_leaves_no_engine_objects_alive():
    """With the garbage collector off, nothing of a pass outlives it: no reference cycle holds
    the session, its recorded calls (every layer's inputs and outputs) or the statistics
    (plain compute, the influence gradient stream, a transformer, a watched backward)."""
    import gc

    torch.manual_seed(0)
    model, _, (X, y), _, train, _ = problem("ce")
    gpt = _init(TinyGPT(vocab=8, d=4, heads=2, T=3), 0)
    Xs, ys = torch.randint(0, 8, (2, 3)), torch.randint(0, 8, (2, 3))
    ce = nn.CrossEntropyLoss(reduction="sum")

    def watched() -> None:
        with bg.capture(model, ce, bg.BatchGrad(), from_backward=True) as session:
            loss = ce(model(X), y)
            loss.backward()
        session.compute(loss)

    passes = {
        "compute": lambda: bg.compute(model, ce, X, y, bg.BatchGrad()),
        "stream": lambda: list(bg.influence.example_gradients(model, ce, train, ["0.weight"])),
        "transformer": lambda: bg.compute(gpt, ce, Xs, ys, bg.BatchGrad()),
        "watched": watched,
    }
    for name, run in passes.items():
        run()  # caches (probes per input signature) are filled by the first pass
        gc.collect()
        before = _engine_objects()
        gc.disable()
        try:
            run()
            after = _engine_objects()
        finally:
            gc.enable()
        assert after == before, f"{name}: {after - before} engine objects outlive the pass"
