"""Edge cases a careful user reaches (issue 13): user hooks, samples coupled outside BatchNorm
modules, activation checkpointing, non-finite values, model state, inputs that need a clear
error. Every result is compared in float64 with a brute-force oracle, or must raise."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import beyondgrad as bg
from beyondgrad.engine import SamplesCoupledError
from oracles import curvature as curv_oracle
from oracles import first_order as fo_oracle

N = 5
DT = torch.float64


class Scale(nn.Module):
    """A layer served by the generic rule."""

    def __init__(self, d: int):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, d, dtype=DT))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.w


def data(out: int = 2) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(N, 3, generator=gen, dtype=DT), torch.randn(N, out, generator=gen, dtype=DT)


def mlp(middle: nn.Module | None = None) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(3, 4), middle if middle is not None else nn.Identity(), nn.Tanh(), nn.Linear(4, 2)
    ).to(DT)


def assert_exact(model: nn.Module, X: Tensor, y: Tensor, loss_fn: nn.Module) -> None:
    """BatchGrad, Grad and DiagGGN equal their oracles."""
    res = bg.compute(model, loss_fn, X, y, bg.BatchGrad(), bg.Grad(), bg.DiagGGN())
    per_sample = fo_oracle.per_sample_grads(model, loss_fn, X, y)
    grad = fo_oracle.autograd_grad(model, loss_fn, X, y)
    diag = curv_oracle.diag_ggn(curv_oracle.ggn(model, loss_fn, X, y))
    for name in per_sample:
        torch.testing.assert_close(res[bg.BatchGrad][name], per_sample[name])
        torch.testing.assert_close(res.grad[name], grad[name])
        torch.testing.assert_close(res[bg.DiagGGN][name], diag[name])


# -- 1. user hooks ------------------------------------------------------------------------------
def _double_output(module, args, output):
    return 2 * output


def _double_input(module, args):
    return (2 * args[0],)


def _add_input(module, args, output):
    return output + args[0]


HOOKS = {
    "forward hook on Linear": (0, "forward", _double_output, {}),
    "forward hook on Linear, prepend": (0, "forward", _double_output, {"prepend": True}),
    "pre-hook on Linear": (0, "pre", _double_input, {}),
    "forward hook on generic": (1, "forward", _double_output, {}),
    "forward hook on generic using input": (1, "forward", _add_input, {}),
    "pre-hook on generic": (1, "pre", _double_input, {}),
}


@pytest.mark.parametrize("case", list(HOOKS))
def test_user_hooks_changing_values_are_exact(case):
    index, kind, hook, kwargs = HOOKS[case]
    model = mlp(Scale(4))
    module = model[index]
    if kind == "forward":
        module.register_forward_hook(hook, **kwargs)
    else:
        module.register_forward_pre_hook(hook, **kwargs)
    X, y = data()
    assert_exact(model, X, y, nn.MSELoss())


def test_user_hook_registered_inside_capture_block():
    model, (X, y), loss_fn = mlp(), data(), nn.MSELoss()
    with bg.capture(model, loss_fn, bg.BatchGrad()) as session:
        handle = model[0].register_forward_hook(_double_output)
        loss = loss_fn(model(X), y)
    handle.remove()
    res = session.compute(loss)
    handle = model[0].register_forward_hook(_double_output)
    expected = fo_oracle.per_sample_grads(model, loss_fn, X, y)
    torch.testing.assert_close(res[bg.BatchGrad]["0.weight"], expected["0.weight"])


def test_global_hook_changing_outputs_is_refused():
    model, (X, y), loss_fn = mlp(), data(), nn.MSELoss()
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda m, a, o: 2 * o if isinstance(m, nn.Linear) else None
    )
    try:
        with pytest.raises(RuntimeError, match=r"module '0'.*forward hook"):
            bg.compute(model, loss_fn, X, y, bg.BatchGrad())
        # a global hook that changes nothing (a profiler, a logger) is fine
        handle.remove()
        handle = torch.nn.modules.module.register_module_forward_hook(lambda m, a, o: None)
        assert_exact(model, X, y, loss_fn)
    finally:
        handle.remove()


# -- 2. samples coupled outside BatchNorm modules -----------------------------------------------
class Centered(nn.Module):
    """``(x - x.mean(0)) * gain``: couples the samples inside a generic layer."""

    def __init__(self, d: int = 4):
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, d, dtype=DT))

    def forward(self, x: Tensor) -> Tensor:
        return (x - x.mean(0)) * self.gain


class FunctionalBatchNorm(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return torch.nn.functional.batch_norm(x, None, None, training=True)


class MeanCentered(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x - x.mean(0)


class ItemScaled(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x / x.std().item()


COUPLINGS = {
    "(x - x.mean(0)) * gain": Centered,
    "F.batch_norm(training=True)": FunctionalBatchNorm,
    "h - h.mean(0)": MeanCentered,
    ".item() of a batch statistic": ItemScaled,
}
ROW_QUANTITIES = [bg.BatchGrad(), bg.BatchL2(), bg.DiagGGN(), bg.DiagGGN(mc_samples=1)]


@pytest.mark.parametrize("coupling", list(COUPLINGS))
@pytest.mark.parametrize("quantity", ROW_QUANTITIES, ids=repr)
def test_samples_coupled_by_any_op_raise(coupling, quantity):
    model, (X, y) = mlp(COUPLINGS[coupling]()), data()
    with pytest.raises(SamplesCoupledError, match="couple"):
        bg.compute(model, nn.MSELoss(), X, y, quantity, bg.Grad())


@pytest.mark.parametrize("coupling", list(COUPLINGS))
@pytest.mark.parametrize(
    "extra", [(), (bg.KFAC(fisher_type="type-2"),), (bg.KFAC(fisher_type="mc"),)], ids=repr
)
def test_grad_equals_autograd_on_coupled_models(coupling, extra):
    model, (X, y), loss_fn = mlp(COUPLINGS[coupling]()), data(), nn.MSELoss()
    res = bg.compute(model, loss_fn, X, y, bg.Grad(), *extra)
    expected = fo_oracle.autograd_grad(model, loss_fn, X, y)
    for name, g in expected.items():
        torch.testing.assert_close(res.grad[name], g)


def test_functional_batch_norm_found_in_the_graph_without_probe():
    """The free graph check names the module even when the probe is skipped."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2).to(DT)

        def forward(self, x):
            return torch.nn.functional.batch_norm(self.lin(x), None, None, training=True)

    model, (X, y) = nn.Sequential(Block()), data()
    with pytest.raises(SamplesCoupledError, match="batch statistics"):
        bg.compute(model, nn.MSELoss(), X, y, bg.BatchGrad(), check_samples=False)
    loss_fn = nn.MSELoss()
    with bg.capture(model, loss_fn, bg.DiagGGN()) as session:
        loss = loss_fn(model(X), y)
    with pytest.raises(SamplesCoupledError):
        session.compute(loss)


