"""The per-step preconditioning products (``beyondgrad.optim.products``) against dense
solves in float64, their cache, the fused finiteness check, the opt-in bfloat16 KFAC
preconditioner, and the legacy ``started`` rule of ``load_state_dict``."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import beyondgrad as bg
from beyondgrad.optim import KFAC, SINGD, SIRFShampoo
from beyondgrad.optim.products import (
    ProductCache,
    block_shape,
    diagonal_blocks,
    explicit_is_cheaper,
    kronecker_solve,
    make_side,
)
from beyondgrad.optim.statistics import finite_flags
from loops import train_losses

F64 = torch.float64


def _spd(n: int, g: torch.Generator, batch: int = 2) -> torch.Tensor:
    X = torch.randn(batch, 3 * n, n, generator=g, dtype=F64)
    return X.mT @ X / (3 * n) + 0.1 * torch.eye(n, dtype=F64)


def _dense_solve(L: torch.Tensor, R: torch.Tensor, M: torch.Tensor, delta: float = 0.0):
    """``(L kron R + delta I)^{-1} vec(M)`` per group (row-major ``vec``), reshaped."""
    out = []
    for Lg, Rg, Mg in zip(L, R, M):
        F = torch.kron(Lg, Rg) + delta * torch.eye(Mg.numel(), dtype=F64)
        out.append(torch.linalg.solve(F, Mg.reshape(-1)).reshape(Mg.shape))
    return torch.stack(out)


@pytest.mark.parametrize("explicit", [(True, True), (False, False), (True, False), (False, True)])
def test_kronecker_solve_with_inverse_sides_is_the_kronecker_inverse(explicit):
    """Sides ``Q diag(1/l) Q^T``, explicit or factored, solve with ``L kron R``."""
    g = torch.Generator().manual_seed(0)
    L, R = _spd(4, g), _spd(3, g)
    M = torch.randn(2, 4, 3, generator=g, dtype=F64)
    (ll, ql), (lr, qr) = torch.linalg.eigh(L), torch.linalg.eigh(R)
    left = make_side(ql, 1 / ll, explicit[0], F64)
    right = make_side(qr, 1 / lr, explicit[1], F64)
    assert left[2] is not explicit[0] and right[2] is not explicit[1]  # factored flags
    torch.testing.assert_close(kronecker_solve(M, left, right), _dense_solve(L, R, M))


def test_kronecker_solve_with_joint_values_is_the_damped_inverse():
    g = torch.Generator().manual_seed(1)
    L, R = _spd(5, g), _spd(2, g)
    M = torch.randn(2, 5, 2, generator=g, dtype=F64)
    (ll, ql), (lr, qr) = torch.linalg.eigh(L), torch.linalg.eigh(R)
    values = 1 / (ll[:, :, None] * lr[:, None, :] + 0.3)
    got = kronecker_solve(
        M, make_side(ql, None, False, F64), make_side(qr, None, False, F64), values
    )
    torch.testing.assert_close(got, _dense_solve(L, R, M, 0.3))


@pytest.mark.parametrize("explicit", [True, False])
def test_kronecker_solve_with_factors_is_f_ft_m_h_ht(explicit):
    """SINGD's and SIRFShampoo's sides: ``F F^T M H H^T``; result in ``M``'s dtype."""
    g = torch.Generator().manual_seed(2)
    Fm, H = (
        torch.randn(1, 4, 4, generator=g, dtype=F64),
        torch.randn(1, 6, 6, generator=g, dtype=F64),
    )
    M = torch.randn(1, 4, 6, generator=g, dtype=F64)
    left, right = make_side(Fm, None, explicit, F64), make_side(H, None, not explicit, F64)
    torch.testing.assert_close(kronecker_solve(M, left, right), Fm @ Fm.mT @ M @ H @ H.mT)
    f32 = make_side(Fm, None, True, torch.float32), make_side(H, None, False, torch.float32)
    low = kronecker_solve(M, *f32)
    torch.testing.assert_close(low, Fm @ Fm.mT @ M @ H @ H.mT, rtol=1e-5, atol=1e-4)
    assert low.dtype == F64 and f32[0][0].dtype == torch.float32  # computed in float32


def test_explicit_is_cheaper_compares_one_refresh_with_the_saved_products():
    assert explicit_is_cheaper(500, 1001, 1)  # a side smaller than the other: always
    assert not explicit_is_cheaper(1000, 65, 10)  # 1000^3 > 10 * 1000^2 * 65
    assert explicit_is_cheaper(1000, 65, 20)
    assert not explicit_is_cheaper(64, 64, 1)  # a tie: keep the factors


