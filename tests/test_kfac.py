"""KFAC: the exactness cases of the KFAC tutorial in float64 (type-2 == GGN block, empirical ==
EF block, reduce == GGN block, a negative test), MC convergence, the fallback diagonals, and the
KroneckerFactors linear algebra."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import beyondgrad as bg
from oracles.curvature import ggn
from oracles.first_order import per_sample_grads

torch.set_default_dtype(torch.float64)


def block(ref: dict, weight: str, bias: str | None) -> torch.Tensor:
    """The GGN block of ``[W | b]`` flattened row-major as ``[O, I + 1]`` (joint bias)."""
    names, shapes = ref["names"], ref["shapes"]
    offsets, start = {}, 0
    for n, s in zip(names, shapes):
        offsets[n] = start
        start += s.numel()
    O, I = shapes[names.index(weight)][0], shapes[names.index(weight)][1:].numel()
    idx = []
    for o in range(O):
        idx += [offsets[weight] + o * I + i for i in range(I)]
        if bias is not None:
            idx.append(offsets[bias] + o)
    idx = torch.tensor(idx)
    return ref["full"][idx][:, idx]


def ef_block(model, loss_fn, X, y, weight, bias, R):
    bg_ = per_sample_grads(model, loss_fn, X, y)
    rows = [bg_[weight].flatten(2)]
    if bias is not None:
        rows.append(bg_[bias].unsqueeze(2))
    G = torch.cat(rows, 2).flatten(1)  # [N, O*(I+1)]
    return G.T @ G / R


def mlp(N, seed=0, act=nn.Tanh):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), act(), nn.Linear(4, 3))
    return model, torch.randn(N, 3), torch.randint(0, 3, (N,))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_single_sample_type2_and_empirical_are_exact(reduction):
    model, X, y = mlp(1)
    loss_fn = nn.CrossEntropyLoss(reduction=reduction)
    ref = ggn(model, loss_fn, X, y)
    res = bg.compute(
        model, loss_fn, X, y, bg.KFAC(fisher_type="type-2"), bg.KFAC(fisher_type="empirical")
    )
    for layer in ("0", "2"):
        t2 = res[bg.KFAC(fisher_type="type-2")][layer]
        assert t2.order == "B kron A" and t2.params == (f"{layer}.weight", f"{layer}.bias")
        torch.testing.assert_close(t2.to_dense(), block(ref, f"{layer}.weight", f"{layer}.bias"))
        emp = res[bg.KFAC(fisher_type="empirical")][layer]
        torch.testing.assert_close(
            emp.to_dense(),
            ef_block(model, loss_fn, X, y, f"{layer}.weight", f"{layer}.bias", emp.R),
        )


def deep_linear(N, seq=None, reduce=False, seed=0):
    torch.manual_seed(seed)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.l2, self.l3 = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            h = self.l2(self.l1(x))
            if reduce:
                h = h.mean(1)
            return self.l3(h)

    X = torch.randn(N, 3) if seq is None else torch.randn(N, seq, 3)
    out_shape = (N, 2) if seq is None or reduce else (N, seq, 2)
    return Net(), X, torch.randn(*out_shape)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_deep_linear_mse_type2_exact_and_empirical_is_not_ef(reduction):
    model, X, y = deep_linear(6)
    loss_fn = nn.MSELoss(reduction=reduction)
    ref = ggn(model, loss_fn, X, y)
    res = bg.compute(
        model, loss_fn, X, y, bg.KFAC(fisher_type="type-2"), bg.KFAC(fisher_type="empirical")
    )
    for layer in ("l1", "l2", "l3"):
        exact = block(ref, f"{layer}.weight", f"{layer}.bias")
        torch.testing.assert_close(res[bg.KFAC(fisher_type="type-2")][layer].to_dense(), exact)
        emp = res[bg.KFAC(fisher_type="empirical")][layer]
        ef = ef_block(model, loss_fn, X, y, f"{layer}.weight", f"{layer}.bias", emp.R)
        assert (emp.to_dense() - ef).norm() / ef.norm() > 1e-2  # negative test


def test_mc_kfac_converges_to_type2():
    model, X, y = deep_linear(4)
    loss_fn = nn.MSELoss()
    exact = bg.compute(model, loss_fn, X, y, bg.KFAC(fisher_type="type-2"))[bg.KFAC][
        "l2"
    ].to_dense()
    errs = []
    for M in (2, 2000):
        q = bg.KFAC(fisher_type="mc", mc_samples=M)
        got = bg.compute(model, loss_fn, X, y, q, generator=torch.Generator().manual_seed(0))[q][
            "l2"
        ]
        errs.append(float((got.to_dense() - exact).norm() / exact.norm()))
    assert errs[1] < 0.1 and errs[1] < errs[0] / 4, errs


def test_sequence_deep_linear_expand_is_exact():
    model, X, y = deep_linear(3, seq=4)
    loss_fn = nn.MSELoss()
    ref = ggn(model, loss_fn, X, y)
    res = bg.compute(model, loss_fn, X, y, bg.KFAC(fisher_type="type-2", kfac_approx="expand"))
    for layer in ("l1", "l2", "l3"):
        torch.testing.assert_close(
            res[bg.KFAC][layer].to_dense(), block(ref, f"{layer}.weight", f"{layer}.bias")
        )


def test_reduce_setting_is_exact():
    model, X, y = deep_linear(3, seq=5, reduce=True)
    loss_fn = nn.MSELoss(reduction="sum")
    ref = ggn(model, loss_fn, X, y)
    q = bg.KFAC(fisher_type="type-2", kfac_approx="reduce")
    res = bg.compute(model, loss_fn, X, y, q)
    for layer in ("l1", "l2"):
        torch.testing.assert_close(
            res[q][layer].to_dense(), block(ref, f"{layer}.weight", f"{layer}.bias")
        )


@pytest.mark.parametrize("groups", [1, 2])
def test_shallow_cnn_with_average_pooling_reduce_is_exact(groups):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, stride=2, groups=groups),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )
    X, y = torch.randn(3, 2, 5, 5), torch.randn(3, 3)
    loss_fn = nn.MSELoss()
    ref = ggn(model, loss_fn, X, y)
    q = bg.KFAC(fisher_type="type-2", kfac_approx="reduce")
    kf = bg.compute(model, loss_fn, X, y, q)[q]["0"]
    assert kf.groups == groups
    torch.testing.assert_close(kf.to_dense(), _conv_block(ref, "0", groups))


def _conv_block(ref, layer, groups):
    """GGN block of a grouped conv's [W_g | b_g] per group, block-diagonal over groups."""
    names, shapes = ref["names"], ref["shapes"]
    offsets, start = {}, 0
    for n, s in zip(names, shapes):
        offsets[n] = start
        start += s.numel()
    W = shapes[names.index(f"{layer}.weight")]
    O, I = W[0], W[1:].numel()
    idx = []
    for o in range(O):
        idx += [offsets[f"{layer}.weight"] + o * I + i for i in range(I)]
        idx.append(offsets[f"{layer}.bias"] + o)
    idx = torch.tensor(idx)
    full = ref["full"][idx][:, idx]
    per = O // groups * (I + 1)
    return torch.block_diag(
        *(full[g * per : (g + 1) * per, g * per : (g + 1) * per] for g in range(groups))
    )


