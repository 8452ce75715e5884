"""beyondgrad.conv against torch.nn.functional and autograd, in float64, over a
hypothesis-driven sweep of hyper-parameters (1-d, 2-d, 3-d; groups; simplifiable patterns)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from beyondgrad import conv
from beyondgrad.conv import einsum as ce

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def conv_case(draw, transposed=False):
    d = draw(st.integers(1, 3))
    groups = draw(st.sampled_from([1, 2]))
    c_in = groups * draw(st.integers(1, 2))
    c_out = groups * draw(st.integers(1, 2))
    K = tuple(draw(st.integers(1, 3)) for _ in range(d))
    S = tuple(draw(st.integers(1, 3)) for _ in range(d))
    D = tuple(draw(st.integers(1, 2)) for _ in range(d))
    if transposed:
        P = tuple(draw(st.integers(0, 1)) for _ in range(d))
        OP = tuple(draw(st.integers(0, max(s, dl) - 1)) for s, dl in zip(S, D))
        I = tuple(draw(st.integers(1, 4)) for _ in range(d))
        return dict(d=d, groups=groups, c_in=c_in, c_out=c_out, K=K, S=S, D=D, P=P, OP=OP, I=I)
    P = draw(
        st.sampled_from(["int", "valid", "same"] if all(s == 1 for s in S) else ["int", "valid"])
    )
    if P == "int":
        P = tuple(draw(st.integers(0, 2)) for _ in range(d))
    span = [dl * (k - 1) + 1 for k, dl in zip(K, D)]
    I = tuple(
        draw(st.integers(max(1, sp - (2 * p if isinstance(P, tuple) else 0)), sp + 4))
        for sp, p in zip(span, P if isinstance(P, tuple) else (0,) * d)
    )
    return dict(d=d, groups=groups, c_in=c_in, c_out=c_out, K=K, S=S, D=D, P=P, I=I)


def tensors(case, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, case["c_in"], *case["I"], generator=g, dtype=torch.float64)
    w = torch.randn(
        case["c_out"], case["c_in"] // case["groups"], *case["K"], generator=g, dtype=torch.float64
    )
    return x, w


def hyper(case):
    return dict(stride=case["S"], padding=case["P"], dilation=case["D"], groups=case["groups"])


@SETTINGS
@given(conv_case(), st.booleans())
def test_einsum_forward_and_vjps(case, simplify):
    x, w = tensors(case)
    xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = CONV[case["d"]](xx, ww, **hyper(case))
    gy = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (xx, ww), gy)
    kw = dict(hyper(case), simplify=simplify)
    torch.testing.assert_close(ce.forward(x, w, **kw), y.detach())
    torch.testing.assert_close(ce.input_vjp(gy, w, case["I"], **kw), gx)
    torch.testing.assert_close(ce.weight_vjp(x, gy, case["K"], **kw), gw)
    per_sample = ce.weight_vjp(x, gy, case["K"], per_sample=True, **kw)
    for n in range(2):
        xn = x[n : n + 1].clone()
        wn = w.clone().requires_grad_()
        (gwn,) = torch.autograd.grad(CONV[case["d"]](xn, wn, **hyper(case)), wn, gy[n : n + 1])
        torch.testing.assert_close(per_sample[n], gwn)


@SETTINGS
@given(conv_case(), st.booleans())
def test_unfold_fold_and_kfac_factors(case, simplify):
    x, w = tensors(case)
    h = hyper(case)
    groups = h.pop("groups")
    U = conv.unfold(x, case["K"], case["D"], case["P"], case["S"])
    # conv == W @ unfold, per group
    y = CONV[case["d"]](x, w, groups=groups, **h)
    Ug = U.reshape(2, groups, -1, U.shape[-1])
    wg = w.reshape(groups, case["c_out"] // groups, -1)
    torch.testing.assert_close(torch.einsum("gfr,ngro->ngfo", wg, Ug).reshape(y.shape), y)
    torch.testing.assert_close(ce.unfold_expression(x, case["K"], simplify=simplify, **h)(), U)
    if case["d"] == 2 and not isinstance(case["P"], str):
        torch.testing.assert_close(U, F.unfold(x, case["K"], case["D"], case["P"], case["S"]))
    # fold is the adjoint of unfold: <unfold(x), c> == <x, fold(c)>
    c = torch.randn_like(U)
    folded = conv.fold(c, case["I"], case["K"], case["D"], case["P"], case["S"])
    torch.testing.assert_close((U * c).sum(), (x * folded).sum())
    expand = torch.einsum("ngio,ngjo->gij", Ug, Ug)
    mean = Ug.mean(-1)
    reduce = torch.einsum("ngi,ngj->gij", mean, mean)
    kw = dict(h, groups=groups, simplify=simplify)
    torch.testing.assert_close(ce.kfac_expand_expression(x, case["K"], **kw)(), expand)
    torch.testing.assert_close(ce.kfac_reduce_expression(x, case["K"], **kw)(), reduce)
    kw.pop("simplify")
    torch.testing.assert_close(ce.kfac_expand(x, case["K"], **kw), expand)
    torch.testing.assert_close(ce.kfac_reduce(x, case["K"], **kw), reduce)


@SETTINGS
@given(conv_case(transposed=True))
def test_unfold_transpose(case):
    for j in range(case["d"]):
        out = (
            (case["I"][j] - 1) * case["S"][j]
            - 2 * case["P"][j]
            + case["D"][j] * (case["K"][j] - 1)
            + case["OP"][j]
            + 1
        )
        assume(out >= 1)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, case["c_in"], *case["I"], generator=g, dtype=torch.float64)
    w = torch.randn(
        case["c_in"], case["c_out"] // case["groups"], *case["K"], generator=g, dtype=torch.float64
    )
    y = CONV_T[case["d"]](
        x,
        w,
        stride=case["S"],
        padding=case["P"],
        output_padding=case["OP"],
        groups=case["groups"],
        dilation=case["D"],
    )
    U = conv.unfold_transpose(x, case["K"], case["D"], case["P"], case["S"], case["OP"])
    G = case["groups"]
    Ug = U.reshape(2, G, -1, U.shape[-1])  # [n, g, (c_in/G, k), o]
    wg = w.reshape(G, case["c_in"] // G, case["c_out"] // G, -1)  # [g, c, f, k]
    Ug = Ug.reshape(2, G, case["c_in"] // G, -1, U.shape[-1])
    out = torch.einsum("gcfk,ngcko->ngfo", wg, Ug).reshape(y.shape)
    torch.testing.assert_close(out, y)
    # the transposed pattern by its definition: o == i * s - p + k * d
    for j in range(case["d"]):
        I, K, S, P, D = (case[key][j] for key in ("I", "K", "S", "P", "D"))
        pt = conv.index_pattern(I, K, S, P, D, transposed=True, output_padding=case["OP"][j])
        k, o, i = torch.meshgrid(*(torch.arange(n) for n in pt.shape), indexing="ij")
        torch.testing.assert_close(pt, (o == i * S - P + k * D).float())


def test_index_pattern_definition_and_cache():
    p = conv.index_pattern(5, 3, stride=2, padding=1, dilation=1)
    assert p.shape == (3, 3, 5)
    for k in range(3):
        for o in range(3):
            for i in range(5):
                assert p[k, o, i] == (i == o * 2 - 1 + k)
    assert conv.index_pattern(5, 3, stride=2, padding=1) is p  # cached
    same = conv.index_pattern(6, 4, padding="same")
    assert same.shape == (4, 6, 6)
    with pytest.raises(ValueError, match="stride 1"):
        conv.index_pattern(6, 3, stride=2, padding="same")
    with pytest.raises(ValueError, match="larger than the padded input"):
        conv.index_pattern(2, 5)
    with pytest.raises(ValueError, match="output_padding"):
        conv.index_pattern(3, 2, stride=2, transposed=True, output_padding=2)


def test_trivial_patterns_simplify_to_a_matmul():
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    w = torch.randn(4, 3, 4, 4, dtype=torch.float64)
    expr = ce.forward_expression(x, w, stride=4)
    assert len(expr.operands) == 2  # no pattern operands: a reshape and a contraction
    torch.testing.assert_close(expr(), F.conv2d(x, w, stride=4))
    one = ce.weight_vjp_expression(x, torch.randn(2, 4, 8, 8, dtype=torch.float64), 1)
    assert len(one.operands) == 2
    full = ce.forward_expression(x, w, stride=4, simplify=False)
    assert len(full.operands) == 4
    assert math.isclose(float(full().sub(expr()).abs().max()), 0.0, abs_tol=1e-12)


def test_bad_arguments():
    x = torch.randn(2, 3, 5)
    with pytest.raises(ValueError, match="kernel_size needs 2"):
        conv.unfold(torch.randn(1, 1, 4, 4), (2, 2, 2))
    with pytest.raises(ValueError, match="spatial"):
        conv.unfold(torch.randn(3, 4), 2)
    with pytest.raises(ValueError, match="divisible by groups"):
        ce.forward(x, torch.randn(4, 1, 2), groups=2)
    with pytest.raises(ValueError, match="do not match"):
        conv.fold(torch.randn(1, 6, 3), (5,), 2)
