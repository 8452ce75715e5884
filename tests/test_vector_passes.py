"""K backpropagated vectors through convolutions: the per-vector paths (engine and linops) equal
the vectorized pass and float64 oracles; the outer-product form's per-vector GEMMs (chunked over
samples) equal the rows built by an explicit einsum."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import beyondgrad as bg
import beyondgrad.forms.outer as outer_module
from beyondgrad.engine.attribution import node_kinds
from beyondgrad.engine.backprop import backprop_vectors, per_vector_faster
from beyondgrad.forms import OuterForm
from beyondgrad.linops import GGN, Hessian, Jacobian
from oracles.curvature import batch_diag_ggn, diag_ggn, ggn
from test_linops import dense_hessian


def small_cnn(seed: int = 0) -> nn.Sequential:
    """Conv, eval-mode BatchNorm, zero padding, max pooling, Linear: every node kind that
    selects the per-vector path, in float64."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.ZeroPad2d((0, 1, 0, 1)),
        nn.MaxPool2d(2),
        nn.Conv2d(3, 2, 2, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(2 * 4 * 4, 3),
    ).double()
    bn = model[1]
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(3) * 0.3)
        bn.running_var.copy_(torch.rand(3) + 0.5)
        bn.weight.copy_(1 + 0.3 * torch.randn(3))
        bn.bias.copy_(0.2 * torch.randn(3))
    return model.eval()


def cnn_problem(N: int = 4):
    model = small_cnn()
    X = torch.randn(N, 2, 7, 7, dtype=torch.float64)
    return model, X, torch.randint(0, 3, (N,)), nn.CrossEntropyLoss()


def test_policy_by_node_kinds():
    model, X, _, _ = cnn_problem()
    assert per_vector_faster(node_kinds(model(X)))
    mlp = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    assert not per_vector_faster(node_kinds(mlp(torch.randn(2, 3, dtype=torch.float64))))


def test_backprop_vectors_per_vector_equals_vectorized():
    model, X, _, _ = cnn_problem()
    outputs = {}
    for i, m in enumerate(model):
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.register_forward_hook(lambda m, a, o, i=i: outputs.__setitem__(i, o))
    out = model(X)
    targets = list(outputs.values())
    V = torch.randn(5, *out.shape, dtype=torch.float64)
    kinds = node_kinds(out)
    per_vector = backprop_vectors(out, targets, V, kinds, retain=True)
    batched = backprop_vectors(out, targets, V, set(), retain=True)  # no kinds: vmap
    for a, b in zip(per_vector, batched):
        torch.testing.assert_close(a, b)
    for k in (0, 4):  # each vector's plain backward pass
        plain = torch.autograd.grad(out, targets, V[k], retain_graph=True)
        for a, b in zip(per_vector, plain):
            torch.testing.assert_close(a[k], b)


def test_exact_curvature_through_convolutions_matches_oracles():
    model, X, y, loss_fn = cnn_problem()
    ref = ggn(model, loss_fn, X, y)
    res = bg.compute(model, loss_fn, X, y, bg.DiagGGN(), bg.BatchDiagGGN(), bg.SqrtGGN())
    for name, value in diag_ggn(ref).items():
        torch.testing.assert_close(res[bg.DiagGGN][name], value)
    for name, value in batch_diag_ggn(ref).items():
        torch.testing.assert_close(res[bg.BatchDiagGGN][name], value)
    names = [n for n, _ in model.named_parameters()]
    V = torch.cat([res[bg.SqrtGGN][n].flatten(2) for n in names], 2).flatten(0, 1)
    torch.testing.assert_close(V.T @ V, ref["full"])


