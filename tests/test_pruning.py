"""bg.pruning in float64: OBD/OBS closed forms against brute force on a quadratic, the Woodbury
inverse against the dense one, WoodFisher and layer-wise OBS against dense re-implementations,
masks (sparsity, torch.nn.utils.prune) and errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import beyondgrad as bg

DT = torch.float64


def quadratic(seed: int = 0, N: int = 12, d: int = 5):
    """A linear least-squares problem at its minimum: L(w) = (1/N) ||X w - y||^2."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, d, generator=g, dtype=DT)
    y = torch.randn(N, generator=g, dtype=DT)
    w = torch.linalg.lstsq(X, y[:, None]).solution[:, 0]
    model = nn.Linear(d, 1, bias=False).to(DT)
    with torch.no_grad():
        model.weight.copy_(w[None])
    return model, X, y, w


def loss_at(X, y, w):
    return ((X @ w - y) ** 2).mean()


def constrained_minimizer(X, y, removed):
    """argmin L(w) subject to w[removed] = 0 (least squares without those features)."""
    keep = [j for j in range(X.shape[1]) if j not in removed]
    w = torch.zeros(X.shape[1], dtype=DT)
    w[keep] = torch.linalg.lstsq(X[:, keep], y[:, None]).solution[:, 0]
    return w


def test_obd_saliency_is_the_loss_increase_on_a_quadratic():
    model, X, y, w = quadratic()
    scores = bg.pruning.obd_scores(model, nn.MSELoss(), (X, y[:, None]), curvature="type-2")
    base = loss_at(X, y, w)
    for q in range(len(w)):
        w_q = w.clone()
        w_q[q] = 0.0
        torch.testing.assert_close(scores["weight"][0, q], loss_at(X, y, w_q) - base)


def test_obs_saliency_and_update_are_the_constrained_minimizer():
    _, X, y, w = quadratic(1)
    H = 2 * X.T @ X / len(X)
    Hinv = torch.linalg.inv(H)
    sal = bg.pruning.obs_saliency(w, torch.diagonal(Hinv))
    base = loss_at(X, y, w)
    for q in range(len(w)):
        best = constrained_minimizer(X, y, [q])
        new = w + bg.pruning.obs_update(w, Hinv, torch.tensor([q]))
        torch.testing.assert_close(new, best)
        torch.testing.assert_close(sal[q], loss_at(X, y, best) - base)
        single = -w[q] * Hinv[:, q] / Hinv[q, q]  # the textbook single-weight form
        torch.testing.assert_close(new - w, single)
    Q = torch.tensor([0, 3])
    torch.testing.assert_close(
        w + bg.pruning.obs_update(w, Hinv, Q), constrained_minimizer(X, y, [0, 3])
    )
    down = bg.pruning.obs_downdate(Hinv, Q)
    keep = [1, 2, 4]
    torch.testing.assert_close(down[keep][:, keep], torch.linalg.inv(H[keep][:, keep]))
    torch.testing.assert_close(down[Q], torch.zeros(2, 5, dtype=DT))


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).to(DT)


def batches(seed: int = 0, N: int = 9):
    g = torch.Generator().manual_seed(seed)
    X, y = torch.randn(N, 4, generator=g, dtype=DT), torch.randint(0, 2, (N,), generator=g)
    return X, y, [(X[:4], y[:4]), (X[4:], y[4:])]


def example_gradients(model, X, y, names):
    """[N, P] per-example gradients of each example's own loss, by a loop."""
    rows = []
    params = dict(model.named_parameters())
    for n in range(len(y)):
        model.zero_grad()
        F.cross_entropy(model(X[n : n + 1]), y[n : n + 1]).backward()
        rows.append(torch.cat([params[k].grad.reshape(-1) for k in names]))
    return torch.stack(rows)


def block_fisher(G, lam, segments):
    """The damped empirical Fisher, block-diagonal over [start, stop) segments."""
    Fd = lam * torch.eye(G.shape[1], dtype=DT) + G.T @ G / len(G)
    mask = torch.zeros_like(Fd, dtype=torch.bool)
    for a, b in segments:
        mask[a:b, a:b] = True
    return torch.where(mask, Fd, 0.0)


def test_woodbury_inverse_equals_the_dense_inverse():
    model, (X, y, data) = mlp(), batches()
    G = example_gradients(model, X, y, ["0.weight"])
    inv = bg.pruning.fisher_inverse(model, nn.CrossEntropyLoss(), data, ["0.weight"], 0.1, 12, 3)
    dense = torch.linalg.inv(block_fisher(G, 0.1, [(0, 12)]))
    torch.testing.assert_close(inv.to_dense(), dense)
    names = ["0.weight", "2.weight"]
    G = example_gradients(model, X, y, names)
    inv = bg.pruning.fisher_inverse(model, nn.CrossEntropyLoss(), data, names, 0.05, 5, 2)
    segments = [(0, 5), (5, 10), (10, 12), (12, 17), (17, 18)]
    torch.testing.assert_close(inv.to_dense(), torch.linalg.inv(block_fisher(G, 0.05, segments)))