def test_instance_norm_and_eval_batch_norm_are_not_coupling():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(2, 3, 3), nn.InstanceNorm1d(3, affine=True), nn.Flatten(), nn.Linear(9, 2)
    ).to(DT)
    X = torch.randn(N, 2, 5, dtype=DT)
    y = torch.randn(N, 2, dtype=DT)
    res = bg.compute(model, nn.MSELoss(), X, y, bg.BatchGrad())
    expected = fo_oracle.per_sample_grads(model, nn.MSELoss(), X, y)
    for name, g in expected.items():
        torch.testing.assert_close(res[bg.BatchGrad][name], g)


# -- 3. activation checkpointing ----------------------------------------------------------------
class Checkpointed(nn.Module):
    def __init__(self, reentrant: bool):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.reentrant = nn.Linear(3, 4).to(DT), nn.Linear(4, 2).to(DT), reentrant

    def forward(self, x: Tensor) -> Tensor:
        h = torch.utils.checkpoint.checkpoint(
            lambda t: torch.tanh(self.a(t)), x, use_reentrant=self.reentrant
        )
        return self.b(h)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("quantities", [(bg.Grad(),), (bg.Grad(), bg.BatchGrad())], ids=repr)
def test_reentrant_checkpoint_refused_not_zero(quantities):
    model, (X, y) = Checkpointed(reentrant=True), data()
    X.requires_grad_(True)  # torch itself gives no gradients otherwise
    with pytest.raises(RuntimeError, match="use_reentrant=False"):
        bg.compute(model, nn.MSELoss(), X, y, *quantities)


