"""Kronecker sums of the Linear and Embedding rules against their definitions in float64, at
sizes that take the half-triangle Gram product (``D >= SYMMETRIC_MIN``; the row threshold is
lowered to 1 so that the tests stay small) as well as the small ones: ``A_sum = sum [x; 1]
[x; 1]^T`` over the rows (or the per-sample means for "reduce"), ``B_sum = sum g g^T`` over
the vectors and rows (or the per-sample sums)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import beyondgrad as bg
from beyondgrad.rules import kronecker
from beyondgrad.rules.kronecker import SYMMETRIC_MIN, embedding_kron, gram_into, linear_kron
from oracles.curvature import ggn

BIG = SYMMETRIC_MIN + 13  # an odd size above the threshold: uneven last block


@pytest.fixture(autouse=True)
def few_rows_suffice(monkeypatch):
    monkeypatch.setattr(kronecker, "SYMMETRIC_MIN_ROWS", 1)


@pytest.mark.parametrize("rows", [37, 300])
@pytest.mark.parametrize("D", [3, SYMMETRIC_MIN - 1, SYMMETRIC_MIN, BIG, 2 * SYMMETRIC_MIN + 1])
def test_gram_into_equals_the_product(D, rows, monkeypatch):
    monkeypatch.setattr(kronecker, "SYMMETRIC_MIN_ROWS", 256)  # 37 rows: one product; 300: blocks
    gen = torch.Generator().manual_seed(D)
    X = torch.randn(rows, D, dtype=torch.float64, generator=gen)
    out = torch.full((D + 2, D + 2), float("nan"), dtype=torch.float64)
    res = gram_into(out[1 : D + 1, 1 : D + 1], X)  # a strided view, as in the bias block
    torch.testing.assert_close(res, X.T @ X, rtol=1e-12, atol=1e-12)
    assert out[0].isnan().all() and out[:, -1].isnan().all()  # nothing written outside


@pytest.mark.parametrize("D", [3, SYMMETRIC_MIN, BIG, 2 * SYMMETRIC_MIN + 1])
def test_gram_add_upper_accumulates_chunks_of_any_size(D, monkeypatch):
    """Chunks above and below the row threshold (blocks, full products) accumulated into a
    non-zero start, then mirrored: the symmetric sum, exactly symmetric."""
    monkeypatch.setattr(kronecker, "SYMMETRIC_MIN_ROWS", 256)
    gen = torch.Generator().manual_seed(D)
    start = torch.randn(D, D, dtype=torch.float64, generator=gen)
    start = start + start.T
    chunks = [torch.randn(n, D, dtype=torch.float64, generator=gen) for n in (300, 7, 256)]
    out = start.clone()
    for X in chunks:
        kronecker.gram_add_upper_(out, X)
    kronecker.mirror_upper_(out)
    expected = start + sum(X.T @ X for X in chunks)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-11)
    assert torch.equal(out, out.T)


def _definition(x, g, K, approx, bias):
    """Brute-force sums: ``x`` ``[N, S, I]``, ``g`` ``[K, N, S, O]``."""
    N, S, _ = x.shape
    if approx == "reduce":
        x, g = x.mean(1, keepdim=True), g.sum(2, keepdim=True)
    a = x.reshape(-1, x.shape[-1])
    if bias:
        a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], 1)
    A = sum(torch.outer(r, r) for r in a)
    B = sum(torch.outer(r, r) for r in g.reshape(-1, g.shape[-1]))
    return A, (N * S if approx == "expand" else N), B


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("sizes", [(BIG, 4), (5, BIG), (7, 6)])
def test_linear_kron_sums_match_the_definition(sizes, bias, approx):
    I, O = sizes
    N, S, K = 3, 4, 2
    gen = torch.Generator().manual_seed(I + O)
    layer = nn.Linear(I, O, bias=bias).double()
    x = torch.randn(N, S, I, dtype=torch.float64, generator=gen)
    g = torch.randn(K, N, S, O, dtype=torch.float64, generator=gen)
    stats = linear_kron(layer, x, g.reshape(K * N, S, O), K, approx)
    A, count, B = _definition(x, g, K, approx, bias)
    assert stats.A_sum.shape == (1, I + bias, I + bias) and stats.count == count
    torch.testing.assert_close(stats.A_sum[0], A)
    torch.testing.assert_close(stats.B_sum[0], B)


def _joint_block(ref, offset, I, O):
    """The reference GGN block of ``[W | b]`` (weight ``[O, I]`` at ``offset``, then the bias)
    in the order of the joint Kronecker block: per output row its weights, then its bias."""
    rows = [[*range(offset + o * I, offset + (o + 1) * I), offset + O * I + o] for o in range(O)]
    idx = torch.tensor([i for r in rows for i in r])
    return ref[idx][:, idx]


def test_deep_linear_type2_kfac_is_the_ggn_block_at_large_sizes():
    """A deep linear net with MSE (KFAC type-2 is exact) whose hidden width takes the
    half-triangle Gram on both sides: the first layer's ``B``, the second layer's ``A``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, BIG), nn.Linear(BIG, 2)).double()
    X, y = torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    ref = ggn(model, nn.MSELoss(), X, y)["full"]
    kf = bg.compute(model, nn.MSELoss(), X, y, bg.KFAC(fisher_type="type-2"))[bg.KFAC]
    torch.testing.assert_close(kf["0"].to_dense(), _joint_block(ref, 0, 2, BIG))
    torch.testing.assert_close(kf["1"].to_dense(), _joint_block(ref, 3 * BIG, BIG, 2))