@pytest.mark.parametrize("chunk", [1 << 24, 9])
@pytest.mark.parametrize("K", [1, 3])
def test_outer_form_per_vector_gemms(monkeypatch, chunk, K):
    """Per-vector GEMMs (and chunks of a single sample when the bound is tiny) equal the rows
    ``sum_s G[k n, s]^T A[n, s]`` built by einsum, for a conv-like layout of ``G``."""
    monkeypatch.setattr(outer_module, "CHUNK_ELEMENTS", chunk)
    g = torch.Generator().manual_seed(0)
    N, S, I, O = 4, 5, 3, 2
    A = torch.randn(N, I, S, dtype=torch.float64, generator=g).transpose(1, 2)
    G = torch.randn(K * N, O, S, dtype=torch.float64, generator=g).transpose(1, 2)
    rows = torch.einsum("knso,nsi->knoi", G.reshape(K, N, S, O), A)  # [K, N, O, I]
    form = OuterForm(A, G, (O, I), K)
    torch.testing.assert_close(form.sum_grad_squared(), rows.square().sum((0, 1)))
    torch.testing.assert_close(form.grad(), rows.sum((0, 1)))
    fresh = OuterForm(A, G, (O, I), K)
    torch.testing.assert_close(fresh.batch_sum_grad_squared(), rows.square().sum(0))
    torch.testing.assert_close(fresh.batch_grad(), rows.reshape(K * N, O, I))
    out = torch.empty(K * N, O, I, dtype=torch.float64)
    OuterForm(A, G, (O, I), K).batch_grad(out=out)
    torch.testing.assert_close(out, rows.reshape(K * N, O, I))


def test_linops_products_through_convolutions(monkeypatch):
    """Hessian, GGN and Jacobian products with several columns take the per-vector path on a
    cnn and equal dense float64 matrices (and the vectorized path)."""
    model, X, y, loss_fn = cnn_problem(3)
    data = [(X, y)]
    H, G, J = Hessian(model, loss_fn, data), GGN(model, loss_fn, data), Jacobian(model, data)
    M = torch.randn(H.shape[0], 4, dtype=torch.float64)
    import beyondgrad.linops.curvature as curvature

    seen: list[bool] = []
    batched_grad = curvature._batched_grad

    def spy(*args, **kwargs):
        seen.append(args[3] if len(args) > 3 else kwargs.get("per_vector", False))
        return batched_grad(*args, **kwargs)

    monkeypatch.setattr(curvature, "_batched_grad", spy)
    torch.testing.assert_close(H @ M, dense_hessian(model, loss_fn, X, y) @ M)
    torch.testing.assert_close(G @ M, ggn(model, loss_fn, X, y)["full"] @ M)
    jac = torch.func.jacrev(
        lambda *p: torch.func.functional_call(
            model, dict(zip([n for n, _ in model.named_parameters()], p)), (X,)
        ),
        argnums=tuple(range(len(list(model.parameters())))),
    )(*[p.detach() for p in model.parameters()])
    dense_j = torch.cat([j.reshape(X.shape[0] * 3, -1) for j in jac], 1)
    torch.testing.assert_close(J @ M, dense_j @ M)
    U = torch.randn(dense_j.shape[0], 2, dtype=torch.float64)
    torch.testing.assert_close(J.T @ U, dense_j.T @ U)
    assert seen and any(seen)
    # the vectorized path gives the same products
    monkeypatch.setattr(curvature._engine, "per_vector_graph", lambda kinds: False)
    H2, G2 = Hessian(model, loss_fn, data), GGN(model, loss_fn, data)
    torch.testing.assert_close(H2 @ M, H @ M)
    torch.testing.assert_close(G2 @ M, G @ M)