def test_non_reentrant_checkpoint_is_exact():
    model, (X, y), loss_fn = Checkpointed(reentrant=False), data(), nn.MSELoss()
    quantities = (bg.BatchGrad(), bg.Grad(), bg.DiagGGN())
    res = bg.compute(model, loss_fn, X, y, *quantities)
    plain = nn.Sequential(model.a, nn.Tanh(), model.b)  # the same parameters, no checkpoint
    ref = bg.compute(plain, loss_fn, X, y, *quantities)
    per_sample = fo_oracle.per_sample_grads(model, loss_fn, X, y)
    diag = curv_oracle.diag_ggn(curv_oracle.ggn(plain, loss_fn, X, y))
    for name, local in zip(["a.weight", "b.weight"], ["0.weight", "2.weight"]):
        torch.testing.assert_close(res[bg.BatchGrad][name], per_sample[name])
        torch.testing.assert_close(res.grad[name], ref.grad[local])
        torch.testing.assert_close(res[bg.DiagGGN][name], diag[local])


# -- 4. non-finite values -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "quantity",
    [bg.Grad(), bg.BatchGrad(), bg.BatchL2(), bg.SumGradSquared(), bg.DiagGGN(), bg.KFAC()],
    ids=repr,
)
@pytest.mark.parametrize("generic", [False, True])
def test_infinite_input_raises_like_grad(quantity, generic):
    model, (X, y) = mlp(Scale(4) if generic else None), data()
    if generic:  # the generic layer first: its own input is infinite
        model = nn.Sequential(Scale(3), *model)
    X[1, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="non-finite"):
        bg.compute(model, nn.MSELoss(), X, y, quantity)


def test_results_keyed_by_module_are_checked_by_their_parameters_rules():
    """Module-keyed results (Kronecker blocks) of fast-rule layers skip the result check (their
    inputs and output gradients are checked); anything the generic rule serves does not."""
    from beyondgrad.engine.session import _rules_by_owner, _served_generically

    def generic(name, rules):
        return _served_generically(name, rules, _rules_by_owner(rules))

    rules = {"0.weight": "linear", "0.bias": "linear", "2.scale": "generic", "4.w": "mixed"}
    assert not generic("0", rules) and not generic("0.weight", rules)
    assert generic("2", rules) and generic("2.scale", rules)
    assert generic("4", rules)
    assert generic("", rules)  # the whole model: a generic parameter in it
    assert not generic("", {"0.weight": "linear"})
    assert not generic("block", {"block.fc.weight": "linear", "block.ln.weight": "norm"})
    assert generic("block", {"block.fc.weight": "linear", "block.act.a": "generic"})
    assert generic("unknown", rules)


def test_half_precision_norms_accumulate_in_float32():
    model = nn.Linear(3, 4).half()
    with torch.no_grad():
        model.weight.fill_(1.0)
        model.bias.zero_()
    X = torch.full((2, 3), 30.0, dtype=torch.half)
    y = torch.zeros(2, 4, dtype=torch.half)
    res = bg.compute(model, nn.MSELoss(), X, y, bg.BatchGrad(), bg.BatchL2(), bg.SumGradSquared())
    rows = res[bg.BatchGrad]["weight"].float()
    assert torch.isfinite(rows).all()  # the rows fit in half precision, their squares do not
    l2 = res[bg.BatchL2]["weight"]
    assert l2.dtype == torch.float32
    torch.testing.assert_close(l2, rows.flatten(1).pow(2).sum(1))
    torch.testing.assert_close(res[bg.SumGradSquared]["weight"], rows.pow(2).sum(0))


# -- 6. model state; clear errors -----------------------------------------------------------------
def batchnorm_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).to(DT)