def dense_woodfisher(Fm, w, sparsity, steps):
    """The rounds of the WoodFisher docstring with dense solves on F itself."""
    alive = torch.ones(len(w), dtype=torch.bool)
    w = w.clone()
    for t in range(1, steps + 1):
        idx = alive.nonzero().flatten()
        inv = torch.linalg.inv(Fm[idx][:, idx])
        sal = w[idx] ** 2 / (2 * torch.diagonal(inv))
        target = round(sparsity * t / steps * len(w))
        Q = idx[torch.argsort(sal)[: target - int((~alive).sum())]]
        R = torch.tensor([j for j in idx.tolist() if j not in Q.tolist()], dtype=torch.long)
        if len(R):
            w[R] += torch.linalg.solve(Fm[R][:, R], Fm[R][:, Q] @ w[Q])
        w[Q] = 0.0
        alive[Q] = False
    return w, alive


@pytest.mark.parametrize("steps", [1, 3])
def test_woodfisher_equals_a_dense_reimplementation(steps: int):
    model, (X, y, data) = mlp(2), batches(2)
    names = ["0.weight", "2.weight"]
    res = bg.pruning.woodfisher(
        model, nn.CrossEntropyLoss(), data, 0.5, damping=0.05, block_size=5, steps=steps
    )
    G = example_gradients(model, X, y, names)
    Fm = block_fisher(G, 0.05, [(0, 5), (5, 10), (10, 12), (12, 17), (17, 18)])
    params = dict(model.named_parameters())
    w0 = torch.cat([params[n].detach().reshape(-1) for n in names])
    w, alive = dense_woodfisher(Fm, w0, 0.5, steps)
    got = dict(res.model.named_parameters())
    torch.testing.assert_close(torch.cat([got[n].detach().reshape(-1) for n in names]), w)
    torch.testing.assert_close(torch.cat([res.masks[n].reshape(-1) for n in names]), alive)
    assert res.sparsity == 9 / 18
    torch.testing.assert_close(got["0.bias"], params["0.bias"])  # not covered: unchanged


def test_select_damping_keeps_the_candidate_with_the_least_training_loss():
    model, (X, y, data) = mlp(4), batches(4)
    Xv, yv, _ = batches(5, N=7)
    loss = nn.CrossEntropyLoss()
    candidates = (1e-3, 1e-1, 10.0)
    best, losses = bg.pruning.select_damping(
        model, loss, data, 0.5, "layer", candidates, validation=(Xv, yv), block_size=5, steps=2
    )
    assert set(losses) == set(candidates)
    for damping in candidates:  # each loss is the one of woodfisher's model with that damping
        res = bg.pruning.woodfisher(
            model, loss, data, 0.5, "layer", damping=damping, block_size=5, steps=2
        )
        ref = F.cross_entropy(res.model(Xv), yv).item()
        assert losses[damping] == pytest.approx(ref, rel=1e-12)
    assert losses[best] == min(losses.values())
    assert bg.pruning.mean_loss(model, loss, data) == pytest.approx(
        F.cross_entropy(model(X), y).item(), rel=1e-12
    )
    with pytest.raises(ValueError, match="candidate"):
        bg.pruning.select_damping(model, loss, data, 0.5, candidates=())


def test_woodfisher_independent_update_sums_single_weight_updates():
    model, (_, _, data) = mlp(3), batches(3)
    names = ["0.weight"]
    loss = nn.CrossEntropyLoss()
    inv = bg.pruning.fisher_inverse(model, loss, data, names, 0.1, 12, 4).to_dense()
    res = bg.pruning.woodfisher(
        model, loss, data, 0.25, params=names, damping=0.1, block_size=12, steps=1,
        update="independent",
    )  # fmt: skip
    w = model.get_submodule("0").weight.detach().reshape(-1)
    Q = (~res.masks["0.weight"].reshape(-1)).nonzero().flatten()
    expected = w - inv[:, Q] @ (w[Q] / torch.diagonal(inv)[Q])
    expected[Q] = 0.0
    torch.testing.assert_close(res.model.get_submodule("0").weight.detach().reshape(-1), expected)


def sequential_obs(W, H, keep):
    """Column by column: zero each pruned entry and re-optimize the later entries of its row
    (a dense constrained solve on H restricted to the columns from there on)."""
    W = W.clone()
    for r in range(W.shape[0]):
        for i in range(W.shape[1]):
            if not keep[r, i]:
                sub = H[i:, i:]
                W[r, i + 1 :] += torch.linalg.solve(sub[1:, 1:], sub[1:, 0]) * W[r, i]
                W[r, i] = 0.0
    return W


