"""beyondgrad.pinn in float64 against brute-force oracles: the forward Laplacian against nested
autograd, the Gramian against full Jacobians of nested-autograd residuals, the KFAC factors
against their definitions, the Kronecker-sum inverse against a dense inverse."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, hessian, jacrev, vmap

import beyondgrad as bg

pinn = bg.pinn
ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("float64_seeded")


def mlp(d: int, act: type[nn.Module] = nn.Tanh, widths: tuple[int, ...] = (5, 4)) -> nn.Sequential:
    """A tiny MLP ``d -> widths -> 1``."""
    layers: list[nn.Module] = []
    for w_in, w_out in zip((d, *widths), widths):
        layers += [nn.Linear(w_in, w_out), act()]
    return nn.Sequential(*layers, nn.Linear(widths[-1], 1))


def nested(model: nn.Module, X: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Value, gradient and full Hessian per point by nested autograd."""

    def f(x: Tensor) -> Tensor:
        return model(x[None])[0, 0]

    return model(X), vmap(grad(f))(X), vmap(hessian(f))(X)


def lap(H: Tensor, dims: list[int]) -> Tensor:
    return H[:, dims, dims].sum(-1, keepdim=True)


PDES = {
    "poisson2": lambda: pinn.poisson(2),
    "poisson3": lambda: pinn.poisson(3),
    "heat1": lambda: pinn.heat(1),
    "heat2": lambda: pinn.heat(2, kappa=0.5),
}
ACTS = [nn.Tanh, nn.Sigmoid, nn.Softplus, nn.SiLU]


def dims_of(pde: pinn.PDE) -> list[int]:
    return list(range(pde.dim)) if pde.laplace_dims is None else list(pde.laplace_dims)


def setup(name: str, act: type[nn.Module] = nn.Tanh, n: int = 6, n_b: int = 5):
    pde = PDES[name]()
    gen = torch.Generator().manual_seed(1)
    model = mlp(pde.dim, act)
    X, X_b = pde.sample_interior(n, gen), pde.sample_boundary(n_b, gen)
    return pde, model, pinn.PINNLoss(model, pde, X, X_b)


# ---- the forward Laplacian ---------------------------------------------------------------------


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("d", [1, 3])
def test_forward_laplacian_equals_nested_autograd(act: type[nn.Module], d: int) -> None:
    model = mlp(d, act)
    X = torch.randn(7, d)
    u, g, L = pinn.forward_laplacian(model, X)
    u_ref, g_ref, H = nested(model, X)
    assert u.shape == (7, 1) and g.shape == (7, d) and L.shape == (7, 1)
    torch.testing.assert_close(u, u_ref)
    torch.testing.assert_close(g, g_ref)
    torch.testing.assert_close(L, lap(H, list(range(d))))


def test_partial_laplacian_and_softplus_beta() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Softplus(beta=2.5), nn.Linear(4, 1))
    X = torch.randn(5, 3)
    _, _, L = pinn.forward_laplacian(model, X, laplace_dims=(1, 2))  # a range: a slice
    torch.testing.assert_close(L, lap(nested(model, X)[2], [1, 2]))
    _, _, L = pinn.forward_laplacian(model, X, laplace_dims=(2, 0))  # not a range: a gather
    torch.testing.assert_close(L, lap(nested(model, X)[2], [0, 2]))


def test_forward_laplacian_is_differentiable_in_the_parameters() -> None:
    model = mlp(2)
    X = torch.randn(4, 2)
    params = dict(model.named_parameters())

    def ours(p: dict[str, Tensor]) -> Tensor:
        return functional_call(_Lap(model), {f"m.{k}": v for k, v in p.items()}, (X,)).sum()

    def ref(p: dict[str, Tensor]) -> Tensor:
        def f(x: Tensor) -> Tensor:
            return functional_call(model, p, (x[None],))[0, 0]

        return vmap(hessian(f))(X).diagonal(dim1=1, dim2=2).sum()

    a, b = jacrev(ours)(params), jacrev(ref)(params)
    for k in params:
        torch.testing.assert_close(a[k], b[k])


class _Lap(nn.Module):
    def __init__(self, m: nn.Module) -> None:
        super().__init__()
        self.m = m

    def forward(self, X: Tensor) -> Tensor:
        return pinn.forward_laplacian(self.m, X)[2]


