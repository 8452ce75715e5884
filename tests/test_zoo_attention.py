"""``nn.MultiheadAttention`` (torchvision's ViT, ``nn.TransformerEncoderLayer``): while
beyondgrad watches it, its packed in-projection and ``out_proj`` are Linear module calls
(``beyondgrad.rules.attention``). Float64 checks against brute-force oracles: per-sample
gradients, DiagGGN, and the KFAC blocks of both weight matrices against the dense definition
``B kron A`` built from an attention written out by hand (its own softmax, not torch's kernel).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

import beyondgrad as bg
from loops import train_losses
from oracles.curvature import diag_ggn, ggn
from oracles.first_order import reference

E, HEADS, C = 4, 2, 3


class AttentionNet(nn.Module):
    """Linear stem, one ``nn.MultiheadAttention`` (self-attention, ``key is value``, or three
    different inputs), mean over positions, Linear head. Input ``[N, L, 3]``."""

    def __init__(
        self,
        mode: str = "self",
        batch_first: bool = True,
        bias: bool = True,
        need_weights: bool = False,
        causal: bool = False,
    ):
        super().__init__()
        self.stem = nn.Linear(3, E)
        self.mha = nn.MultiheadAttention(E, HEADS, batch_first=batch_first, bias=bias)
        self.head = nn.Linear(E, C)
        self.mode, self.need_weights, self.causal = mode, need_weights, causal

    def inputs(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Query, key and value, batch first ``[N, L, E]``."""
        h = self.stem(x)
        if self.mode == "self":
            return h, h, h
        t = torch.tanh(h)
        return (h, t, t) if self.mode == "kv" else (h, t, 2 * h)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.inputs(x)
        if not self.mha.batch_first:  # [L, N, E], keeping which inputs are the same tensor
            qt = q.transpose(0, 1)
            kt = qt if k is q else k.transpose(0, 1)
            v = kt if v is k else v.transpose(0, 1)
            q, k = qt, kt
        L = x.shape[1]
        mask = torch.ones(L, L, dtype=torch.bool).triu(1) if self.causal else None
        out, weights = self.mha(q, k, v, need_weights=self.need_weights, attn_mask=mask)
        if not self.mha.batch_first:
            out = out.transpose(0, 1)
        h = out.mean(1)
        if weights is not None:  # let the returned weights reach the loss too
            h = h + weights.sum((-2, -1))[:, None]
        return self.head(h)


def case(seed: int = 0, N: int = 3, L: int = 4, **kw) -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(seed)
    model = AttentionNet(**kw).double().eval()
    g = torch.Generator().manual_seed(seed + 1)
    X = torch.randn(N, L, 3, generator=g, dtype=torch.float64)
    return model, X, torch.randint(0, C, (N,), generator=g)