@pytest.mark.parametrize("padding_idx", [None, 2])
def test_embedding_count_and_sums(padding_idx):
    emb = nn.Embedding(6, 3, padding_idx=padding_idx).double()
    idx = torch.tensor([[0, 2, 2, 5], [2, 1, 0, 0]])
    g = torch.randn(1, 2, 4, 3, dtype=torch.float64)
    stats = embedding_kron(emb, idx, g.reshape(2, 4, 3), 1, "expand")
    keep = torch.ones_like(idx, dtype=torch.bool) if padding_idx is None else idx != padding_idx
    assert stats.count == int(keep.sum())
    counts = torch.bincount(idx[keep], minlength=6).double()
    torch.testing.assert_close(stats.A_sum[0], torch.diag(counts))
    rows = g[0][keep]
    torch.testing.assert_close(stats.B_sum[0], rows.T @ rows)


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("chunk", [1, 7, 1 << 21])
def test_conv_output_gram_by_batched_products_matches_the_definition(groups, chunk, monkeypatch):
    """The conv rule's ``B_sum`` by per-sample batched products (forced here: the position
    threshold lowered to 1, chunks of 1, 7 or all samples) equals ``sum g g^T`` over vectors,
    samples and positions, per group (float64)."""
    monkeypatch.setattr(kronecker, "CHANNEL_GRAM_MIN_POSITIONS", 1)
    monkeypatch.setattr(kronecker, "CHANNEL_GRAM_CHUNK", chunk * 36)  # F = 6 per group: F^2 = 36
    gen = torch.Generator().manual_seed(groups)
    conv = nn.Conv2d(4, 6 * groups, 3, groups=groups).double()
    x = torch.randn(5, 4, 7, 7, dtype=torch.float64, generator=gen)
    K = 3
    g = torch.randn(K * 5, 6 * groups, 5, 5, dtype=torch.float64, generator=gen)
    stats = kronecker.conv_kron(conv, x, g, K, "expand")
    rows = g.reshape(K * 5, groups, 6, 25).permute(1, 0, 3, 2).reshape(groups, -1, 6)
    expected = torch.einsum("gri,grj->gij", rows, rows)
    torch.testing.assert_close(stats.B_sum, expected, rtol=1e-12, atol=1e-12)
    monkeypatch.setattr(kronecker, "CHANNEL_GRAM_MIN_POSITIONS", 10**9)  # the transposed copy
    torch.testing.assert_close(kronecker.conv_kron(conv, x, g, K, "expand").B_sum, expected)