@pytest.mark.parametrize("bad", [nn.ReLU(), nn.Conv1d(1, 1, 1), nn.LayerNorm(3)])
def test_unsupported_module_is_a_clear_error(bad: nn.Module) -> None:
    model = nn.Sequential(nn.Linear(3, 3), bad, nn.Linear(3, 1))
    with pytest.raises(pinn.UnsupportedModuleError, match=type(bad).__name__):
        pinn.forward_laplacian(model, torch.randn(2, 3))


def test_bad_inputs_are_errors() -> None:
    with pytest.raises(ValueError, match="one output"):
        pinn.forward_laplacian(nn.Linear(2, 2), torch.randn(3, 2))
    with pytest.raises(ValueError, match="X"):
        pinn.forward_laplacian(nn.Linear(2, 1), torch.randn(3))
    with pytest.raises(ValueError, match="range"):
        pinn.forward_laplacian(nn.Linear(2, 1), torch.randn(3, 2), laplace_dims=(2,))


# ---- problems ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PDES))
def test_exact_solutions_solve_their_pde(name: str) -> None:
    """The residual of the exact solution (derivatives by autograd) vanishes."""
    pde = PDES[name]()
    X = pde.sample_interior(9, torch.Generator().manual_seed(0))

    def f(x: Tensor) -> Tensor:
        return pde.exact(x[None])[0, 0]

    g, H = vmap(grad(f))(X), vmap(hessian(f))(X)
    res = pinn.TaylorResult(pde.exact(X), g, lap(H, dims_of(pde)))
    torch.testing.assert_close(pde.residual(X, res), torch.zeros(9, 1), atol=1e-12, rtol=0)
    Xb = pde.sample_boundary(50, torch.Generator().manual_seed(0))
    on_face = ((Xb == 0) | (Xb == 1)).any(1)
    assert bool(on_face.all())
    if name.startswith("heat"):
        assert not bool((Xb[:, 0] == 1).any()), "t = 1 is not a boundary"


def test_relative_l2_error_is_zero_for_the_solution() -> None:
    pde = pinn.poisson(2)

    class Exact(nn.Module):
        def forward(self, X: Tensor) -> Tensor:
            return pde.exact(X)

    assert pinn.relative_l2_error(Exact(), pde, torch.rand(10, 2)) == 0.0
    assert pinn.relative_l2_error(mlp(2), pde, torch.rand(10, 2)) > 0.0


# ---- the loss, its gradient and Gramian --------------------------------------------------------


def oracle_residuals(loss: pinn.PINNLoss, params: dict[str, Tensor]) -> Tensor:
    """``[N + N_b]`` residuals with derivatives by nested autograd (no forward Laplacian)."""
    pde = loss.pde

    def f(x: Tensor) -> Tensor:
        return functional_call(loss.model, params, (x[None],))[0, 0]

    g, H = vmap(grad(f))(loss.X), vmap(hessian(f))(loss.X)
    u = functional_call(loss.model, params, (loss.X,))
    r = pde.residual(loss.X, pinn.TaylorResult(u, g, lap(H, dims_of(pde))))[:, 0]
    r_b = (functional_call(loss.model, params, (loss.X_b,)) - pde.exact(loss.X_b))[:, 0]
    return torch.cat([r, r_b])


def oracle_jacobian(loss: pinn.PINNLoss) -> Tensor:
    """``[N + N_b, P]`` in the block layout, by jacrev of the nested-autograd residuals."""
    params = {k: v.detach() for k, v in loss.model.named_parameters()}
    J = jacrev(lambda p: oracle_residuals(loss, p))(params)
    cols = []
    for m in loss.layers:
        name = next(k for k, v in loss.model.named_parameters() if v is m.weight)
        jw, jb = J[name], J[name[: -len("weight")] + "bias"]
        cols.append(torch.cat([jw, jb[..., None]], 2).flatten(1))
    return torch.cat(cols, 1)


def oracle_gramian(loss: pinn.PINNLoss) -> Tensor:
    J = oracle_jacobian(loss)
    n = loss.X.shape[0]
    return J[:n].T @ J[:n] / n + J[n:].T @ J[n:] / (J.shape[0] - n)


