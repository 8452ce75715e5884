"""bg.merging in float64: each merge equals its definition, computed independently (per-example
loops for the Fishers, forward hooks and least squares for RegMean)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import beyondgrad as bg

DT = torch.float64


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)


def data(seed: int, n: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)


def layer_inputs(model: nn.Module, X: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every Linear/conv layer's input rows (bias-augmented, conv inputs unfolded)."""
    found: dict[str, torch.Tensor] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear | nn.Conv2d):

            def hook(m: nn.Module, inp: tuple, out: torch.Tensor, name: str = name) -> None:
                x = inp[0]
                if isinstance(m, nn.Conv2d):
                    x = F.unfold(x, m.kernel_size, m.dilation, m.padding, m.stride)
                    x = x.transpose(1, 2)
                x = x.reshape(-1, x.shape[-1])
                found[name] = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)

            hooks.append(mod.register_forward_hook(hook))
    model(X)
    for h in hooks:
        h.remove()
    return found


def test_average_is_the_weighted_mean_and_leaves_inputs_alone():
    models = [mlp(0), mlp(1), mlp(2)]
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in models]
    merged = bg.merging.average(models, weights=[1.0, 2.0, 1.0])
    for key, value in merged.state_dict().items():
        expected = (before[0][key] + 2 * before[1][key] + before[2][key]) / 4
        torch.testing.assert_close(value, expected)
    for m, b in zip(models, before, strict=True):
        for key, value in m.state_dict().items():
            assert torch.equal(value, b[key])
    state = bg.merging.average(models, as_state_dict=True)
    assert isinstance(state, dict)
    torch.testing.assert_close(state["0.bias"], sum(b["0.bias"] for b in before) / 3)


def test_average_takes_integer_buffers_from_the_first_model():
    models = [nn.BatchNorm1d(3).to(DT) for _ in range(2)]
    models[0].num_batches_tracked.fill_(4)
    models[1].num_batches_tracked.fill_(8)
    models[1].running_mean.fill_(2.0)
    merged = bg.merging.average(models).state_dict()
    assert int(merged["num_batches_tracked"]) == 4
    torch.testing.assert_close(merged["running_mean"], torch.ones(3, dtype=DT))