def test_product_cache_rebuilds_when_a_source_changes():
    cache, builds = ProductCache(), []
    K = torch.eye(3, dtype=torch.float32)

    def get(tensor, settings=0):
        return cache.get("layer", [tensor], settings, lambda: builds.append(1) or tensor * 2)

    first = get(K)
    assert get(K) is first and len(builds) == 1  # reused
    K.add_(1.0)  # written in place: rebuilt
    torch.testing.assert_close(get(K), (torch.eye(3, dtype=torch.float32) + 1) * 2)
    assert len(builds) == 2
    assert get(K, settings=1) is not None and len(builds) == 3  # other settings
    assert get(K.clone(), settings=1) is not None and len(builds) == 4  # another tensor
    assert cache.nbytes() == 9 * 4
    cache.end_step()  # used this step: kept
    assert cache.nbytes() == 36
    cache.end_step()  # not used since: dropped
    assert cache.nbytes() == 0


def test_finite_flags_find_nan_and_both_infinities():
    tensors = [torch.zeros(3, 3) for _ in range(4)] + [torch.zeros(0), torch.tensor(2.0)]
    tensors[1][1, 2] = float("nan")
    tensors[2][0, 0] = float("inf")
    tensors[3][2, 1] = -float("inf")
    assert finite_flags(tensors).tolist() == [True, False, False, False, True, True]
    assert finite_flags([torch.ones(2, dtype=torch.bfloat16)]).tolist() == [True]


def _pi_reference(block, damping):
    pi = (torch.diagonal(block.A).mean() / torch.diagonal(block.B).mean()).sqrt()
    return torch.kron(
        block.B + damping**0.5 / pi * torch.eye(block.B.shape[0], dtype=F64),
        block.A + pi * damping**0.5 * torch.eye(block.A.shape[0], dtype=F64),
    )


def _one_type2_kfac_step(hidden: int, n: int, **kwargs):
    """One step of ``KFAC(type-2, momentum 0, no KL clip, **kwargs)`` on ``2 -> hidden -> 3``
    (float64, ``n`` samples): ``(model, optimizer, {layer: the engine's KFAC block},
    {layer: [O, I + 1] gradient with the bias last}, parameters before the step)``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, hidden), nn.Tanh(), nn.Linear(hidden, 3)).double()
    g = torch.Generator().manual_seed(3)
    X, y = torch.randn(n, 2, generator=g, dtype=F64), torch.randint(0, 3, (n,), generator=g)
    loss_fn, quantity = nn.CrossEntropyLoss(), bg.KFAC(fisher_type="type-2")
    res = bg.compute(model, loss_fn, X, y, bg.Grad(), quantity)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    opt = KFAC(model, loss_fn, momentum=0.0, fisher_type="type-2", kl_clip=None, **kwargs)
    opt.zero_grad()
    with opt.capture():
        loss = loss_fn(model(X), y)
    loss.backward()
    opt.step()
    blocks = {k: res[quantity][k] for k in ("0", "2")}
    grads = {
        k: torch.cat([res.grad[f"{k}.weight"], res.grad[f"{k}.bias"][:, None]], 1)
        for k in ("0", "2")
    }
    return model, opt, blocks, grads, before


@pytest.mark.parametrize("refresh_every", [1, 30])
def test_kfac_pi_damping_with_explicit_and_factored_sides_is_exact(refresh_every):
    """A layer 2 -> 12: with refresh_every=1 the 12-side stays factored (12 >= 1 * 3) and the
    3-side is explicit; with 30 both are explicit. The step is the pi-damped solve."""
    lr, damping = 0.2, 0.04
    model, _, blocks, grads, before = _one_type2_kfac_step(
        12, 9, lr=lr, damping=damping, damping_mode="pi", refresh_every=refresh_every
    )
    for name in ("0", "2"):
        block, grad = blocks[name], grads[name]
        step = -lr * torch.linalg.solve(_pi_reference(block, damping), grad.reshape(-1))
        step = step.reshape(grad.shape)
        params = dict(model.named_parameters())
        torch.testing.assert_close(
            params[f"{name}.weight"] - before[f"{name}.weight"], step[:, :-1]
        )
        torch.testing.assert_close(params[f"{name}.bias"] - before[f"{name}.bias"], step[:, -1])


@pytest.mark.parametrize("mode", ["eigen", "pi"])
def test_kfac_bfloat16_preconditioner_approximates_the_exact_step(mode):
    """``preconditioner_dtype=torch.bfloat16`` applies the prepared preconditioner in
    bfloat16: the step is the float64 one to about 2-3 significant digits; the factors and
    eigenpairs stay in the parameters' dtype."""
    g = torch.Generator().manual_seed(5)
    X, y = torch.randn(32, 6, generator=g, dtype=F64), torch.randint(0, 4, (32,), generator=g)
    steps = {}
    for dtype in (None, torch.bfloat16):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4)).double()
        before = [p.detach().clone() for p in model.parameters()]
        loss_fn = nn.CrossEntropyLoss()
        opt = KFAC(model, loss_fn, lr=0.1, momentum=0.0, kl_clip=None,
                   damping_mode=mode, preconditioner_dtype=dtype)  # fmt: skip
        opt.zero_grad()
        with opt.capture():
            loss = loss_fn(model(X), y)
        loss.backward()
        opt.step()
        steps[dtype] = torch.cat([(p - b).reshape(-1) for p, b in zip(model.parameters(), before)])
        assert opt.layers["0"]["A"].dtype == F64 and opt.layers["0"]["eig"][1].dtype == F64
    exact, low = steps[None], steps[torch.bfloat16]
    error = torch.linalg.vector_norm(low - exact) / torch.linalg.vector_norm(exact)
    assert 0 < error < 2e-2
    with pytest.raises(ValueError, match="preconditioner_dtype"):
        KFAC(nn.Linear(2, 2), nn.MSELoss(), preconditioner_dtype=torch.int32)


