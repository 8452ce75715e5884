"""Adding a quantity needs one class and no engine change (the README's examples), and the
engine's public statistics agree with the built-in quantities and with brute-force oracles."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import beyondgrad as bg
from models import CASES
from oracles.curvature import diag_ggn, ggn
from oracles.first_order import per_sample_grads


def assert_close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-12)


@dataclass(frozen=True)
class BatchL1(bg.Quantity):
    """Per-sample L1 norms of each parameter's gradient, ``[N]`` (the README's example)."""

    def reduce(self, form, ctx, out=None):
        return form.batch_grad().flatten(1).abs().sum(1)


@dataclass(frozen=True)
class GradCurvature(bg.Quantity):
    """``grad^2 * diag(GGN)`` element-wise: needs two vector kinds at once."""

    per_sample = False

    def needs(self):
        return bg.Needs(kinds=(("exact", 0), ("grad", 1)))

    def compute(self, stats, prepared=None, out=None):
        result = {}
        for name in stats.parameters:
            curv = stats.form(name, ("exact", 0))
            g = stats.gradient(name)
            result[name] = g.pow(2) * curv.sum_grad_squared()
        return result


@pytest.mark.parametrize("case", ["mlp", "gpt", "resnet"])
def test_user_quantity_per_parameter(case):
    model, X, y, loss_fn = CASES[case]()
    res = bg.compute(model, loss_fn, X, y, BatchL1(), bg.BatchL2())
    ref = per_sample_grads(model, loss_fn, X, y)
    for name, g in ref.items():
        assert_close(res[BatchL1][name], g.flatten(1).abs().sum(1))


def test_user_quantity_over_statistics():
    model, X, y, loss_fn = CASES["mlp"]()
    res = bg.compute(model, loss_fn, X, y, GradCurvature(), bg.Grad())
    diag = diag_ggn(ggn(model, loss_fn, X, y))
    for name, d in diag.items():
        assert_close(res[GradCurvature][name], res.grad[name].pow(2) * d)


def test_statistics_without_quantities_match_quantities():
    model, X, y, loss_fn = CASES["mlp"]()
    kind = ("mc", 2)
    res = bg.compute(
        model, loss_fn, X, y, vectors=[kind], generator=torch.Generator().manual_seed(3)
    )
    ref = bg.compute(
        model, loss_fn, X, y, bg.DiagGGN(mc_samples=2), generator=torch.Generator().manual_seed(3)
    )
    assert res.quantities() == []
    forms = res.stats.forms(kind)
    assert set(forms) == set(ref[bg.DiagGGN])
    for name, form in forms.items():
        assert_close(form.sum_grad_squared(), ref[bg.DiagGGN][name])
    with pytest.raises(KeyError, match="not backpropagated"):
        res.stats.form(next(iter(forms)), ("exact", 0))


def test_raw_kronecker_sums_normalize_to_kfac():
    model, X, y, loss_fn = CASES["mlp"]()
    q = bg.KFAC(fisher_type="type-2")
    res = bg.compute(model, loss_fn, X, y, q)
    stats = res.stats
    modules = [m for m in stats.modules if stats.has_kronecker(m)]
    assert modules
    for module in modules:
        raw = stats.kronecker(module, ("exact", 0))
        block = res[q][module]
        assert_close(raw.A_sum[0] / raw.count, block.A)
        assert_close(raw.B_sum[0], block.B)
        assert stats.module_parameters(module)["weight"] == block.params[0]


def test_kfac_normalizes_its_own_copy_of_the_raw_sums():
    """KFAC divides the sums in place: the statistics' own sums stay raw (recomputed when asked
    for after the quantity took them), for every Fisher type, and the factors do not share
    storage with them."""
    model, X, y, loss_fn = CASES["mlp"]()
    for fisher, kind in (("empirical", ("grad", 1)), ("type-2", ("exact", 0))):
        q = bg.KFAC(fisher_type=fisher)
        res = bg.compute(model, loss_fn, X, y, q)
        stats = res.stats
        R = stats.reduction_factor
        for module in (m for m in stats.modules if stats.has_kronecker(m)):
            raw, block = stats.kronecker(module, kind), res[q][module]
            assert raw.A_sum.data_ptr() != block.A.data_ptr()
            assert_close(raw.A_sum[0] / raw.count, block.A)
            assert_close(raw.B_sum[0] / (R if fisher == "empirical" else 1), block.B)
            assert float(raw.A_sum[0][-1, -1]) == raw.count  # the bias column's raw count
        kept = bg.KFAC(fisher_type=fisher, keep_sums=True)
        res_kept = bg.compute(model, loss_fn, X, y, kept)
        for module, block in res_kept[kept].items():  # the cached raw sums, served as they are
            raw = res_kept.stats.kronecker(module, kind)
            assert raw is res_kept.stats.kronecker(module, kind)
            assert float(raw.A_sum[0][-1, -1]) == raw.count
            assert_close(raw.A_sum[0] / raw.count, block.A)
        again = q.compute(stats)  # sums already served to a reader: KFAC works on a copy
        for module, block in again.items():
            raw = stats.kronecker(module, kind)
            assert float(raw.A_sum[0][-1, -1]) == raw.count
            assert_close(raw.A_sum[0] / raw.count, block.A)


def test_unknown_object_is_not_a_quantity():
    model, X, y, loss_fn = CASES["mlp"]()
    with pytest.raises(TypeError, match="not a beyondgrad quantity"):
        bg.compute(model, loss_fn, X, y, object())