def empirical_fisher(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> dict:
    """(1/N) sum_n (grad l_n)^2 by a loop over examples."""
    total = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for n in range(len(y)):
        model.zero_grad()
        F.cross_entropy(model(X[n : n + 1]), y[n : n + 1]).backward()
        for name, p in model.named_parameters():
            total[name] += p.grad**2
    return {k: v / len(y) for k, v in total.items()}


def test_diagonal_fisher_empirical_and_type2_equal_loops():
    model, (X, y) = mlp(0), data(0)
    batches = [(X[:3], y[:3]), (X[3:], y[3:])]
    ef = bg.merging.diagonal_fisher(model, nn.CrossEntropyLoss(), batches, "empirical")
    for name, value in empirical_fisher(model, X, y).items():
        torch.testing.assert_close(ef[name], value)
    # type-2 with MSE (sum of squares): 2 * sum_c (d f_c / d theta)^2, averaged over examples
    target = torch.randn(len(y), 3, dtype=DT)
    ggn = bg.merging.diagonal_fisher(model, nn.MSELoss(), (X, target), "type-2")
    params = dict(model.named_parameters())
    for n in range(len(y)):

        def out(p: dict, n: int = n) -> torch.Tensor:
            return torch.func.functional_call(model, p, (X[n : n + 1],))[0]

        J = torch.func.jacrev(out)({k: v.detach() for k, v in params.items()})
        for name in params:
            ggn[name] = ggn[name] - 2 * (J[name] ** 2).sum(0) / len(y)
    for value in ggn.values():
        torch.testing.assert_close(value, torch.zeros_like(value))


def test_fisher_merge_is_the_fisher_weighted_average():
    models, sets = [mlp(0), mlp(1)], [data(0), data(1, n=5)]
    merged = bg.merging.fisher_merge(
        models, nn.CrossEntropyLoss(), sets, weights=[1.0, 3.0], structure="diagonal"
    )
    fishers = [empirical_fisher(m, *d) for m, d in zip(models, sets, strict=True)]
    for key, value in merged.state_dict().items():
        f0, f1 = (f[key].clamp_min(1e-8) for f in fishers)
        w0, w1 = (m.state_dict()[key] for m in models)
        torch.testing.assert_close(value, (f0 * w0 + 3 * f1 * w1) / (f0 + 3 * f1))


def test_fisher_average_floors_at_epsilon():
    states = [{"w": torch.tensor([1.0, 2.0], dtype=DT)}, {"w": torch.tensor([3.0, 6.0], dtype=DT)}]
    fishers = [{"w": torch.tensor([0.0, 1.0], dtype=DT)}, {"w": torch.tensor([0.0, 3.0], dtype=DT)}]
    out = bg.merging.fisher_average(states, fishers, [0.5, 0.5], epsilon=1e-3)
    torch.testing.assert_close(out["w"], torch.tensor([2.0, (2 + 18) / 4], dtype=DT))
    with pytest.raises(ValueError, match="epsilon"):
        bg.merging.fisher_average(states, fishers, [0.5, 0.5], epsilon=0.0)


def test_input_grams_equal_the_hooked_inputs():
    model, (X, y) = mlp(3), data(3)
    grams = bg.merging.input_grams(model, nn.CrossEntropyLoss(), [(X[:4], y[:4]), (X[4:], y[4:])])
    rows = layer_inputs(model, X)
    assert set(grams) == {"0", "2"}
    for name, gram in grams.items():
        assert gram.count == len(X) and gram.weight == f"{name}.weight"
        torch.testing.assert_close(gram.matrix, rows[name].T @ rows[name] / len(X))


def regmean_oracle(models, sets, lam, layer):
    """Least squares over the concatenated, weighted inputs of every model."""
    lhs, rhs = [], []
    for m, (X, _), w in zip(models, sets, lam, strict=True):
        A = layer_inputs(m, X)[layer]
        mod = m.get_submodule(layer)
        Wb = torch.cat([mod.weight.reshape(mod.weight.shape[0], -1), mod.bias[:, None]], 1)
        scale = (w / len(A)) ** 0.5
        lhs.append(scale * A)
        rhs.append(scale * A @ Wb.detach().T)
    return torch.linalg.lstsq(torch.cat(lhs), torch.cat(rhs)).solution.T


def test_regmean_with_alpha_one_solves_the_least_squares():
    models, sets = [mlp(0), mlp(1), mlp(2)], [data(0, 9), data(1, 8), data(2, 10)]
    lam = [0.2, 0.5, 0.3]
    merged = bg.merging.regmean(models, nn.CrossEntropyLoss(), sets, alpha=1.0, weights=lam)
    for layer in ("0", "2"):
        expected = regmean_oracle(models, sets, lam, layer)
        mod = merged.get_submodule(layer)
        torch.testing.assert_close(mod.weight.detach(), expected[:, :-1])
        torch.testing.assert_close(mod.bias.detach(), expected[:, -1])


def test_regmean_shrinks_the_off_diagonal_gram():
    models, sets = [mlp(0), mlp(1)], [data(0, 9), data(1, 8)]
    merged = bg.merging.regmean(models, nn.CrossEntropyLoss(), sets, alpha=0.3)
    mod = merged.get_submodule("2")
    grams, rhs = [], []
    for m, (X, _) in zip(models, sets, strict=True):
        A = layer_inputs(m, X)["2"]
        G = A.T @ A / len(A)
        G = 0.3 * G + 0.7 * torch.diag(torch.diag(G))
        layer = m.get_submodule("2")
        grams.append(G)
        rhs.append(G @ torch.cat([layer.weight, layer.bias[:, None]], 1).detach().T)
    expected = torch.linalg.solve(sum(grams), sum(rhs)).T
    torch.testing.assert_close(mod.weight.detach(), expected[:, :-1])
    torch.testing.assert_close(mod.bias.detach(), expected[:, -1])


def test_regmean_on_convolutions_and_fallbacks():
    def cnn(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.LayerNorm(48),
            nn.Linear(48, 2),
        ).to(DT)  # fmt: skip

    models = [cnn(0), cnn(1)]
    sets = [(torch.randn(4, 2, 4, 4, dtype=DT), torch.randint(0, 2, (4,))) for _ in range(2)]
    merged = bg.merging.regmean(models, nn.CrossEntropyLoss(), sets, alpha=1.0)
    expected = regmean_oracle(models, sets, [0.5, 0.5], "0")
    conv = merged.get_submodule("0")
    torch.testing.assert_close(conv.weight.detach().reshape(3, -1), expected[:, :-1])
    torch.testing.assert_close(conv.bias.detach(), expected[:, -1])
    ln = [m.get_submodule("3").weight.detach() for m in models]  # no Gram: averaged
    torch.testing.assert_close(merged.get_submodule("3").weight.detach(), (ln[0] + ln[1]) / 2)


def test_regmean_gives_unused_inputs_the_average():
    models = [mlp(0), mlp(1)]
    sets = [data(0, 9), data(1, 8)]
    for X, _ in sets:
        X[:, 1] = 0.0  # input 1 never varies: its weights are not determined by the data
    merged = bg.merging.regmean(models, nn.CrossEntropyLoss(), sets, alpha=0.5)
    w = [m.get_submodule("0").weight.detach()[:, 1] for m in models]
    torch.testing.assert_close(merged.get_submodule("0").weight.detach()[:, 1], (w[0] + w[1]) / 2)


def test_clear_errors():
    loss = nn.CrossEntropyLoss()
    other = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)
    with pytest.raises(ValueError, match=r"'0\.weight'"):
        bg.merging.average([mlp(0), other])
    with pytest.raises(ValueError, match="other entries"):
        bg.merging.average([mlp(0), nn.Sequential(nn.Linear(4, 5)).to(DT)])
    with pytest.raises(ValueError, match="no model"):
        bg.merging.average([])
    with pytest.raises(ValueError, match="weights"):
        bg.merging.average([mlp(0), mlp(1)], weights=[1.0])
    with pytest.raises(ValueError, match="non-negative"):
        bg.merging.average([mlp(0), mlp(1)], weights=[1.0, -1.0])
    with pytest.raises(ValueError, match="one data set per model"):
        bg.merging.regmean([mlp(0), mlp(1)], loss, [data(0)])
    with pytest.raises(ValueError, match="alpha"):
        bg.merging.regmean([mlp(0), mlp(1)], loss, [data(0), data(1)], alpha=1.5)
    with pytest.raises(ValueError, match="fisher must be"):
        bg.merging.fisher_merge([mlp(0), mlp(1)], loss, [data(0), data(1)], fisher="hessian")
    with pytest.raises(ValueError, match="no batch"):
        bg.merging.diagonal_fisher(mlp(0), loss, [])