def test_conv_type2_kfac_is_unchanged_by_the_batched_output_gram(monkeypatch):
    """Type-2 KFAC of a small CNN with every conv's output Gram by batched products equals the
    one by the transposed copy (float64)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Conv2d(4, 3, 3, padding=1), nn.Flatten(),
        nn.Linear(3 * 6 * 6, 4),
    ).double()  # fmt: skip
    X, y = torch.randn(6, 2, 8, 8, dtype=torch.float64), torch.randint(0, 4, (6,))
    loss_fn = nn.CrossEntropyLoss()
    q = bg.KFAC(fisher_type="type-2")
    monkeypatch.setattr(kronecker, "CHANNEL_GRAM_MIN_POSITIONS", 10**9)
    ref = bg.compute(model, loss_fn, X, y, q)[q]
    monkeypatch.setattr(kronecker, "CHANNEL_GRAM_MIN_POSITIONS", 1)
    got = bg.compute(model, loss_fn, X, y, q)[q]
    assert ref.keys() == got.keys()
    for name in ref:
        torch.testing.assert_close(got[name].A, ref[name].A, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(got[name].B, ref[name].B, rtol=1e-12, atol=1e-14)


def _subnormals(t: torch.Tensor) -> int:
    a = t.abs()
    return int(((a > 0) & (a < torch.finfo(t.dtype).tiny)).sum())


def test_tiny_output_gradients_are_scaled_by_a_power_of_two_before_their_gram():
    """float32 output gradients of largest magnitude ~1e-13 (a confident classifier's): the
    Gram is formed from the gradients scaled by a power of two and scaled back. Where no
    product underflows the result is bit-identical to the plain Gram (powers of two round
    nothing); entries down to 1e-30, whose plain products are subnormal, give a product on
    normal numbers only; entries down to the subnormal range agree with float64."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Operands(TorchDispatchMode):
        seen = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func._overloadpacket in (torch.ops.aten.mm, torch.ops.aten.bmm):
                Operands.seen += sum(_subnormals(t) for t in (*args[:2], out)) + 1
            return out

    gen = torch.Generator().manual_seed(0)
    clean = (torch.rand(64, 40, generator=gen, dtype=torch.float64) + 0.5) * 1e-13
    plain = kronecker._gram(clean.float())
    assert torch.equal(kronecker._output_gram(kronecker._gram, clean.float()), plain)
    G = (clean * torch.logspace(0, -17, 40, dtype=torch.float64)).float()  # down to 1e-30
    with Operands():
        kronecker._gram(G)
    assert Operands.seen > 1  # the plain product runs through subnormal results
    Operands.seen = 0
    with Operands():
        B = kronecker._output_gram(kronecker._gram, G)
    assert Operands.seen == 1  # one product, no subnormal operand or result
    ref = G.double().T @ G.double()
    assert (B.double() - ref).norm() <= 1e-6 * ref.norm()
    G = (clean * torch.logspace(0, -32, 40, dtype=torch.float64)).float()  # down to 1e-45
    assert _subnormals(G) > 0
    B = kronecker._output_gram(kronecker._gram, G)
    ref = G.double().T @ G.double()
    assert (B.double() - ref).norm() <= 1e-6 * ref.norm()
    ordinary = torch.randn(8, 5, generator=gen, dtype=torch.float32)
    assert kronecker._output_gram(lambda t: t, ordinary) is ordinary  # no copy, no scaling
    bad = torch.full((4, 3), 1e-30, dtype=torch.float32)
    bad[0, 0] = float("nan")
    assert kronecker._output_gram(kronecker._gram, bad).isnan().any()  # left to the checks


def test_kfac_of_a_confident_classifier_in_float32_matches_float64():
    """End to end: KFAC (type-2) of a classifier whose softmax puts probabilities below
    1e-38, computed in float32 (its output-gradient Grams scaled), agrees with float64."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 5)).float()
    with torch.no_grad():
        model[2].weight.mul_(400.0)
    X, y = torch.randn(32, 6, dtype=torch.float32), torch.randint(0, 5, (32,))
    prob = model(X).softmax(1)
    assert bool(((prob > 0) & (prob < torch.finfo(prob.dtype).tiny)).any())
    q = bg.KFAC(fisher_type="type-2")
    r32 = bg.compute(model, nn.CrossEntropyLoss(), X, y, q)
    r64 = bg.compute(model.double(), nn.CrossEntropyLoss(), X.double(), y, q)
    for name in ("0", "2"):
        B32, B64 = r32[q][name].B, r64[q][name].B
        assert (B32.double() - B64).norm() <= 1e-5 * B64.norm()