def test_hessian_measures_the_faster_pass_and_keeps_it(monkeypatch):
    """Without a known slow vmap rule the first MEASURED_PRODUCTS products with at least
    MEASURED_COLUMNS columns alternate between one vectorized pass and one pass per column,
    then every product takes the faster way; both ways equal the dense float64 Hessian."""
    import beyondgrad.linops.curvature as curvature

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.LayerNorm(4), nn.Linear(4, 2)).double()
    X, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    data, loss_fn = [(X, y)], nn.MSELoss()
    dense = dense_hessian(model, loss_fn, X, y)
    seen: list[tuple[bool, int]] = []
    batched_grad = curvature._batched_grad

    def spy(outputs, inputs, vectors, per_vector=False, **kwargs):
        seen.append((per_vector, vectors[0].shape[0]))
        return batched_grad(outputs, inputs, vectors, per_vector, **kwargs)

    monkeypatch.setattr(curvature, "_batched_grad", spy)
    H = Hessian(model, loss_fn, data)
    M = torch.randn(H.shape[0], 5, dtype=torch.float64)
    torch.testing.assert_close(H @ M, dense @ M)
    assert seen == [(False, 5)] and H._passes.per_column is None
    for way in (True, False):  # whole products, alternating ways
        seen.clear()
        torch.testing.assert_close(H @ M, dense @ M)
        assert seen == [(way, 5)]
    assert isinstance(H._passes.per_column, bool)
    for choice in (False, True):
        seen.clear()
        H._passes.per_column = choice
        torch.testing.assert_close(H @ M, dense @ M)
        assert seen == [(choice, 5)]
    G, dense_g = GGN(model, loss_fn, data), ggn(model, loss_fn, X, y)["full"]
    for _ in range(3):  # the GGN's J^T backward is measured the same way
        torch.testing.assert_close(G @ M, dense_g @ M)
    assert isinstance(G._passes.per_column, bool)
    few = Hessian(model, loss_fn, data)
    torch.testing.assert_close(few @ M[:, :3], dense @ M[:, :3])
    assert seen[-1] == (False, 3) and few._passes.per_column is None  # too few: vectorized
    cnn_model, Xc, yc, cnn_loss = cnn_problem(3)
    cnn = Hessian(cnn_model, cnn_loss, [(Xc, yc)])
    seen.clear()
    cnn @ torch.randn(cnn.shape[0], 5, dtype=torch.float64)
    assert (
        seen == [(True, 5)] and cnn._passes.per_column is None
    )  # convolutions: one by one, always


def test_hessian_keeps_the_way_that_was_faster(monkeypatch):
    """The choice follows the measured times: a vectorized pass made slow is dropped, and one
    made fast is kept."""
    import time

    import beyondgrad.linops.curvature as curvature

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    X, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    batched_grad = curvature._batched_grad
    for slow_way in (False, True):

        def slowed(outputs, inputs, vectors, per_vector=False, _slow=slow_way, **kwargs):
            if per_vector == _slow:
                time.sleep(0.05)
            return batched_grad(outputs, inputs, vectors, per_vector, **kwargs)

        monkeypatch.setattr(curvature, "_batched_grad", slowed)
        H = Hessian(model, nn.MSELoss(), [(X, y)])
        M = torch.randn(H.shape[0], 4, dtype=torch.float64)
        for _ in range(curvature.MEASURED_PRODUCTS):
            H @ M
        assert H._passes.per_column is (not slow_way)


def test_ggn_forward_mode_measures_the_columns_per_pass_and_keeps_the_fastest(monkeypatch):
    """``J V`` by forward mode: the first products with at least MEASURED_COLUMNS columns
    try every size of :data:`JV_CHUNKS` below the column count (the first one again at the
    end), then keep the size with the lowest time per column (here made slow on purpose for
    all but one); every size gives the dense float64 GGN's columns, and so do products with
    fewer columns (one pass) and more columns than the chosen size."""
    import time

    import beyondgrad.linops.curvature as curvature

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.LayerNorm(4), nn.Linear(4, 2)).double()
    X, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    dense = ggn(model, nn.MSELoss(), X, y)["full"]
    forward_jv = curvature._forward_jv
    sizes: list[int | None] = []

    def slowed(model_, names, params, X_, V, chunk=None):
        sizes.append(chunk)
        if chunk != 4:
            time.sleep(0.03)
        return forward_jv(model_, names, params, X_, V, chunk)

    monkeypatch.setattr(curvature, "_forward_jv", slowed)
    G = GGN(model, nn.MSELoss(), [(X, y)])
    M = torch.randn(G.shape[0], 9, dtype=torch.float64)
    expected = [c for c in curvature.JV_CHUNKS if c is None or c < 9]
    for _ in range(len(expected) + 1):
        torch.testing.assert_close(G @ M, dense @ M)
    assert sizes == [*expected, expected[0]]
    assert G._jv_chunks.chosen and G._jv_chunks.chunk == 4
    sizes.clear()
    torch.testing.assert_close(G @ M, dense @ M)
    torch.testing.assert_close(G @ M[:, :3], dense @ M[:, :3])  # fewer columns: one pass
    assert sizes == [4, None]
    fresh = GGN(model, nn.MSELoss(), [(X, y)])
    sizes.clear()
    torch.testing.assert_close(fresh @ M[:, :3], dense @ M[:, :3])
    assert sizes == [None] and not fresh._jv_chunks.chosen  # too few columns to measure