@pytest.mark.parametrize("quantities", [(bg.Grad(),), (bg.Grad(), bg.KFAC())], ids=repr)
def test_train_mode_leaves_batchnorm_buffers_unchanged(quantities):
    model, (X, y), loss_fn = batchnorm_model().train(), data(), nn.MSELoss()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = bg.compute(model, loss_fn, X, y, *quantities)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    # the gradient is that of the train-mode forward (batch statistics)
    expected = fo_oracle.autograd_grad(model, loss_fn, X, y)
    for name, g in expected.items():
        torch.testing.assert_close(res.grad[name], g)


@pytest.mark.parametrize(
    "subsampling", [[0.7, 1.9], torch.tensor([0.0, 1.0]), torch.tensor([True, False] * 2 + [True])]
)
def test_non_integer_subsampling_refused(subsampling):
    model, (X, y) = mlp(), data()
    with pytest.raises(TypeError, match="integer sample indices"):
        bg.compute(model, nn.MSELoss(), X, y, bg.BatchGrad(), subsampling=subsampling)


def test_compute_under_no_grad_is_exact_and_inference_mode_is_refused():
    model, (X, y), loss_fn = mlp(), data(), nn.MSELoss()
    with torch.no_grad():
        res = bg.compute(model, loss_fn, X, y, bg.BatchGrad())
    expected = fo_oracle.per_sample_grads(model, loss_fn, X, y)
    torch.testing.assert_close(res[bg.BatchGrad]["0.weight"], expected["0.weight"])
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        bg.compute(model, loss_fn, X, y, bg.BatchGrad())


def test_clear_errors_for_bad_inputs():
    model, (X, y), loss_fn = mlp(), data(), nn.MSELoss()
    with pytest.raises(ValueError, match="empty"):
        bg.compute(model, loss_fn, X[:0], y[:0], bg.BatchGrad())
    with pytest.raises(TypeError, match="y must be a tensor"):
        bg.compute(model, loss_fn, X, y.tolist(), bg.BatchGrad())
    with pytest.raises(ValueError, match="top_k"):
        bg.GGNEigen(top_k=-2)
    meta = nn.Linear(3, 2, device="meta")
    with pytest.raises(ValueError, match="meta device"):
        bg.compute(meta, loss_fn, X, y, bg.BatchGrad())
    with pytest.raises(ValueError, match="meta device"), bg.capture(meta, loss_fn, bg.BatchGrad()):
        pass


@pytest.mark.parametrize("quantity", [bg.Grad(), bg.BatchGrad()], ids=repr)
def test_all_targets_ignored(quantity):
    model, (X, _) = mlp(), data()
    y = torch.full((N,), -100)
    with pytest.raises(ValueError, match="ignore_index"):
        bg.compute(model, nn.CrossEntropyLoss(), X, y, quantity)
    # with a sum the loss is a well-defined zero
    res = bg.compute(model, nn.CrossEntropyLoss(reduction="sum"), X, y, quantity)
    assert all(bool((v == 0).all()) for v in res[quantity].values())


class WithChild(nn.Module):
    """A generic layer (own parameter) around a fast-rule child."""

    def __init__(self, d: int = 4):
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, d, dtype=DT))
        self.inner = nn.Linear(d, d).to(DT)

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x * self.scale)


def test_nested_sessions_do_not_record_each_others_replays():
    model, (X, y), loss_fn = mlp(WithChild()), data(), nn.MSELoss()
    with bg.capture(model, loss_fn, bg.BatchGrad()) as outer:
        with bg.capture(model, loss_fn, bg.BatchL2()) as inner:
            loss = loss_fn(model(X), y)
        inner_res = inner.compute(loss, retain_graph=True)  # replays WithChild, outer is live
    outer_res = outer.compute(loss)
    expected = fo_oracle.per_sample_grads(model, loss_fn, X, y)
    for name, g in expected.items():
        torch.testing.assert_close(outer_res[bg.BatchGrad][name], g)
        torch.testing.assert_close(inner_res[bg.BatchL2][name], g.flatten(1).pow(2).sum(1))