def test_singd_step_follows_factors_written_in_place():
    """The prepared ``C C^T`` / ``K K^T`` are rebuilt when the factors change between
    refreshes (here written by hand): the step is ``C C^T G K K^T`` of the current factors."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 5)).double()
    g = torch.Generator().manual_seed(4)
    X, y = torch.randn(8, 3, generator=g, dtype=F64), torch.randint(0, 5, (8,), generator=g)
    loss_fn = nn.CrossEntropyLoss()
    opt = SINGD(model, loss_fn, lr=0.1, momentum=0.0, refresh_every=100, grafting=None, warmup=0)
    for scale in (1.0, 1.0, 1.5):
        state = opt.layers["0"]
        state["K"].mul_(scale)
        K, C = state["K"].clone(), state["C"].clone()
        before = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        with opt.capture():
            loss = loss_fn(model(X), y)
        loss.backward()
        G = torch.cat([model[0].weight.grad, model[0].bias.grad[:, None]], 1)
        opt.step()
        if opt.steps > 1:  # no refresh: the factors are the ones set above
            D = C @ C.T @ G @ K @ K.T
            torch.testing.assert_close(model[0].weight - before[0], -0.1 * D[:, :-1])
            torch.testing.assert_close(model[0].bias - before[1], -0.1 * D[:, -1])


def _drop_started(sd):
    sd = {**sd, "beyondgrad": dict(sd["beyondgrad"])}
    layers = sd["beyondgrad"]["layers"] = {
        n: {k: v for k, v in s.items() if k != "started"}
        for n, s in sd["beyondgrad"]["layers"].items()
    }
    assert layers
    return sd


@pytest.mark.parametrize("kind", ["singd", "sirf"])
def test_a_state_saved_before_the_warm_start_counts_as_started_once_stepped(kind):
    """``CurvatureOptimizer.load_state_dict``: a layer saved without ``started`` is started
    when the saved run has stepped (no second warm start), else keeps its current flag."""
    loss_fn = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(0)
    X, y = (
        torch.randn(8, 4, generator=g, dtype=torch.float32),
        torch.randint(0, 3, (8,), generator=g),
    )

    def make():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 3)).float()
        if kind == "singd":
            return model, SINGD(model, loss_fn, warm_start=True)
        return model, SIRFShampoo(model, warm_start=True)

    model, opt = make()
    fresh_sd = _drop_started(opt.state_dict())
    opt.zero_grad()
    with opt.capture():
        loss = loss_fn(model(X), y)
    loss.backward()
    opt.step()
    assert all(s["started"] for s in opt.layers.values())
    stepped_sd = _drop_started(opt.state_dict())
    _, other = make()
    assert not any(s["started"] for s in other.layers.values())
    other.load_state_dict(stepped_sd)
    assert all(s["started"] is True for s in other.layers.values())
    _, other = make()
    other.load_state_dict(fresh_sd)
    assert not any(s["started"] for s in other.layers.values())


def _block_diagonal(M: torch.Tensor, max_block: int) -> torch.Tensor:
    """The block-diagonal part of ``M`` ``[G, d, d]`` with the blocks of ``diagonal_blocks``."""
    d = M.shape[-1]
    n, b = block_shape(d, max_block)
    out = torch.zeros_like(M)
    for i in range(n):
        out[:, i * b : (i + 1) * b, i * b : (i + 1) * b] = M[
            :, i * b : (i + 1) * b, i * b : (i + 1) * b
        ]
    return out


def test_diagonal_blocks_pad_the_last_block_with_the_identity():
    g = torch.Generator().manual_seed(6)
    M = _spd(7, g)
    assert block_shape(7, 3) == (3, 3) and block_shape(513, 256) == (3, 171)
    assert block_shape(6, 3) == (2, 3) and block_shape(3, 8) == (1, 3)
    blocks = diagonal_blocks(M, 3)
    assert blocks.shape == (2, 3, 3, 3)
    torch.testing.assert_close(blocks[:, 1], M[:, 3:6, 3:6])
    torch.testing.assert_close(blocks[:, 2, 0, 0], M[:, 6, 6])
    torch.testing.assert_close(blocks[:, 2, 1:, 1:], torch.eye(2, dtype=F64).expand(2, 2, 2))
    assert bool((blocks[:, 2, 0, 1:] == 0).all())


@pytest.mark.parametrize("explicit", [(True, False), (False, True)])
def test_kronecker_solve_with_block_diagonal_sides_is_the_block_diagonal_inverse(explicit):
    """Sides of 7 (blocks of at most 3: 3 + 3 + 1 padded) and 5 (one dense side, or blocks of
    at most 2), explicit or factored, and with joint values: the solve with the
    block-diagonal factors, sizes unpadded."""
    g = torch.Generator().manual_seed(7)
    L, R = _spd(7, g), _spd(5, g)
    M = torch.randn(2, 7, 5, generator=g, dtype=F64)
    for right_block in (None, 2):
        Lb = diagonal_blocks(L, 3)
        Rb = R if right_block is None else diagonal_blocks(R, right_block)
        R_ref = R if right_block is None else _block_diagonal(R, right_block)
        (ll, ql), (lr, qr) = torch.linalg.eigh(Lb), torch.linalg.eigh(Rb)
        left = make_side(ql, 1 / ll, explicit[0], F64)
        right = make_side(qr, 1 / lr, explicit[1], F64)
        expected = _dense_solve(_block_diagonal(L, 3), R_ref, M)
        torch.testing.assert_close(kronecker_solve(M, left, right), expected)
        values = 1 / (ll.flatten(-2)[:, :, None] * lr.reshape(2, -1)[:, None, :] + 0.3)
        left, right = make_side(ql, None, False, F64), make_side(qr, None, False, F64)
        torch.testing.assert_close(
            kronecker_solve(M, left, right, values),
            _dense_solve(_block_diagonal(L, 3), R_ref, M, 0.3),
        )


@pytest.mark.parametrize("mode", ["eigen", "pi"])
def test_kfac_max_block_is_the_block_diagonal_solve(mode):
    """``max_block=4`` on a layer 2 -> 9 (A 3 x 3 whole, B 9 x 9 as three 3 x 3 blocks) and
    9 -> 3 (A 10 x 10 as three blocks of 4, padded): the step is the damped solve with the
    block-diagonal factors; pi comes from the whole factors' traces."""
    lr, damping = 0.2, 0.04
    model, opt, blocks, grads, before = _one_type2_kfac_step(
        9, 11, lr=lr, damping=damping, damping_mode=mode, max_block=4
    )
    assert opt.layers["0"]["eig"][1].shape == (1, 3, 3, 3)  # B: three blocks of 3
    assert opt.layers["2"]["eig"][3].shape == (1, 3, 4, 4)  # A: 10 -> blocks of 4, padded
    params = dict(model.named_parameters())
    for name in ("0", "2"):
        block, grad = blocks[name], grads[name]
        A, B = block.A[None], block.B[None]
        if mode == "pi":
            pi = (torch.diagonal(block.A).mean() / torch.diagonal(block.B).mean()).sqrt()
            A = A + pi * damping**0.5 * torch.eye(A.shape[-1], dtype=F64)
            B = B + damping**0.5 / pi * torch.eye(B.shape[-1], dtype=F64)
        A = _block_diagonal(A, 4) if A.shape[-1] > 4 else A
        B = _block_diagonal(B, 4) if B.shape[-1] > 4 else B
        delta = damping if mode == "eigen" else 0.0
        step = -lr * _dense_solve(B, A, grad[None], delta)[0]
        torch.testing.assert_close(
            params[f"{name}.weight"] - before[f"{name}.weight"], step[:, :-1]
        )
        torch.testing.assert_close(params[f"{name}.bias"] - before[f"{name}.bias"], step[:, -1])
    with pytest.raises(ValueError, match="max_block"):
        KFAC(model, nn.CrossEntropyLoss(), max_block=0)