CONFIGS = [
    dict(mode=m, batch_first=bf, bias=b, need_weights=nw, causal=c)
    for m, bf, b, nw, c in itertools.product(
        ("self", "kv", "all"), (True, False), (True, False), (False, True), (False, True)
    )
    if not (nw and not bf and not b)  # keep the table short: 20 of the 24 combinations
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_attention_first_order_and_diag_ggn_exact(config):
    model, X, y = case(**config)
    loss_fn = nn.CrossEntropyLoss()
    first = reference(model, loss_fn, X, y)
    diag = bg.DiagGGN(max_vectors=C)
    res = bg.compute(model, loss_fn, X, y, bg.BatchGrad(), bg.BatchL2(), diag)
    assert res.rules["mha.in_proj_weight"] == "linear"
    assert res.rules["mha.out_proj.weight"] == "linear"
    for name, value in first["BatchGrad"].items():
        torch.testing.assert_close(res[bg.BatchGrad()][name], value, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(res[bg.BatchL2()][name], first["BatchL2"][name])
    for name, value in diag_ggn(ggn(model, loss_fn, X, y)).items():
        torch.testing.assert_close(res[diag][name], value, rtol=1e-10, atol=1e-13)
    assert "forward" not in model.mha.__dict__  # the re-expression ends with the capture


# -- KFAC against the dense definition ---------------------------------------------------------
def hand_attention(model: AttentionNet, x: Tensor):
    """The network with its attention written out: ``(logits, projections, core, z)`` where
    ``projections`` are the in-projection's outputs ``[N, L, 3E]`` (one per distinct input),
    ``core`` the input of ``out_proj`` ``[N, L, E]`` and ``z`` its output."""
    mha = model.mha
    q_in, k_in, v_in = model.inputs(x)
    W, b = mha.in_proj_weight, mha.in_proj_bias
    distinct = [q_in] if model.mode == "self" else [q_in, k_in] if model.mode == "kv" else [
        q_in, k_in, v_in
    ]  # fmt: skip
    projections = [F.linear(t, W, b) for t in distinct]
    q = projections[0][..., :E]
    k = projections[min(1, len(projections) - 1)][..., E : 2 * E]
    v = projections[-1][..., 2 * E :]
    N, L, _ = q.shape
    d = E // HEADS

    def heads(t: Tensor) -> Tensor:
        return t.reshape(N, L, HEADS, d).transpose(1, 2)

    scores = heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(d)
    if model.causal:
        scores = scores.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), -math.inf)
    weights = scores.softmax(-1)
    core = (weights @ heads(v)).transpose(1, 2).reshape(N, L, E)
    z = F.linear(core, mha.out_proj.weight, mha.out_proj.bias)
    h = z.mean(1)
    if model.need_weights:
        h = h + weights.mean(1).sum((-2, -1))[:, None]
    return model.head(h), projections, core, z


def _augment(a: Tensor, bias: bool) -> Tensor:
    return torch.cat([a, torch.ones_like(a[..., :1])], -1) if bias else a


def dense_kfac(model: AttentionNet, X: Tensor, y: Tensor, approx: str) -> dict[str, Tensor]:
    """``B kron A`` of the in-projection and ``out_proj`` by the definition (type-2, mean
    cross-entropy): per in-projection call and sample, inputs ``a`` (augmented by 1 with a
    bias) and output gradients ``g = J^T s_c`` for the columns ``s_c`` of a square root of each
    sample's loss Hessian; expand: ``A = mean a a^T`` over calls, samples and positions,
    ``B = sum g g^T``; reduce: positions averaged (``a``) or summed (``g``) first."""
    logits, projections, core, z = hand_attention(model, X)
    q_in, k_in, v_in = model.inputs(X)
    ins = [q_in, k_in, v_in][: len(projections)]
    H = torch.func.hessian(lambda o: F.cross_entropy(o, y))(logits.detach())
    bias = model.mha.in_proj_bias is not None
    out = {}
    targets = [projections, [z]]
    sides = [[_augment(t.detach(), bias) for t in ins], [_augment(core.detach(), True)]]
    g_rows: list[list[list[Tensor]]] = [[[] for _ in t] for t in targets]
    for n in range(X.shape[0]):
        lam, Q = torch.linalg.eigh(H[n, :, n, :])
        S = Q * lam.clamp_min(0).sqrt()
        for c in range(S.shape[1]):
            u = torch.zeros_like(logits)
            u[n] = S[:, c]
            for side, tensors in enumerate(targets):
                grads = torch.autograd.grad(logits, tensors, u, retain_graph=True)
                for i, g in enumerate(grads):
                    g_rows[side][i].append(g[n])  # [L, O]
    for side, key in enumerate(("mha", "mha.out_proj")):
        A_parts, B = [], 0
        for a, gs in zip(sides[side], g_rows[side]):
            if approx == "expand":
                A_parts.append(a.reshape(-1, a.shape[-1]))
                B = B + sum(g.T @ g for g in gs)
            else:
                A_parts.append(a.mean(1))
                B = B + sum(torch.outer(g.sum(0), g.sum(0)) for g in gs)
        rows = torch.cat(A_parts)
        out[key] = torch.kron(B, rows.T @ rows / rows.shape[0])
    return out


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("mode", ["self", "kv", "all"])
def test_attention_kfac_blocks_match_dense_definition(mode, approx):
    model, X, y = case(mode=mode, causal=True, N=2, L=3)
    q = bg.KFAC(fisher_type="type-2", kfac_approx=approx)
    blocks = bg.compute(model, nn.CrossEntropyLoss(), X, y, q)[q]
    expected = dense_kfac(model, X, y, approx)
    for name, dense in expected.items():
        block = blocks[name]
        assert isinstance(block, bg.KroneckerFactors), (name, type(block))
        torch.testing.assert_close(block.to_dense(), dense, rtol=1e-9, atol=1e-12)
    assert set(blocks["mha"].params) == {"mha.in_proj_weight", "mha.in_proj_bias"}