# ---- choosing the merge weights on data -------------------------------------------------------


def test_weight_candidates_cover_the_shares_once() -> None:
    two = bg.merging.weight_candidates(2)
    assert two[0] == (0.5, 0.5)
    assert sorted(w[0] for w in two) == pytest.approx([0.1 * k for k in range(1, 10)])
    three = bg.merging.weight_candidates(3, shares=(0.5, 0.2))
    assert three[0] == pytest.approx((1 / 3,) * 3)
    assert (0.5, 0.25, 0.25) in three and (0.4, 0.4, 0.2) in three and len(three) == 7
    assert all(sum(w) == pytest.approx(1.0) for w in two + three)
    with pytest.raises(ValueError, match="two models"):
        bg.merging.weight_candidates(1)
    with pytest.raises(ValueError, match="shares"):
        bg.merging.weight_candidates(2, shares=(1.0,))


def test_select_weights_is_the_argmin_of_the_merged_losses() -> None:
    """Every candidate's loss equals the merged parameters' mean cross-entropy written out by
    hand, and the choice is their argmin (Fisher merging with the diagonal Fisher)."""
    A, B = mlp(0), mlp(1)
    dA, dB, val = data(0), data(1), data(2, n=11)
    loss = nn.CrossEntropyLoss()

    def merge(w: list[float]) -> nn.Module:
        return bg.merging.fisher_merge([A, B], loss, [dA, dB], structure="diagonal", weights=w)

    weights, losses = bg.merging.select_weights(merge, loss, val, count=2)
    fishers = [bg.merging.diagonal_fisher(m, loss, d) for m, d in ((A, dA), (B, dB))]
    for cand, value in losses.items():
        state = {}
        for (name, a), b in zip(A.named_parameters(), B.parameters()):
            fa, fb = (cand[i] * f[name].clamp_min(1e-8) for i, f in enumerate(fishers))
            state[name] = (fa * a + fb * b) / (fa + fb)
        with torch.no_grad():
            logits = torch.func.functional_call(A, state, (val[0],))
        assert value == pytest.approx(float(F.cross_entropy(logits, val[1])), rel=1e-10)
    assert tuple(weights) == min(losses, key=losses.__getitem__)
    assert len(losses) == 9 and len(set(losses.values())) > 1