@pytest.mark.parametrize("grafting", [None, "adam"])
def test_batched_updates_equal_the_per_parameter_ones(grafting):
    """``descend_many_`` and ``adamw_many_`` (``torch._foreach``) give bit for bit the
    per-parameter updates written with plain operations, over three steps: weight decay,
    momentum (first buffers created, then updated; Adam grafting's first moment), mixed step
    counts."""
    from beyondgrad.optim.fallback import adamw_many_, fallback_lr
    from beyondgrad.optim.update import descend_many_

    def descend_(p, direction, group, state, lr_scale):  # one parameter, plain ops
        lr, wd, mu = group["lr"] * lr_scale, group["weight_decay"], group["momentum"]
        p.mul_(1 - lr * wd)
        direction = direction * (1 - mu) if group["grafting"] == "adam" else direction
        if "momentum_buffer" in state:
            state["momentum_buffer"].mul_(mu).add_(direction)
        else:
            state["momentum_buffer"] = direction.clone()
        p.add_(state["momentum_buffer"], alpha=-lr)

    def adamw_(p, grad, group, state, lr_scale):  # one parameter, plain ops
        lr, (beta1, beta2) = fallback_lr(group) * lr_scale, group["adam_betas"]
        if "exp_avg" not in state:
            state.update(adam_step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
        state["adam_step"] = t = state["adam_step"] + 1
        state["exp_avg"].lerp_(grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (state["exp_avg_sq"] / (1 - beta2**t)).sqrt_().add_(group["adam_eps"])
        p.mul_(1 - lr * group["weight_decay"])
        p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1**t))

    g = torch.Generator().manual_seed(8)
    shapes = [(3, 4), (5,), (2, 2, 2)]
    group = {"lr": 0.3, "weight_decay": 0.1, "momentum": 0.9, "grafting": grafting,
             "adam_lr": 0.01, "adam_betas": (0.9, 0.99), "adam_eps": 1e-8}  # fmt: skip
    ps = [torch.randn(s, generator=g, dtype=F64) for s in shapes]
    qs = [p.clone() for p in ps]
    one: list[dict] = [{} for _ in ps]
    many: list[dict] = [{} for _ in ps]
    for state in (one[2], many[2]):  # a parameter at another step count
        state["adam_step"] = 5
        state["exp_avg"] = torch.full(shapes[2], 0.1, dtype=F64)
        state["exp_avg_sq"] = torch.full(shapes[2], 0.2, dtype=F64)
    for _ in range(3):
        ds = [torch.randn(s, generator=g, dtype=F64) for s in shapes]
        for p, d, st in zip(ps, ds, one):
            descend_(p, d, group, st, 0.5)
        descend_many_(qs, ds, group, many, 0.5)
        for p, q in zip(ps, qs):
            p.grad, q.grad = ds[0].new_ones(p.shape) * 0.3, ds[0].new_ones(q.shape) * 0.3
        fallback_one = [{**st} for st in one]
        for p, st in zip(ps, fallback_one):
            adamw_(p, p.grad, group, st, 0.5)
        fallback_many = [{**st} for st in many]
        adamw_many_(qs, group, fallback_many, 0.5)
        for st, new in zip(one, fallback_one):
            st.update(new)
        for st, new in zip(many, fallback_many):
            st.update(new)
        for p, q in zip(ps, qs):
            assert torch.equal(p, q)
        for a, b in zip(one, many):
            assert a.keys() == b.keys() and a["adam_step"] == b["adam_step"]
            for k in ("momentum_buffer", "exp_avg", "exp_avg_sq"):
                assert torch.equal(a[k], b[k]), k


