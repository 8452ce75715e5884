"""KFACPINN's options (float64): the lazy Levenberg-Marquardt check takes the same steps as the
eager one, factors refreshed every k steps, a fixed factor damping, KFAC-reduce factors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import beyondgrad as bg

pinn = bg.pinn


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def problem(seed: int = 0) -> pinn.PINNLoss:
    pde = pinn.heat(1)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 1))
    return pinn.PINNLoss(model, pde, pde.sample_interior(25, gen), pde.sample_boundary(15, gen))


def run(opt: pinn.KFACPINN, steps: int) -> tuple[list[float], list[float]]:
    losses, dampings = [], []
    for _ in range(steps):
        losses.append(opt.step())
        dampings.append(opt.damping)
    opt.finish()
    return losses, dampings


@pytest.mark.parametrize("damping", [1e-3, 1e-9])
def test_lazy_check_takes_the_eager_steps(damping: float) -> None:
    eager, lazy = problem(), problem()
    a = pinn.KFACPINN(eager, damping=damping, step_rule="auto", min_damping=1e-12)
    b = pinn.KFACPINN(lazy, damping=damping, step_rule="auto", min_damping=1e-12, lazy=True)
    (la, da), (lb, db) = run(a, 12), run(b, 12)
    # the lazy optimizer adapts one step later: its damping after step k is eager's after k-1
    torch.testing.assert_close(torch.tensor(db[1:]), torch.tensor(da[:-1]))
    torch.testing.assert_close(torch.tensor(lb), torch.tensor(la))
    torch.testing.assert_close(pinn.flatten(lazy.blocks()), pinn.flatten(eager.blocks()))
    assert b.damping == pytest.approx(a.damping)


def test_a_rejected_lazy_step_is_undone() -> None:
    loss = problem()
    opt = pinn.KFACPINN(loss, damping=1e-3, step_rule="auto", lazy=True)
    initial = loss.blocks()
    opt.step()
    loss.set_blocks([p + 10.0 for p in loss.blocks()])  # pretend the pending step went astray
    before = opt.damping
    opt.finish()
    torch.testing.assert_close(pinn.flatten(loss.blocks()), pinn.flatten(initial))
    assert opt.damping == pytest.approx(before * opt.adapt) and opt.previous is None
    opt.finish()  # nothing pending: a no-op
    torch.testing.assert_close(pinn.flatten(loss.blocks()), pinn.flatten(initial))


def test_factors_refresh_every_k_steps_and_fixed_factor_damping() -> None:
    loss = problem()
    opt = pinn.KFACPINN(loss, damping=1e-3, step_rule="auto", update_every=3, factor_damping=1e-2)
    seen = []
    for _ in range(6):
        opt.step()
        seen.append(id(opt.inverses))
    assert seen[0] == seen[1] == seen[2] != seen[3] == seen[4] == seen[5]
    ev = loss.evaluate()
    opt.steps = 0  # force a refresh
    direction = opt.natural_gradient(ev)
    inverses = [pinn.damped_kronecker_sum_inverse(*f, damping=1e-2) for f in opt.factors]
    for d, inv, g in zip(direction, inverses, ev.gradient()):
        torch.testing.assert_close(d, -(inv @ g))


def test_reduce_runs_and_options_are_checked() -> None:
    loss = problem()
    opt = pinn.KFACPINN(loss, damping=1e-3, step_rule="auto", approx="reduce")
    start = float(loss.value().detach())
    for _ in range(8):
        opt.step()
    assert float(loss.value().detach()) < start
    with pytest.raises(ValueError, match="approx"):
        pinn.KFACPINN(loss, approx="both")
    with pytest.raises(ValueError, match="update_every"):
        pinn.KFACPINN(loss, update_every=0)
    with pytest.raises(ValueError, match="approx"):
        loss.evaluate().kfac_factors("both")


def test_cg_refinement_reaches_the_damped_gauss_newton_step() -> None:
    """With as many CG iterations as parameters the first auto step is the exact damped
    Gauss-Newton step ``-(G + lambda I)^{-1} grad`` (dense oracle); one iteration is the plain
    auto rule's ``alpha Delta``."""
    loss = problem()
    ev = loss.evaluate()
    G, g = ev.gramian(), pinn.flatten(ev.gradient())
    lam = 1e-3
    exact = -torch.linalg.solve(G + lam * torch.eye(G.shape[0]), g)
    before = pinn.flatten(loss.blocks())
    opt = pinn.KFACPINN(loss, damping=lam, step_rule="auto", adapt=1.0, cg_steps=3 * g.numel())
    opt.step()
    torch.testing.assert_close(pinn.flatten(loss.blocks()) - before, exact, rtol=1e-6, atol=1e-9)
    one, plain = problem(), problem()
    a = pinn.KFACPINN(one, damping=lam, step_rule="auto", adapt=1.0, cg_steps=1)
    b = pinn.KFACPINN(plain, damping=lam, step_rule="auto", adapt=1.0)
    a.step(), b.step()
    torch.testing.assert_close(pinn.flatten(one.blocks()), pinn.flatten(plain.blocks()))
