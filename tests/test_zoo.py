"""The zoo: tiny random-weight Hugging Face models (GPT-2, BERT, Llama, T5) with their default
arguments (``position_ids`` ``[1, T]``, T5's relative attention bias on ``[T, T]``, SDPA
attention), float64 oracles with ``N == T``. Skipped without ``transformers`` (the optional
``zoo`` test extra)."""

from __future__ import annotations

import pytest
import torch

import beyondgrad as bg
from oracles.curvature import batch_diag_ggn, diag_ggn, ggn
from oracles.first_order import reference

pytest.importorskip("transformers")

from zoo import FLOAT32_INSIDE, MODELS, case


def _close(actual: dict, expected: dict, what: str, loose: bool) -> None:
    assert set(actual) == set(expected), f"{what}: keys {set(actual) ^ set(expected)}"
    rtol, atol = (1e-6, 1e-9) if loose else (1e-9, 1e-12)
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, rtol=rtol, atol=atol, msg=f"{what}[{name}]")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_first_order_and_ggn_match_oracle(name):
    model, X, y, loss_fn = case(name)
    loose = name in FLOAT32_INSIDE
    first = reference(model, loss_fn, X, y)
    exact = bg.DiagGGN(max_vectors=64)
    per_sample = bg.BatchDiagGGN(max_vectors=64)
    res = bg.compute(model, loss_fn, X, y, bg.BatchGrad(), bg.BatchL2(), exact, per_sample)
    _close(res[bg.BatchGrad()], first["BatchGrad"], f"{name}/BatchGrad", loose)
    _close(res[bg.BatchL2()], first["BatchL2"], f"{name}/BatchL2", loose)
    ref = ggn(model, loss_fn, X, y)
    _close(res[exact], diag_ggn(ref), f"{name}/DiagGGN", loose)
    _close(res[per_sample], batch_diag_ggn(ref), f"{name}/BatchDiagGGN", loose)
    # the data-set operator's one-vector product (one dual forward pass where every operation
    # has a forward-mode rule) against the dense GGN
    G = bg.linops.GGN(model, loss_fn, [(X, y)])
    v = torch.linspace(-1.0, 1.0, G.shape[0], dtype=torch.float64)
    expected = ref["full"] @ v
    error = float((G @ v - expected).norm() / expected.norm())
    assert error < (1e-6 if loose else 1e-12), f"{name}: GGN @ v relative error {error:.1e}"
    assert not G._reverse_mode  # the dual pass served it (no fallback)


def test_gpt2_rules_and_kfac_routing():
    """GPT-2's Conv1D layers are served by the transposed-Linear rule (no generic rule anywhere)
    and preconditioned by the KFAC optimizer."""
    model, X, y, loss_fn = case("gpt2")
    table = bg.coverage(model, loss_fn, X, y)
    rules = {row.parameter: row.rule for row in table}
    assert "generic" not in rules.values()
    conv1d = [n for n in rules if n.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight"))]
    assert conv1d and all(rules[n] == "transposed_linear" for n in conv1d)
    opt = bg.optim.KFAC(model, loss_fn)
    assert all(opt.routes[n][0] == "kfac" for n in conv1d), opt.routing()
    with opt.capture():
        loss = loss_fn(model(X), y)
    loss.backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_cockpit_first_order_instruments(name):
    """The Cockpit reads statistics from the ordinary backward pass (``from_backward``): the
    position embeddings' per-sample pass runs when that backward starts."""
    from beyondgrad.cockpit import Cockpit

    model, X, y, loss_fn = case(name)
    N = y.shape[0]
    per = reference(model, loss_fn, X, y)["BatchGrad"]
    G = torch.cat([v.reshape(N, -1) for v in per.values()], 1) * N  # individual gradients
    cockpit = Cockpit(model, loss_fn, config=["GradNorm", "NormTest", "InnerTest", "GradHist1d"])
    with cockpit(0):
        loss = loss_fn(model(X), y)
        loss.backward()
    rec = cockpit.output()[0]
    g = G.mean(0)
    g2 = float(g @ g)
    assert rec["GradNorm"] == pytest.approx(g2**0.5, rel=1e-9)
    dev = float(((G - g) ** 2).sum())
    assert rec["NormTest"] == pytest.approx((dev / (N * (N - 1))) ** 0.5 / g2**0.5, rel=1e-8)
    # the dots read biases and norms as one matrix and the tied embedding's rows at once
    inner = float(((G @ g - g2) ** 2).sum()) / (N * (N - 1))
    assert rec["InnerTest"] == pytest.approx(inner**0.5 / g2, rel=1e-8)
    sampled = sum(min(2048, min(8, N) * v[0].numel()) for v in per.values())  # the defaults
    assert sum(rec["GradHist1d"]["counts"]) == sampled