def test_attention_kfac_single_token_equals_ggn_block():
    """One sample, one position: both KFAC blocks are the exact GGN blocks."""
    model, X, y = case(N=1, L=1)
    loss_fn = nn.CrossEntropyLoss()
    blocks = bg.compute(model, loss_fn, X, y, bg.KFAC(fisher_type="type-2"))[bg.KFAC]
    full = ggn(model, loss_fn, X, y)["full"]
    offsets, start = {}, 0
    for name, p in model.named_parameters():
        offsets[name] = (start, p.shape)
        start += p.numel()
    for module, weight, bias in [
        ("mha", "mha.in_proj_weight", "mha.in_proj_bias"),
        ("mha.out_proj", "mha.out_proj.weight", "mha.out_proj.bias"),
    ]:
        (w0, (O, I)), (b0, _) = offsets[weight], offsets[bias]
        # rows [O, I + 1]: the weight row-major with the bias as the last column
        index = torch.cat(
            [w0 + torch.arange(O * I).reshape(O, I), b0 + torch.arange(O)[:, None]], 1
        )
        index = index.reshape(-1)
        torch.testing.assert_close(blocks[module].to_dense(), full[index][:, index])


# -- configurations that keep the generic rule -----------------------------------------------
@pytest.mark.parametrize("kw", [dict(add_bias_kv=True), dict(kdim=3, vdim=3)])
def test_other_attention_configurations_stay_generic_and_exact(kw):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, HEADS, batch_first=True, **kw).double()
    stem, head = nn.Linear(3, E).double(), nn.Linear(E, C).double()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.mha, self.head = stem, mha, head

        def forward(self, x: Tensor) -> Tensor:
            h = self.stem(x)
            kv = x if "kdim" in kw else h
            return self.head(self.mha(h, kv, kv, need_weights=False)[0].mean(1))

    model = Net().eval()
    X = torch.randn(3, 4, 3, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    loss_fn = nn.CrossEntropyLoss()
    res = bg.compute(model, loss_fn, X, y, bg.BatchGrad())
    assert res.rules["mha.out_proj.weight"] == "generic"
    for name, value in reference(model, loss_fn, X, y)["BatchGrad"].items():
        torch.testing.assert_close(res[bg.BatchGrad()][name], value)


# -- optimizers on nn.TransformerEncoderLayer ----------------------------------------------------
class EncoderNet(nn.Module):
    def __init__(self, batch_first: bool):
        super().__init__()
        self.stem = nn.Linear(3, 8)
        self.enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=batch_first)
        self.head = nn.Linear(8, C)
        self.batch_first = batch_first

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        h = self.enc(h if self.batch_first else h.transpose(0, 1))
        return self.head((h if self.batch_first else h.transpose(0, 1)).mean(1))


@pytest.mark.parametrize("optimizer", ["KFAC", "SINGD"])
def test_kronecker_optimizers_precondition_attention(optimizer):
    """(A sequence-first encoder layer is refused: its LayerNorm and Linear layers read the
    samples on axis 1, which the fast rules do not.)"""
    torch.manual_seed(0)
    model = EncoderNet(batch_first=True)
    X, y = torch.randn(8, 5, 3), torch.randint(0, C, (8,))
    loss_fn = nn.CrossEntropyLoss()
    opt = getattr(bg.optim, optimizer)(model, loss_fn)
    for name in ("enc.self_attn.in_proj_weight", "enc.self_attn.out_proj.weight"):
        assert opt.routes[name][0] == optimizer.lower(), opt.routing()
    losses = train_losses(opt, model, loss_fn, X, y, 20)
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], losses