def test_hessian_single_vectors_by_forward_over_reverse_equal_the_dense_hessian():
    """One vector on a batch whose state is not kept: the first 2 MEASURED_PRODUCTS products
    alternate between double backward and forward over reverse, both equal to the dense
    float64 Hessian (LayerNorm, convolution, attention), then the faster way is kept."""
    import beyondgrad.linops.curvature as curvature

    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.LayerNorm(4), nn.Linear(4, 2)).double()
    X, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,))
    cnn_model, Xc, yc, cnn_loss = cnn_problem(3)
    for model, loss_fn, X_, y_ in (
        (mlp, nn.CrossEntropyLoss(), X, y),
        (cnn_model, cnn_loss, Xc, yc),
    ):
        dense = dense_hessian(model, loss_fn, X_, y_)
        H = Hessian(model, loss_fn, [(X_, y_)])
        v = torch.randn(H.shape[0], dtype=torch.float64)
        routes = []
        for _ in range(2 * curvature.MEASURED_PRODUCTS):
            routes.append(H._route._calls % 2 == 1)
            torch.testing.assert_close(H @ v, dense @ v)
        assert routes == [False, True] * curvature.MEASURED_PRODUCTS
        assert isinstance(H._route.second, bool)
        H._route.second = True  # forward over reverse from here on, still exact
        torch.testing.assert_close(H @ v, dense @ v)


def test_hessian_route_choice_follows_the_times_and_a_failing_route_is_dropped(monkeypatch):
    import time

    import beyondgrad.linops.curvature as curvature

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    X, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,))
    loss_fn = nn.CrossEntropyLoss()  # (MSELoss has no forward-over-reverse rule: refused)
    dense = dense_hessian(model, loss_fn, X, y)
    for slow_dual in (True, False):
        H = Hessian(model, loss_fn, [(X, y)])
        route = H._dual_products if slow_dual else H._reverse_products

        def slowed(*args, _route=route):
            time.sleep(0.05)
            return _route(*args)

        monkeypatch.setattr(H, "_dual_products" if slow_dual else "_reverse_products", slowed)
        v = torch.randn(H.shape[0], dtype=torch.float64)
        for _ in range(2 * curvature.MEASURED_PRODUCTS):
            torch.testing.assert_close(H @ v, dense @ v)
        assert H._route.second is (not slow_dual)
    H = Hessian(model, loss_fn, [(X, y)])

    def no_forward_rule(*args):
        raise NotImplementedError("Trying to use forward AD with an op that does not support it")

    monkeypatch.setattr(H, "_dual_products", no_forward_rule)
    v = torch.randn(H.shape[0], dtype=torch.float64)
    for _ in range(3):  # the second product tries the dual route, falls back, drops it
        torch.testing.assert_close(H @ v, dense @ v)
    assert H._route.second is False


def test_hessian_single_vectors_of_a_model_that_updates_buffers_stay_reverse():
    """Batch norm in training mode: one forward pass per product, never the timed dual one."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).double()
    X, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    H = Hessian(model, nn.MSELoss(), [(X, y)], allow_train_mode=True)
    before = model[1].num_batches_tracked.item()
    for _ in range(4):
        H @ torch.randn(H.shape[0], dtype=torch.float64)
    assert H._route._calls == 0 and H._route.second is None
    assert model[1].num_batches_tracked.item() == before + 4