@pytest.mark.parametrize("name", sorted(PDES))
def test_loss_gradient_and_gramian_equal_the_oracles(name: str) -> None:
    _, model, loss = setup(name, nn.Sigmoid)
    ev = loss.evaluate()
    r = oracle_residuals(loss, dict(model.named_parameters()))
    n = loss.X.shape[0]
    value = 0.5 * (r[:n] ** 2).mean() + 0.5 * (r[n:] ** 2).mean()
    assert ev.loss == pytest.approx(value.item(), rel=1e-12)
    params = [p for m in loss.layers for p in (m.weight, m.bias)]
    grads = torch.autograd.grad(value, params)
    ref = pinn.flatten([torch.cat([gw, gb[:, None]], 1) for gw, gb in zip(grads[::2], grads[1::2])])
    torch.testing.assert_close(pinn.flatten(ev.gradient()), ref)
    G = oracle_gramian(loss)
    torch.testing.assert_close(ev.gramian(), G)
    torch.testing.assert_close(loss.func_gramian(), G)
    v = [torch.randn_like(b) for b in loss.blocks()]
    Gv = G @ pinn.flatten(v)
    torch.testing.assert_close(pinn.flatten(loss.func_gramian_vector_product(v)), Gv)
    torch.testing.assert_close(pinn.flatten(ev.gramian_vector_product(v)), Gv)
    J = oracle_jacobian(loss)
    Jv, Jbv = ev.jvp(v)
    torch.testing.assert_close(torch.cat([Jv, Jbv]), J @ pinn.flatten(v))
    w = [torch.randn_like(b) for b in loss.blocks()]
    JV, JbV = ev.jvps([v, w])  # several vectors at once
    ref = J @ torch.stack([pinn.flatten(v), pinn.flatten(w)], 1)
    torch.testing.assert_close(torch.cat([JV, JbV], 1), ref.T)


def test_blocks_roundtrip() -> None:
    _, model, loss = setup("poisson2")
    blocks = loss.blocks()
    shifted = [b + 1 for b in blocks]
    loss.set_blocks(shifted)
    for a, b in zip(loss.blocks(), shifted):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(pinn.unflatten(pinn.flatten(blocks), blocks)[1], blocks[1])
    assert sum(b.numel() for b in blocks) == sum(p.numel() for p in model.parameters())


# ---- KFAC factors ------------------------------------------------------------------------------


def taylor_by_autograd(net: nn.Module, x: Tensor, dims: list[int]) -> Tensor:
    """``[S, h]``: value, input derivatives and Laplacian of ``net`` at one point (nested
    autograd)."""
    value = net(x[None])[0]
    jac = jacrev(lambda y: net(y[None])[0])(x)  # [h, d]
    hess = jacrev(jacrev(lambda y: net(y[None])[0]))(x)  # [h, d, d]
    return torch.cat([value[None], jac.T, hess[:, dims, dims].sum(-1)[None]])


def scalar(net: nn.Module):
    """``z [h] -> net(z)[0]``, a scalar function of one point."""
    return lambda z: net(z[None])[0, 0]


def output_gradients(
    pde: pinn.PDE, down: nn.Module, x: Tensor, zs: Tensor, dims: list[int]
) -> Tensor:
    """``[S, out]``: d r / d z_s by autograd of the chain rule written out for ``u = down(z)``:
    ``grad u = J_down z_i``, ``Laplace u = sum_i z_i^T H_down z_i + J_down z_L``."""

    def residual(z: Tensor) -> Tensor:
        def phi(y: Tensor) -> Tensor:
            return down(y[None])[0, 0]

        z0, zi, zl = z[0], z[1:-1], z[-1]
        gphi, Hphi = grad(phi)(z0), hessian(phi)(z0)
        g_u = zi @ gphi
        lap_u = torch.einsum("io,op,ip->", zi[dims], Hphi, zi[dims]) + gphi @ zl
        res = pinn.TaylorResult(phi(z0).reshape(1, 1), g_u[None], lap_u.reshape(1, 1))
        return pde.residual(x[None], res)[0, 0]

    return jacrev(residual)(zs)