@pytest.mark.parametrize("groups", [1, 2])
def test_single_conv_with_mse_expand_is_exact(groups):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 4, 3, padding=1, groups=groups, padding_mode="reflect"))
    X, y = torch.randn(3, 2, 6), torch.randn(3, 4, 6)
    ref = ggn(model, nn.MSELoss(), X, y)
    q = bg.KFAC(fisher_type="type-2")
    kf = bg.compute(model, nn.MSELoss(), X, y, q)[q]["0"]
    torch.testing.assert_close(kf.to_dense(), _conv_block(ref, "0", groups))


def test_embedding_expand_is_exact_with_a_kron_b_order():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(5, 3, padding_idx=4))
    idx = torch.tensor([[0, 1, 1], [4, 2, 0]])
    y = torch.randn(2, 3, 3)
    ref = ggn(model, nn.MSELoss(), idx, y)
    kf = bg.compute(model, nn.MSELoss(), idx, y, bg.KFAC(fisher_type="type-2"))[bg.KFAC]["0"]
    assert kf.order == "A kron B" and kf.bias is None
    torch.testing.assert_close(kf.to_dense(), ref["full"])


def test_fallback_diagonal_for_norm_and_generic_layers():
    from models import CASES

    model, X, y, loss_fn = CASES["gpt"]()
    q = bg.KFAC(fisher_type="type-2")
    res = bg.compute(model, loss_fn, X, y, q, bg.DiagGGN())
    blocks = res[q]
    assert isinstance(blocks["blocks.0.ln1"], bg.DiagonalFactors)
    assert isinstance(blocks["blocks.1.attn.attn"], bg.KroneckerFactors)  # its in-projection
    assert isinstance(blocks["blocks.1.attn.attn.out_proj"], bg.KroneckerFactors)
    assert isinstance(blocks["blocks.0.attn.qkv"], bg.KroneckerFactors)
    for name, value in blocks["blocks.0.ln1"].diagonal.items():
        torch.testing.assert_close(value, res[bg.DiagGGN][name])
    covered = {p for b in blocks.values() for p in b.params}
    assert covered == {n for n, _ in model.named_parameters()}
    with pytest.raises(NotImplementedError, match="forward-only"):
        bg.compute(model, loss_fn, X, y, bg.KFAC(fisher_type="forward-only"))