@pytest.mark.parametrize("block_size", [3, 7])
def test_prune_columns_equals_sequential_constrained_solves(block_size: int):
    g = torch.Generator().manual_seed(4)
    W = torch.randn(5, 7, generator=g, dtype=DT)
    Xin = torch.randn(20, 7, generator=g, dtype=DT)
    H = bg.pruning.damped_gram(Xin.T @ Xin / 20, 0.01)
    Wn, keep = bg.pruning.prune_columns(W, H, 0.6, block_size)
    assert int((~keep).sum()) == round(0.6 * 35)
    torch.testing.assert_close(Wn, sequential_obs(W, H, keep))
    same, all_kept = bg.pruning.prune_columns(W, H, 0.0, block_size)
    assert all_kept.all() and torch.equal(same, W)


def test_layerwise_obs_on_a_model():
    model, (X, _, data) = mlp(5), batches(5, N=30)
    res = bg.pruning.layerwise_obs(model, nn.CrossEntropyLoss(), data, 0.5, block_size=2)
    layer = model.get_submodule("0")
    A = torch.cat([X, torch.ones(len(X), 1, dtype=DT)], 1)
    H = bg.pruning.damped_gram(A.T @ A / len(X), 0.01)
    Wb = torch.cat([layer.weight, layer.bias[:, None]], 1).detach()
    keep = torch.cat([res.masks["0.weight"], torch.ones(3, 1, dtype=torch.bool)], 1)
    expected = sequential_obs(Wb, H, keep)
    pruned = res.model.get_submodule("0")
    torch.testing.assert_close(pruned.weight.detach(), expected[:, :-1])
    torch.testing.assert_close(pruned.bias.detach(), expected[:, -1])
    for name in ("0.weight", "2.weight"):
        numel = res.masks[name].numel()
        assert int((~res.masks[name]).sum()) == round(0.5 * numel)


def test_masks_have_the_requested_sparsity():
    g = torch.Generator().manual_seed(0)
    scores = {"a": torch.rand(4, 5, generator=g), "b": torch.rand(7, generator=g)}
    glob = bg.pruning.masks_from_scores(scores, 0.4, "global")
    assert sum(int((~m).sum()) for m in glob.values()) == round(0.4 * 27)
    kept_min = min(float(scores[n][m].min()) for n, m in glob.items())
    pruned_max = max(float(scores[n][~m].max()) for n, m in glob.items())
    assert pruned_max < kept_min
    per = bg.pruning.masks_from_scores(scores, 0.4, "layer")
    assert int((~per["a"]).sum()) == 8 and int((~per["b"]).sum()) == round(2.8)
    assert bg.pruning.mask_sparsity(per) == pytest.approx(11 / 27)


def test_every_method_gives_masks_torch_prune_accepts():
    model, (X, _, data) = mlp(6), batches(6)
    loss = nn.CrossEntropyLoss()
    results = [
        bg.pruning.magnitude(model, 0.5, scope="layer"),
        bg.pruning.obd(model, loss, data, 0.5),
        bg.pruning.obd(model, loss, data, 0.5, curvature="mc", generator=torch.Generator()),
        bg.pruning.woodfisher(model, loss, data, 0.5, damping=0.1),
        bg.pruning.layerwise_obs(model, loss, data, 0.5),
    ]
    for res in results:
        assert set(res.masks) == {"0.weight", "2.weight"}
        assert res.sparsity == pytest.approx(9 / 18 if res.method != "layerwise_obs" else 0.5)
        out = res.model(X)
        target = copy.deepcopy(model)
        bg.pruning.apply_masks(target, res.masks)
        mod = target.get_submodule("0")
        assert hasattr(mod, "weight_orig") and hasattr(mod, "weight_mask")
        torch.testing.assert_close(
            mod.weight, model.get_submodule("0").weight * res.masks["0.weight"]
        )
        res.apply()
        torch.testing.assert_close(res.model(X), out)  # the copy's zeros agree with its masks
    magnitude = results[0].masks["0.weight"]
    w = model.get_submodule("0").weight.detach().abs()
    assert w[magnitude].min() >= w[~magnitude].max()


def test_clear_errors():
    model, (_, _, data) = mlp(), batches()
    loss = nn.CrossEntropyLoss()
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="sparsity"):
            bg.pruning.magnitude(model, bad)
    with pytest.raises(ValueError, match="scope"):
        bg.pruning.magnitude(model, 0.5, scope="row")
    with pytest.raises(ValueError, match="unknown or frozen"):
        bg.pruning.magnitude(model, 0.5, params=["nope.weight"])
    with pytest.raises(ValueError, match="no input Gram"):
        bg.pruning.layerwise_obs(model, loss, data, 0.5, params=["0.bias"])
    with pytest.raises(ValueError, match="update"):
        bg.pruning.woodfisher(model, loss, data, 0.5, update="sum")
    with pytest.raises(ValueError, match="damping"):
        bg.pruning.woodfisher(model, loss, data, 0.5, damping=0.0)
    with pytest.raises(ValueError, match="fisher must be"):
        bg.pruning.obd(model, loss, data, 0.5, curvature="hessian")