@pytest.mark.parametrize("name", ["poisson2", "heat1"])
def test_kfac_factors_equal_their_definition(name: str) -> None:
    pde, model, loss = setup(name, nn.Tanh, n=4, n_b=3)
    ev, dims = loss.evaluate(), dims_of(pde)
    modules = list(model)
    positions = [i for i, m in enumerate(modules) if isinstance(m, nn.Linear)]
    for k, p in enumerate(positions):
        up, layer, down = nn.Sequential(*modules[:p]), modules[p], nn.Sequential(*modules[p + 1 :])
        Zs, gs = [], []
        for x in loss.X:
            inp = taylor_by_autograd(up, x, dims)  # [S, in]
            bias = torch.zeros(inp.shape[0], 1)
            bias[0] = 1
            Zs.append(torch.cat([inp, bias], 1))
            zs = inp @ layer.weight.T + bias * layer.bias
            gs.append(output_gradients(pde, down, x, zs.detach(), dims))
        N, S = len(Zs), Zs[0].shape[0]
        A = sum(z[s, :, None] * z[s, None, :] for z in Zs for s in range(S)) / (N * S)
        B = sum(g[s, :, None] * g[s, None, :] for g in gs for s in range(S)) / N
        hb = torch.cat([up(loss.X_b), torch.ones(loss.X_b.shape[0], 1)], 1)
        gb = torch.stack([jacrev(scalar(down))(z) for z in layer(up(loss.X_b))])
        A_b, B_b = hb.T @ hb / hb.shape[0], gb.T @ gb / gb.shape[0]
        for ours, ref in zip(ev.kfac_factors()[k], (A, B, A_b, B_b)):
            torch.testing.assert_close(ours, ref.detach())
        # KFAC-reduce: Taylor-axis sums of inputs and output gradients per point
        A_r = sum(z.sum(0)[:, None] * z.sum(0)[None, :] for z in Zs) / (N * S**2)
        B_r = sum(g.sum(0)[:, None] * g.sum(0)[None, :] for g in gs) / N
        for ours, ref in zip(ev.kfac_factors("reduce")[k], (A_r, B_r, A_b, B_b)):
            torch.testing.assert_close(ours, ref.detach())
        # the Taylor-axis factorization of the per-point Jacobian: J_n = sum_s g_s Z_s^T
        torch.testing.assert_close(ev.Z[k], torch.stack(Zs).detach())
        torch.testing.assert_close(ev.g[k], torch.stack(gs).detach())


def test_boundary_kfac_is_exact_for_one_boundary_point() -> None:
    """Standard KFAC of one sample is its exact Gramian block: ``J_b^T J_b = B_b kron A_b``."""
    _, _, loss = setup("poisson2", n=3, n_b=1)
    ev = loss.evaluate()
    J = oracle_jacobian(loss)[-1:]  # the boundary row
    start = 0
    for block, (_, _, A_b, B_b) in zip(loss.blocks(), ev.kfac_factors()):
        Jl = J[:, start : start + block.numel()]
        torch.testing.assert_close(torch.kron(B_b, A_b), Jl.T @ Jl)
        start += block.numel()


# ---- the Kronecker-sum inverse -----------------------------------------------------------------


def spd(n: int, rank: int | None = None) -> Tensor:
    M = torch.randn(n, rank or n)
    return M @ M.T / n


@pytest.mark.parametrize("damping", [0.0, 1e-3, 0.5])
def test_kronecker_sum_inverse_equals_dense_inverse(damping: float) -> None:
    A1, B1, A2, B2 = spd(4), spd(3), spd(4, rank=2), spd(3, rank=1)
    inv = pinn.damped_kronecker_sum_inverse(A1, B1, A2, B2, damping)
    I4, I3 = torch.eye(4), torch.eye(3)
    K = torch.kron(B1 + damping * I3, A1 + damping * I4) + torch.kron(
        B2 + damping * I3, A2 + damping * I4
    )
    V = torch.randn(3, 4)
    torch.testing.assert_close((inv @ V).reshape(-1), torch.linalg.solve(K, V.reshape(-1)))
    # and the sum is not one product: replacing it by (B1 + B2) kron (A1 + A2) differs
    assert not torch.allclose(torch.linalg.inv(K), torch.linalg.inv(torch.kron(B1 + B2, A1 + A2)))


def test_generalized_eigh_and_its_error() -> None:
    M1, M2 = spd(5), spd(5, rank=3)
    mu, W = pinn.generalized_eigh(M1, M2)
    torch.testing.assert_close(W.T @ M1 @ W, torch.eye(5))
    torch.testing.assert_close(W.T @ M2 @ W, torch.diag(mu))
    with pytest.raises(ValueError, match="positive definite"):
        pinn.generalized_eigh(spd(5, rank=2), M2)
    M3 = spd(5, rank=2)
    p, q, W = pinn.simultaneous_diagonalization(M3, M2)
    torch.testing.assert_close(W.T @ M3 @ W, torch.diag(p))
    torch.testing.assert_close(W.T @ M2 @ W, torch.diag(q))


