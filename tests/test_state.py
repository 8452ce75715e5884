"""compute() leaves nothing behind: hooks, modes, parameters and .grad."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import beyondgrad as bg
from models import CASES, call_model


def hook_counts(model: nn.Module) -> list[int]:
    return [
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in model.modules()
    ]


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


@pytest.mark.parametrize("case", ["gpt", "resnet"])
def test_leaves_model_untouched(case):
    model, X, y, loss_fn = CASES[case]()
    before, hooks, modes = (
        snapshot(model),
        hook_counts(model),
        [m.training for m in model.modules()],
    )
    bg.compute(model, loss_fn, X, y, bg.Grad(), bg.BatchGrad(), bg.Variance())
    assert hook_counts(model) == hooks
    assert [m.training for m in model.modules()] == modes
    for k, v in snapshot(model).items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())
    assert len(loss_fn._forward_hooks) == 0


def test_hooks_removed_on_exception():
    model, X, y, loss_fn = CASES["mlp"]()
    hooks = hook_counts(model)
    with pytest.raises(ValueError):
        bg.compute(model, loss_fn, X, torch.zeros(2, dtype=torch.long), bg.BatchGrad())
    assert hook_counts(model) == hooks
    Xbad = X.clone()
    Xbad[0] = float("inf")
    with pytest.raises(FloatingPointError):
        bg.compute(model, loss_fn, Xbad, y, bg.BatchGrad())
    assert hook_counts(model) == hooks and len(loss_fn._forward_hooks) == 0

    def boom(*args):
        raise KeyError("boom")

    handle = model[0].register_forward_pre_hook(boom)
    with pytest.raises(KeyError):
        bg.compute(model, loss_fn, X, y, bg.BatchGrad())
    handle.remove()
    assert hook_counts(model) == hooks and len(loss_fn._forward_hooks) == 0


def test_accumulate_grad_adds_to_dot_grad():
    model, X, y, loss_fn = CASES["mlp"]()
    res = bg.compute(model, loss_fn, X, y, bg.Grad(), accumulate_grad=True)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, res.grad[n])
    bg.compute(model, loss_fn, X, y, bg.Grad(), accumulate_grad=True)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, 2 * res.grad[n])


def test_padding_idx_gets_no_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(6, 3, padding_idx=2), nn.Flatten(), nn.Linear(9, 2)).double()
    idx = torch.tensor([[2, 1, 2], [0, 2, 5], [4, 4, 2], [2, 2, 2]])
    y = torch.randint(0, 2, (4,))
    res = bg.compute(
        model,
        nn.CrossEntropyLoss(),
        idx,
        y,
        bg.BatchGrad(),
        bg.BatchL2(),
        bg.BatchDot(),
        bg.SumGradSquared(),
    )
    from oracles.first_order import reference

    ref = reference(model, nn.CrossEntropyLoss(), idx, y)
    for key in ("BatchGrad", "BatchL2", "BatchDot", "SumGradSquared"):
        torch.testing.assert_close(res[getattr(bg, key)]["0.weight"], ref[key]["0.weight"])
    assert res[bg.BatchGrad]["0.weight"][:, 2].abs().max() == 0
    assert res[bg.BatchL2]["0.weight"][3] == 0


def test_frozen_parameters_are_skipped():
    model, X, y, loss_fn = CASES["mlp"]()
    model[0].weight.requires_grad_(False)
    res = bg.compute(model, loss_fn, X, y, bg.BatchGrad())
    assert "0.weight" not in res[bg.BatchGrad] and "0.bias" in res[bg.BatchGrad]


def test_coverage_report():
    model, X, y, loss_fn = CASES["gpt"]()
    cov = bg.coverage(model, loss_fn, X, y)
    rules = {row.parameter: row.rule for row in cov}
    assert rules["tok.weight"] == "mixed(embedding+linear)"
    assert rules["blocks.0.ln1.weight"] == "layer_norm"
    assert rules["blocks.1.attn.attn.out_proj.weight"] == "linear"  # rules.attention
    assert {r.parameter for r in cov} == {n for n, _ in model.named_parameters()}
    text = str(cov)
    assert "blocks.0.attn.qkv.weight" in text and "linear" in text
    assert cov.by_rule()["linear"] > 0


def test_unused_parameter_gets_zeros():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(3, 2)
            self.unused = nn.Linear(3, 2)

        def forward(self, x):
            return self.used(x)

    model = Unused().double()
    X, y = torch.randn(4, 3, dtype=torch.float64), torch.zeros(4, 2, dtype=torch.float64)
    res = bg.compute(model, nn.MSELoss(), X, y, bg.BatchGrad(), bg.BatchL2())
    assert res[bg.BatchGrad]["unused.weight"].shape == (4, 2, 3)
    assert res[bg.BatchL2]["unused.weight"].abs().max() == 0
    assert {r.parameter: r.rule for r in bg.coverage(model, nn.MSELoss(), X, y)}[
        "unused.weight"
    ] == "unused"


@pytest.mark.parametrize("case", ["mlp", "gpt", "rnn"])
def test_out_reuses_per_sample_memory(case):
    model, X, y, loss_fn = CASES[case]()
    first = bg.compute(model, loss_fn, X, y, bg.BatchGrad(), bg.BatchL2())
    kept = {k: v.clone() for k, v in first[bg.BatchGrad].items()}
    ptrs = {k: v.data_ptr() for k, v in first[bg.BatchGrad].items()}
    second = bg.compute(model, loss_fn, X, y, bg.BatchGrad(), bg.BatchL2(), out=first)
    for k, v in second[bg.BatchGrad].items():
        torch.testing.assert_close(v, kept[k], rtol=1e-12, atol=1e-15)
        if v.numel() > 0 and not k.endswith("bias"):
            assert v.data_ptr() == ptrs[k], k
    # a result of other shapes is ignored, not written into
    sub = bg.compute(model, loss_fn, X, y, bg.BatchGrad(), subsampling=[1], out=first)
    for k, v in sub[bg.BatchGrad].items():
        torch.testing.assert_close(v[0], kept[k][1], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_quantities_from_the_ordinary_backward_equal_compute(case, scale):
    """capture(from_backward=True) reuses loss.backward()'s layer-output gradients."""
    model, X, y, loss_fn = CASES[case]()
    qs = (bg.Grad(), bg.BatchL2(), bg.SumGradSquared(), bg.BatchDot(), bg.Variance())
    ref = bg.compute(model, loss_fn, X, y, *qs)
    model.zero_grad()
    with bg.capture(model, loss_fn, *qs, from_backward=True) as session:
        loss = loss_fn(call_model(model, X), y)
        (scale * loss).backward()
    res = session.compute(loss)
    for q in qs:
        for name, value in ref[q].items():
            torch.testing.assert_close(res[q][name], value, msg=f"{q} {name}")
    for name, p in model.named_parameters():  # the ordinary backward still filled .grad
        torch.testing.assert_close(p.grad, scale * ref.grad[name])