def test_separate_bias_and_forward_only():
    model, X, y = mlp(5)
    loss_fn = nn.CrossEntropyLoss()
    joint = bg.compute(model, loss_fn, X, y, bg.KFAC(fisher_type="type-2"))[bg.KFAC]["0"]
    q = bg.KFAC(fisher_type="type-2", bias="separate")
    sep = bg.compute(model, loss_fn, X, y, q)[q]["0"]
    torch.testing.assert_close(sep.A, joint.A[:-1, :-1])
    torch.testing.assert_close(sep.bias_block, joint.B * joint.A[-1, -1])
    fo = bg.compute(model, loss_fn, X, y, bg.KFAC(fisher_type="forward-only"))[bg.KFAC]["2"]
    torch.testing.assert_close(fo.B, torch.eye(3))
    t2 = bg.compute(model, loss_fn, X, y, bg.KFAC(fisher_type="type-2"))[bg.KFAC]["2"]
    torch.testing.assert_close(fo.A, t2.A)  # the input side does not depend on the vectors
    with pytest.raises(ValueError, match="fisher_type"):
        bg.KFAC(fisher_type="type-1")
    with pytest.raises(ValueError, match="kfac_approx"):
        bg.KFAC(kfac_approx="mean")


@pytest.mark.parametrize("order", ["B kron A", "A kron B"])
@pytest.mark.parametrize("groups", [1, 3])
def test_kronecker_factors_linear_algebra(order, groups):
    torch.manual_seed(0)

    def spd(n):
        M = torch.randn(groups, n, n)
        return M @ M.transpose(1, 2) + 0.1 * torch.eye(n)

    A, B = spd(3), spd(2)
    kf = bg.KroneckerFactors(
        A if groups > 1 else A[0],
        B if groups > 1 else B[0],
        order,
        ("w",),
        None,
        "type-2",
        "expand",
        1.0,
        1,
    )
    dense = kf.to_dense()
    P = dense.shape[0]
    V = torch.randn(P, 4)
    torch.testing.assert_close(kf @ V, dense @ V)
    torch.testing.assert_close(kf @ V[:, 0], dense @ V[:, 0])
    damping = 0.3
    torch.testing.assert_close(
        kf.inverse(damping)(V), torch.linalg.solve(dense + damping * torch.eye(P), V)
    )
    torch.testing.assert_close(kf.logdet(damping), torch.logdet(dense + damping * torch.eye(P)))


@pytest.mark.parametrize("groups", [1, 2])
def test_single_conv_transpose_with_mse_expand_is_exact(groups):
    torch.manual_seed(0)
    model = nn.Sequential(nn.ConvTranspose1d(2, 4, 3, stride=2, padding=1, groups=groups))
    X = torch.randn(3, 2, 4)
    y = torch.randn(3, 4, 7)
    ref = ggn(model, nn.MSELoss(), X, y)
    q = bg.KFAC(fisher_type="type-2")
    kf = bg.compute(model, nn.MSELoss(), X, y, q)[q]["0"]
    assert kf.weight_perm == (1, 0, 2)
    # dense GGN over [W.permute(1, 0, 2) per group | b], block-diagonal over groups
    W = model[0].weight  # [C_in, C_out/G, K]
    C_in, Fg, _ = W.shape
    Cg = C_in // groups
    index = torch.arange(W.numel()).view(W.shape)
    blocks = []
    for g in range(groups):
        w_idx = index[g * Cg : (g + 1) * Cg].permute(1, 0, 2).reshape(Fg, -1)  # [Fg, Cg*K]
        b_idx = W.numel() + g * Fg + torch.arange(Fg)
        idx = torch.cat([w_idx, b_idx.unsqueeze(1)], 1).reshape(-1)
        blocks.append(ref["full"][idx][:, idx])
    torch.testing.assert_close(kf.to_dense(), torch.block_diag(*blocks))