def test_kronecker_sum_inverse_badly_scaled_factors() -> None:
    """Rank-deficient factors of very different scales with a small damping (condition number
    about 1e9; the first factor alone would be rejected by ``generalized_eigh``)."""
    A1, B1, A2, B2 = spd(4, rank=2), 1e3 * spd(3, rank=1), spd(4, rank=3), spd(3, rank=2)
    d = 1e-3
    inv = pinn.damped_kronecker_sum_inverse(A1, B1, A2, B2, d)
    I4, I3 = torch.eye(4), torch.eye(3)
    K = torch.kron(B1 + d * I3, A1 + d * I4) + torch.kron(B2 + d * I3, A2 + d * I4)
    V = torch.randn(3, 4)
    x, ref = (inv @ V).reshape(-1), torch.linalg.solve(K, V.reshape(-1))
    assert ((K @ x - V.reshape(-1)).norm() / V.norm()).item() < 1e-9
    torch.testing.assert_close(x, ref, rtol=1e-6, atol=1e-6 * ref.abs().max().item())


# ---- optimizers --------------------------------------------------------------------------------


def small_problem(n: int = 30, n_b: int = 20) -> pinn.PINNLoss:
    pde = pinn.poisson(2)
    gen = torch.Generator().manual_seed(0)
    model = mlp(2, widths=(8,))
    return pinn.PINNLoss(model, pde, pde.sample_interior(n, gen), pde.sample_boundary(n_b, gen))


@pytest.mark.parametrize(
    "make",
    [
        lambda loss: pinn.KFACPINN(loss, damping=1e-4),
        lambda loss: pinn.KFACPINN(loss, damping=1.0, step_rule="auto"),
        lambda loss: pinn.ENGD(loss, damping=1e-8),
    ],
    ids=["kfac", "kfac-auto", "engd"],
)
def test_a_short_run_decreases_the_loss(make) -> None:
    loss = small_problem()
    opt = make(loss)
    start = float(loss.value().detach())
    losses = [opt.step() for _ in range(8)]
    end = float(loss.value().detach())
    assert losses[0] == pytest.approx(start)
    assert end < 0.5 * start, (start, end)
    assert opt.steps == 8


def test_auto_step_minimizes_the_quadratic_model() -> None:
    """The first auto step ``alpha Delta`` has ``alpha = -g.Delta / Delta^T (G + lambda) Delta``."""
    loss = small_problem()
    opt = pinn.KFACPINN(loss, damping=1e-3, step_rule="auto", adapt=1.0)
    ev = loss.evaluate()
    g = pinn.flatten(ev.gradient())
    delta = pinn.flatten(pinn.KFACPINN(loss, damping=1e-3).natural_gradient(ev))
    G = oracle_gramian(loss)
    alpha = -(g @ delta) / (delta @ (G + 1e-3 * torch.eye(G.shape[0])) @ delta)
    before = pinn.flatten(loss.blocks())
    opt.step()
    torch.testing.assert_close(pinn.flatten(loss.blocks()) - before, alpha * delta)


def test_step_rule_is_checked() -> None:
    with pytest.raises(ValueError, match="step_rule"):
        pinn.KFACPINN(small_problem(), step_rule="newton")


# ---- the benchmark script ----------------------------------------------------------------------


def test_benchmark_smoke(tmp_path: Path) -> None:
    """``benchmarks/pinn.py --quick`` runs end to end (tiny budget, one problem)."""
    out = tmp_path / "pinn_cpu.md"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    cmd = [sys.executable, str(ROOT / "benchmarks" / "pinn.py"), "--quick", "--budget", "0.1"]
    cmd += ["--problems", "heat 1+1d", "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.with_suffix(".json").read_text())
    methods = [r["method"].split(" ")[0] for r in data["rows"]]
    assert methods == ["adam", "lbfgs", "engd", "kfac", "kfac-auto", "kfac-cg", "kfac-cg-layer"]
    assert all(r["status"] == "ok" and r["steps"] >= 1 for r in data["rows"]), data["rows"]
    assert out.read_text().startswith("# ") and "|---|" in out.read_text()