def test_select_weights_keeps_equal_weights_on_a_tie_and_checks_candidates() -> None:
    A = mlp(0)
    loss, val = nn.CrossEntropyLoss(), data(2)
    weights, losses = bg.merging.select_weights(lambda w: A, loss, val, count=2)
    assert weights == [0.5, 0.5] and len(set(losses.values())) == 1
    weights, _ = bg.merging.select_weights(
        lambda w: A, loss, val, count=2, candidates=[(3.0, 1.0), (1.0, 3.0)]
    )
    assert weights == [0.75, 0.25]  # normalized, the first of equal losses
    with pytest.raises(ValueError, match="candidate"):
        bg.merging.select_weights(lambda w: A, loss, val, count=2, candidates=[])
    with pytest.raises(ValueError, match="weights"):
        bg.merging.select_weights(lambda w: A, loss, val, count=2, candidates=[(1.0, 1.0, 1.0)])


def test_select_weights_reads_the_data_once_and_merges_each_distinct_candidate_once() -> None:
    """A one-shot generator of unequal batches works (the loss is the mean over all
    examples); repeated candidates (equal after normalization) are merged once."""
    A, B = mlp(0), mlp(1)
    X, y = data(3, n=10)
    loss = nn.CrossEntropyLoss()
    calls: list[list[float]] = []

    def merge(w: list[float]) -> nn.Module:
        calls.append(w)
        return bg.merging.average([A, B], weights=w)

    batches = ((X[a:b], y[a:b]) for a, b in ((0, 3), (3, 10)))  # a generator: one pass only
    cands = [(1.0, 1.0), (2.0, 2.0), (1.0, 3.0)]
    weights, losses = bg.merging.select_weights(merge, loss, batches, count=2, candidates=cands)
    assert calls == [[0.5, 0.5], [0.25, 0.75]]
    assert set(losses) == set(cands) and losses[(1.0, 1.0)] == losses[(2.0, 2.0)]
    for c, w in (((1.0, 1.0), [0.5, 0.5]), ((1.0, 3.0), [0.25, 0.75])):
        with torch.no_grad():
            assert losses[c] == pytest.approx(float(F.cross_entropy(merge(w)(X), y)), rel=1e-12)
    assert weights == ([0.5, 0.5] if losses[(1.0, 1.0)] <= losses[(1.0, 3.0)] else [0.25, 0.75])


def test_select_weights_skips_non_finite_losses_and_scores_in_eval_mode() -> None:
    """A NaN loss never wins; Dropout is off while scoring (identical models tie) and the
    merged model's training flag is restored."""
    good = mlp(0)
    bad = mlp(0)
    with torch.no_grad():
        bad[0].weight.fill_(float("nan"))
    loss, val = nn.CrossEntropyLoss(), data(2)
    weights, losses = bg.merging.select_weights(
        lambda w: bad if w[0] == 0.5 else good, loss, val, count=2
    )
    assert losses[(0.5, 0.5)] != losses[(0.5, 0.5)] and weights == [0.1, 0.9]
    with pytest.raises(ValueError, match="finite"):
        bg.merging.select_weights(lambda w: bad, loss, val, count=2)
    dropout = nn.Sequential(nn.Linear(4, 5), nn.Dropout(0.5), nn.Linear(5, 3)).to(DT).train()
    weights, losses = bg.merging.select_weights(lambda w: dropout, loss, val, count=2)
    assert weights == [0.5, 0.5] and len(set(losses.values())) == 1 and dropout.training
    with pytest.raises(ValueError, match="finite"):
        bg.merging.merge_weights([float("nan"), 1.0], 2)