class _MaskedKFAC(KFAC):
    """KFAC whose factors are replaced by their block-diagonal parts (as whole matrices, the
    other entries zero) before the refresh: the reference of ``max_block``."""

    block = 4

    def _decompose_stacked(self, A, B, order, damping):
        return super()._decompose_stacked(self._mask(A), self._mask(B), order, damping)

    @classmethod
    def _mask(cls, M):
        if M.shape[-1] <= cls.block:
            return M
        n, b = block_shape(M.shape[-1], cls.block)
        keep = torch.zeros(M.shape[-2:], dtype=torch.bool)
        for i in range(n):
            keep[i * b : (i + 1) * b, i * b : (i + 1) * b] = True
        return torch.where(keep, M, torch.zeros((), dtype=M.dtype))


class _TokensConv(nn.Module):
    """Embedding (factors in ``A kron B`` order) -> grouped Conv1d -> Linear."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.conv = nn.Conv1d(6, 6, 3, padding=1, groups=2)
        self.out = nn.Linear(6 * 5, 4)

    def forward(self, x):
        return self.out(torch.tanh(self.conv(self.emb(x).transpose(1, 2))).flatten(1))


@pytest.mark.parametrize("mode", ["eigen", "pi"])
def test_kfac_max_block_on_embeddings_and_grouped_convolutions(mode):
    """Three steps with ``max_block=4`` equal KFAC on the factors' block-diagonal parts for an
    embedding (``A kron B``: a 10-wide input side), a grouped convolution (per group 3 x 3 + 1
    = 10) and a linear layer (31 -> 4 and 4 -> 1 blocks, padded)."""
    g = torch.Generator().manual_seed(9)
    X, y = torch.randint(0, 10, (12, 5), generator=g), torch.randint(0, 4, (12,), generator=g)
    finals = []
    for make, extra in ((KFAC, {"max_block": 4}), (_MaskedKFAC, {})):
        torch.manual_seed(0)
        model, loss_fn = _TokensConv().double(), nn.CrossEntropyLoss()
        opt = make(model, loss_fn, lr=0.1, fisher_type="type-2", kl_clip=None,
                   damping_mode=mode, refresh_every=1, **extra)  # fmt: skip
        assert set(opt.layers) == {"emb", "conv", "out"}
        for _ in range(3):
            opt.zero_grad()
            with opt.capture():
                loss = loss_fn(model(X), y)
            loss.backward()
            opt.step()
        finals.append([p.detach().clone() for p in model.parameters()])
    assert opt.layers["emb"]["order"] == "A kron B"
    for blocked, masked in zip(*finals, strict=True):
        torch.testing.assert_close(blocked, masked)


def test_a_blocked_kfac_state_loads_into_kfac_without_blocks():
    """A state saved with ``max_block=4`` loads into ``KFAC()`` (no blocks): the step solves
    with the saved blocks (the same step as the saving optimizer's) until the next refresh,
    which decomposes the whole factors."""
    g = torch.Generator().manual_seed(10)
    X, y = torch.randn(16, 3, generator=g, dtype=F64), torch.randint(0, 2, (16,), generator=g)
    loss_fn = nn.CrossEntropyLoss()

    def run(opt, model, steps):
        train_losses(opt, model, loss_fn, X, y, steps)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 9), nn.Tanh(), nn.Linear(9, 2)).double()
    saving = KFAC(model, loss_fn, max_block=4, refresh_every=5, kl_clip=None)
    run(saving, model, 2)
    state = copy.deepcopy(saving.state_dict())  # the live tensors change in place
    start = {k: v.clone() for k, v in model.state_dict().items()}
    run(saving, model, 1)
    expected = [p.detach().clone() for p in model.parameters()]
    model.load_state_dict(start)
    loading = KFAC(model, loss_fn, refresh_every=5, kl_clip=None)
    loading.load_state_dict(state)
    run(loading, model, 1)  # step 2: no refresh due, the saved blocks solve
    assert loading.layers["0"]["eig"][1].shape == (1, 3, 3, 3)
    for p, q in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p, q)
    run(loading, model, 3)  # step 5 refreshes: whole factors
    assert loading.layers["0"]["eig"][1].shape == (1, 9, 9)
