"""ViViT (GGNEigen): eigenpairs, directional derivatives and Newton steps against the dense
float64 GGN."""

from __future__ import annotations

import pytest
import torch

import beyondgrad as bg
from models import CASES
from oracles.curvature import ggn
from oracles.first_order import per_sample_grads


def flat(d: dict, names) -> torch.Tensor:
    return torch.cat([d[n].reshape(d[n].shape[0], -1) for n in names], 1)


@pytest.mark.parametrize("case", ["mlp", "gpt", "resnet", "seq_linear", "dict_inputs"])
def test_eigenpairs_and_directional_derivatives(case):
    model, X, y, loss_fn = CASES[case]()
    ref = ggn(model, loss_fn, X, y)
    names = ref["names"]
    res = bg.compute(model, loss_fn, X, y, bg.GGNEigen())[bg.GGNEigen]["model"]
    dense = ref["full"]
    expected = torch.linalg.eigvalsh(dense).flip(0)
    k = res.eigenvalues.numel()
    torch.testing.assert_close(res.eigenvalues, expected[:k], rtol=1e-8, atol=1e-10)
    assert expected[k:].abs().max() < 1e-8 * expected[0]  # every nonzero eigenvalue found
    assert not res.eigenvalues.requires_grad
    # eigenvectors of eigenvalues near round-off are ill-conditioned: check the others
    k = int((res.eigenvalues > 1e-6 * res.eigenvalues[0]).sum())
    res.eigenvalues = res.eigenvalues[:k]
    res.eigenvectors = {n: v[:k] for n, v in res.eigenvectors.items()}
    res.first_derivatives = res.first_derivatives[:, :k]
    res.second_derivatives = res.second_derivatives[:, :k]
    E = flat(res.eigenvectors, names)  # [k, P]
    torch.testing.assert_close(E @ dense, res.eigenvalues[:, None] * E, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(E @ E.T, torch.eye(k, dtype=E.dtype), rtol=1e-7, atol=1e-7)
    grads = flat(per_sample_grads(model, loss_fn, X, y), names)  # [N, P]
    torch.testing.assert_close(res.first_derivatives, grads @ E.T, rtol=1e-7, atol=1e-10)
    second = torch.einsum("kp,npq,kq->nk", E, ref["per_sample"], E)
    torch.testing.assert_close(res.second_derivatives, second, rtol=1e-7, atol=1e-10)
    damping = 0.1
    step = flat({n: v.unsqueeze(0) for n, v in res.newton_step(damping).items()}, names)[0]
    g = grads.sum(0)
    expected_step = -((E @ g) / (res.eigenvalues + damping)) @ E
    torch.testing.assert_close(step, expected_step, rtol=1e-7, atol=1e-10)


def test_top_k_groups_subsampling_and_mc():
    model, X, y, loss_fn = CASES["mlp"]()
    ref = ggn(model, loss_fn, X, y)
    q = bg.GGNEigen(top_k=3, param_groups=(("0.weight", "0.bias"), ("4.weight",)))
    res = bg.compute(model, loss_fn, X, y, q)[q]
    assert set(res) == {"group0", "group1"}
    names = ref["names"]
    idx = next(i for i, n in enumerate(names) if n == "4.weight")
    start = sum(ref["shapes"][i].numel() for i in range(idx))
    size = ref["shapes"][idx].numel()
    block = ref["full"][start : start + size, start : start + size]
    torch.testing.assert_close(res["group1"].eigenvalues, torch.linalg.eigvalsh(block).flip(0)[:3])
    # subsampling: the GGN of the selected samples' rows
    sub = bg.compute(model, loss_fn, X, y, bg.GGNEigen(), subsampling=[0, 2])[bg.GGNEigen]["model"]
    dense_sub = ref["per_sample"][[0, 2]].sum(0)
    k = sub.eigenvalues.numel()
    torch.testing.assert_close(sub.eigenvalues, torch.linalg.eigvalsh(dense_sub).flip(0)[:k])
    assert sub.first_derivatives.shape == (2, k)
    q = bg.GGNEigen(mc_samples=2)
    mc = bg.compute(model, loss_fn, X, y, q, generator=torch.Generator().manual_seed(0))[q]["model"]
    assert mc.eigenvalues.numel() <= 2 * X.shape[0] and bool((mc.eigenvalues > 0).all())
    with pytest.raises(KeyError, match="unknown parameter"):
        bg.compute(model, loss_fn, X, y, bg.GGNEigen(param_groups=(("nope",),)))


@pytest.mark.parametrize("S", [1, 50])
def test_outer_form_cross_dot_gram_and_materialized_paths_agree(S):
    """Large weight-sharing axes fall back to materialized rows (the Gram matrix over
    (N S)^2 entries would not fit for a CNN); both paths give the same inner products."""
    from beyondgrad.forms import Form, OuterForm

    g = torch.Generator().manual_seed(S)
    A = torch.randn(3, S, 4, generator=g, dtype=torch.float64)
    f1 = OuterForm(A, torch.randn(6, S, 2, generator=g, dtype=torch.float64), (2, 4), vectors=2)
    f2 = OuterForm(A, torch.randn(3, S, 2, generator=g, dtype=torch.float64), (2, 4))
    torch.testing.assert_close(f1.cross_dot(f2), Form._cross_dot(f1, f2))
    torch.testing.assert_close(f1.project(f2.grad()[None]), Form._project(f1, f2.grad()[None]))


@pytest.mark.parametrize("S", [1, 5])
def test_outer_form_reductions_from_materialized_rows_agree(S):
    """Once the rows are materialized (the cockpit does so for conv layers), every reduction
    reads them; each must equal its factor-based value, checked against explicit rows."""
    from beyondgrad.forms import OuterForm

    g = torch.Generator().manual_seed(0)
    A = torch.randn(3, S, 4, generator=g, dtype=torch.float64)
    G = torch.randn(6, S, 2, generator=g, dtype=torch.float64)
    rows = torch.einsum("knso,nsi->knoi", G.view(2, 3, S, 2), A).reshape(6, 2, 4)
    V = torch.randn(3, 2, 4, generator=g, dtype=torch.float64)
    C = torch.randn(6, 3, generator=g, dtype=torch.float64)
    r_idx, flat = torch.tensor([0, 5, 3, 3]), torch.tensor([1, 7, 0, 4])
    factors = OuterForm(A, G, (2, 4), vectors=2)
    stored = OuterForm(A, G, (2, 4), vectors=2)
    assert stored.worth_materializing(10**6) == (S > 1)
    stored.batch_grad()
    assert stored.materialized
    flat_rows = rows.reshape(6, -1)
    for form in (factors, stored):
        torch.testing.assert_close(form.project(V), flat_rows @ V.reshape(3, -1).T)
        torch.testing.assert_close(form.combine(C), (C.T @ flat_rows).reshape(3, 2, 4))
        torch.testing.assert_close(form.entries(r_idx, flat), flat_rows[r_idx, flat])
        torch.testing.assert_close(form.dots_with_sum(), flat_rows @ flat_rows.sum(0))
        torch.testing.assert_close(form.batch_l2(), flat_rows.pow(2).sum(1))


@pytest.mark.parametrize("case", ["mlp", "resnet", "gpt"])
def test_spectrum_is_the_dense_ggn_top_eigenvalues_without_the_gradient_pass(case):
    """GGNSpectrum: per group the leading eigenvalues of the dense float64 GGN (block), equal
    to GGNEigen's, from the curvature vectors alone (its needs hold no loss gradient)."""
    model, X, y, loss_fn = CASES[case]()
    ref = ggn(model, loss_fn, X, y)
    names, shapes = ref["names"], ref["shapes"]
    groups = (tuple(names[:2]), tuple(names[2:]))
    q = bg.GGNSpectrum(top_k=3, param_groups=groups)
    assert q.needs().kinds == (q.vectors,)
    res = bg.compute(model, loss_fn, X, y, q)[q]
    assert set(res) == {"group0", "group1"}
    start = 0
    for key, group in zip(("group0", "group1"), groups):
        size = sum(shapes[names.index(n)].numel() for n in group)
        block = ref["full"][start : start + size, start : start + size]
        start += size
        expected = torch.linalg.eigvalsh(block).flip(0)[:3]
        torch.testing.assert_close(res[key], expected, rtol=1e-8, atol=1e-10)
    eig = bg.GGNEigen(top_k=3, param_groups=groups)
    both = bg.compute(model, loss_fn, X, y, eig)[eig]
    for key in res:
        torch.testing.assert_close(res[key], both[key].eigenvalues, rtol=1e-10, atol=1e-12)
    whole = bg.compute(model, loss_fn, X, y, bg.GGNSpectrum())[bg.GGNSpectrum]["model"]
    dense = torch.linalg.eigvalsh(ref["full"]).flip(0)
    torch.testing.assert_close(whole, dense[: whole.numel()], rtol=1e-8, atol=1e-10)
    with pytest.raises(ValueError, match="top_k"):
        bg.GGNSpectrum(top_k=0)
    with pytest.raises(KeyError, match="GGNSpectrum: unknown parameter"):
        bg.compute(model, loss_fn, X, y, bg.GGNSpectrum(param_groups=(("nope",),)))


def test_spectrum_first_leaves_conv_rows_for_the_diagonal(monkeypatch):
    """DiagGGN and GGNSpectrum in one call: the spectrum's Gram matrix materializes the
    convolutions' rows first (where that is cheaper than the Gram trick) and the diagonal
    reads them, instead of forming them a second time block by block; both equal the dense
    float64 GGN."""
    from beyondgrad.rules.conv import ConvOuterForm

    blocks = []
    original = ConvOuterForm._blocks
    monkeypatch.setattr(
        ConvOuterForm, "_blocks", lambda self, fn: blocks.append(1) or original(self, fn)
    )
    model, X, y, loss_fn = CASES["resnet"]()
    ref = ggn(model, loss_fn, X, y)
    diag, spectrum = bg.DiagGGN(), bg.GGNSpectrum(top_k=2)
    res = bg.compute(model, loss_fn, X, y, diag, spectrum)
    assert blocks == []
    flat = torch.cat([res[diag][n].reshape(-1) for n in ref["names"]])
    torch.testing.assert_close(flat, ref["full"].diagonal(), rtol=1e-9, atol=1e-12)
    top = torch.linalg.eigvalsh(ref["full"]).flip(0)[:2]
    torch.testing.assert_close(res[spectrum]["model"], top, rtol=1e-8, atol=1e-10)
    alone = bg.compute(model, loss_fn, X, y, bg.DiagGGN())[bg.DiagGGN()]
    assert blocks  # without the spectrum: block by block
    for name in ref["names"]:
        torch.testing.assert_close(res[diag][name], alone[name], rtol=1e-12, atol=1e-15)


def test_outer_form_products_with_strided_inputs_share_one_input_matrix():
    """Conv patches are a transposed view ``[N, S, I]`` of ``[N, I, S]``: ``project`` and
    ``combine`` (two vectors per sample, three coefficient columns) agree with the rows, and
    read the inputs through one memoized ``[N S, I]`` copy."""
    from beyondgrad.forms import OuterForm

    g = torch.Generator().manual_seed(1)
    A = torch.randn(3, 5, 4, generator=g, dtype=torch.float64).transpose(1, 2)  # [N, S=4, I=5]
    G = torch.randn(6, 4, 2, generator=g, dtype=torch.float64)
    rows = torch.einsum("knso,nsi->knoi", G.view(2, 3, 4, 2), A).reshape(6, -1)
    form = OuterForm(A, G, (2, 5), vectors=2)
    C = torch.randn(6, 3, generator=g, dtype=torch.float64)
    V = torch.randn(3, 2, 5, generator=g, dtype=torch.float64)
    torch.testing.assert_close(form.combine(C), (C.T @ rows).reshape(3, 2, 5))
    matrix = form._cache["A_matrix"]
    torch.testing.assert_close(form.project(V), rows @ V.reshape(3, -1).T)
    assert form._cache["A_matrix"] is matrix
