"""Optimizers for PINN losses: KFAC with the exact Kronecker-sum inverse, and ENGD.

Both are plain stepping classes (not ``torch.optim.Optimizer``): they own a
:class:`~beyondgrad.pinn.PINNLoss` (model, problem, points) and ``step()`` performs one
iteration and returns the loss before it. Step sizes come either from a line search on a
logarithmic grid (the loss evaluated at every grid point, the best taken) or, for
:class:`KFACPINN` with ``step_rule="auto"``, from Martens & Grosse's automatic learning rate and
momentum: the minimizer of the damped quadratic model over ``alpha * Delta + mu * delta_prev``,
which costs two Gramian-vector products (here Jacobian-vector products of the residuals).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..distributed import group as dist_group
from .kron import KroneckerSumInverse, damped_kronecker_sum_inverse
from .loss import Blocks, Evaluation, PINNLoss, dot, flatten, unflatten

#: the default step sizes of the line search: 2^0, 2^-1, ..., 2^-30
LOG_GRID: tuple[float, ...] = tuple(2.0**-k for k in range(31))


def line_search(loss: PINNLoss, start: Blocks, direction: Blocks, grid: Sequence[float]) -> float:
    """Pick the step size of the grid with the smallest loss and move the model there.

    Args:
        loss: the loss (its model is left at ``start + best * direction``).
        start: blocks, the current parameters.
        direction: blocks, the update direction.
        grid: the step sizes tried.

    Returns:
        The chosen step size.
    """
    best, best_lr = float("inf"), 0.0
    for lr in grid:
        loss.set_blocks([p + lr * d for p, d in zip(start, direction)])
        with torch.no_grad():
            value = float(loss.value())
        if value < best:
            best, best_lr = value, lr
    loss.set_blocks([p + best_lr * d for p, d in zip(start, direction)])
    return best_lr


class KFACPINN:
    """KFAC for PINN losses (Dangel, Mueller & Zeinhofer 2024).

    Per linear layer the Gramian block is approximated by ``B kron A + B_b kron A_b`` (interior:
    KFAC-expand (or -reduce) over the Taylor axis; boundary: standard KFAC; see
    :meth:`Evaluation.kfac_factors`), the factors are averaged over steps (exponential moving
    average) and damped by ``damping`` each; the preconditioned gradient
    ``Delta = -(B~ kron A~ + B~_b kron A~_b)^{-1} grad`` uses the exact inverse of the Kronecker
    sum (:class:`~beyondgrad.pinn.KroneckerSumInverse`), recomputed every ``update_every``
    steps.

    Step rules: ``"line_search"``: ``d = Delta + momentum * d_prev``, step size by the line
    search on ``grid``; ``"auto"``: ``alpha * Delta + mu * update_prev`` with ``alpha``, ``mu``
    minimizing ``1/2 x^T (G + damping I) x + grad^T x`` (the exact Gramian ``G``, two
    Jacobian-vector products), the damping adapted by the Levenberg-Marquardt rule from the
    ratio of the actual to the predicted loss change; a step that increases the loss is undone.
    With ``lazy=True`` the actual loss is the one the next step evaluates anyway (no extra loss
    evaluation; an undone step restores the previous parameters and evaluation, and
    :meth:`finish` judges the last step); with ``lazy=False`` the loss is evaluated right after
    the step.

    Args:
        loss: the :class:`~beyondgrad.pinn.PINNLoss` to minimize.
        damping: added to every Kronecker factor (and to the Gramian of the auto rule).
        ema: weight of the old factors in the moving average (``0``: current factors only).
        momentum: momentum of the line-search rule.
        step_rule: ``"line_search"`` or ``"auto"``.
        grid: the step sizes of the line search.
        adapt: factor of the Levenberg-Marquardt damping adaptation of the auto rule (``1``:
            fixed damping); the damping then stays within ``[min_damping, max_damping]``.
        min_damping: lower bound of the adapted damping.
        max_damping: upper bound of the adapted damping.
        approx: ``"expand"`` or ``"reduce"``, the interior factors' treatment of the Taylor axis.
        update_every: recompute the factors and their inverse every this many steps.
        lazy: judge an auto step with the next step's loss evaluation (see above).
        factor_damping: a fixed damping of the Kronecker factors (``None``: the current,
            possibly adapted, ``damping``).
        cg_steps: with the auto rule and ``cg_steps > 1``, the direction is ``cg_steps``
            iterations of conjugate gradients on the damped Gauss-Newton system
            ``(G + damping I) x = -grad`` with the exact Gramian (one Jacobian-vector and one
            transpose product per iteration), preconditioned by the KFAC inverse, from
            ``x = 0`` (the first iterate is the auto rule's ``alpha Delta``); the automatic
            learning rate and momentum then combine it with the previous update.
        per_layer: the auto rule's learning rate and momentum per layer (``2 L`` coefficients
            from the exact Gramian restricted to the span of the layers' parts of the
            direction and the previous update; the same Jacobian-vector products). Pair it
            with a fixed ``factor_damping`` (``benchmarks/pinn.py`` uses ``1e-5``; see
            ``docs/pinn.md``).
    """

    def __init__(
        self,
        loss: PINNLoss,
        damping: float = 1e-6,
        ema: float = 0.95,
        momentum: float = 0.3,
        step_rule: str = "line_search",
        grid: Sequence[float] = LOG_GRID,
        adapt: float = 3.0,
        min_damping: float = 1e-10,
        max_damping: float = 1e4,
        approx: str = "expand",
        update_every: int = 1,
        lazy: bool = False,
        factor_damping: float | None = None,
        per_layer: bool = False,
        cg_steps: int = 0,
    ) -> None:
        if step_rule not in ("line_search", "auto"):
            raise ValueError(f"step_rule must be 'line_search' or 'auto', got {step_rule!r}")
        if approx not in ("expand", "reduce") or update_every < 1 or cg_steps < 0:
            raise ValueError(
                f"need approx 'expand'/'reduce', update_every >= 1, cg_steps >= 0: {approx!r}"
            )
        dist_group.refuse_rank_local("bg.pinn.KFACPINN")  # no reduction over ranks
        self.loss, self.damping, self.ema, self.momentum = loss, damping, ema, momentum
        self.step_rule, self.grid = step_rule, tuple(grid)
        self.adapt, self.min_damping, self.max_damping = adapt, min_damping, max_damping
        self.approx, self.update_every, self.lazy = approx, update_every, lazy
        self.factor_damping, self.per_layer = factor_damping, per_layer
        self.cg_steps = cg_steps
        self.factors: list[list[Tensor]] | None = None
        self.inverses: list[KroneckerSumInverse] | None = None
        self.previous: Blocks | None = None
        self._pending: tuple[Evaluation, Blocks, Blocks, float] | None = None
        self.steps = 0

    def _update_factors(self, ev: Evaluation) -> list[KroneckerSumInverse]:
        if self.inverses is not None and self.steps % self.update_every != 0:
            return self.inverses
        new = [list(f) for f in ev.kfac_factors(self.approx)]
        if self.factors is None:
            self.factors = new
        else:
            self.factors = [
                [self.ema * old + (1 - self.ema) * cur for old, cur in zip(olds, curs)]
                for olds, curs in zip(self.factors, new)
            ]
        damping = self.damping if self.factor_damping is None else self.factor_damping
        self.inverses = [damped_kronecker_sum_inverse(*f, damping=damping) for f in self.factors]
        return self.inverses

    def natural_gradient(self, ev: Evaluation) -> Blocks:
        """Update the factors (every ``update_every`` steps) and return
        ``Delta = -(KFAC)^{-1} grad``.

        Args:
            ev: the evaluation at the current parameters.

        Returns:
            Blocks ``[out, in + 1]`` per layer.
        """
        return self._precondition(ev, ev.gradient())

    def _precondition(self, ev: Evaluation, grad: Blocks) -> Blocks:
        inverses = self._update_factors(ev)
        return [-(inv @ g) for inv, g in zip(inverses, grad)]

    def _refine(self, ev: Evaluation, grad: Blocks, delta: Blocks) -> Blocks:
        """``cg_steps`` iterations of conjugate gradients on ``(G + damping I) x = -grad``
        (the exact Gramian, one Jacobian-vector and one transpose product each) preconditioned
        by the KFAC inverse, from ``x = 0``; the first iteration's direction is ``delta``."""
        x = [torch.zeros_like(d) for d in delta]
        res, z = [-g for g in grad], delta  # residual -grad - (G + lambda) x, preconditioned
        p, rz = delta, dot(res, delta)
        for it in range(self.cg_steps):
            Gp = ev.gramian_vector_product(p)
            Ap = [a + self.damping * b for a, b in zip(Gp, p)]
            pAp = dot(p, Ap)
            if not bool(pAp > 0) or not bool(rz > 0):
                break
            alpha = rz / pAp
            x = [a + alpha * b for a, b in zip(x, p)]
            if it + 1 == self.cg_steps:
                break
            res = [a - alpha * b for a, b in zip(res, Ap)]
            z = [-(inv @ r) for inv, r in zip(self.inverses or [], [-r for r in res])]
            rz_new = dot(res, z)
            p, rz = [a + (rz_new / rz) * b for a, b in zip(z, p)], rz_new
        return x

    def _auto(self, ev: Evaluation, grad: Blocks, delta: Blocks) -> tuple[Blocks, float]:
        """Martens' automatic step: ``alpha delta + mu previous`` minimizing the quadratic model
        (with ``per_layer``: one ``alpha`` and ``mu`` per layer, from the same products).

        Returns the update and the model's predicted change of the loss (undamped Gramian).
        """
        if self.cg_steps > 1:
            delta = self._refine(ev, grad, delta)
        dirs = [delta] if self.previous is None else [delta, self.previous]
        terms = ev.layer_jvps(dirs)  # per layer ([k, N], [k, N_b]): every product in one pass
        L = len(delta)
        if self.per_layer:  # direction (l, j): dirs[j] restricted to layer l
            Jv = torch.cat([t[0] for t in terms])  # [L k, N]
            Jbv = torch.cat([t[1] for t in terms])
            blocks = [[v[layer] for v in dirs] for layer in range(L)]
            Dl = [
                torch.stack([torch.stack([(a * b).sum() for b in bl]) for a in bl]) for bl in blocks
            ]
            D = torch.block_diag(*Dl)
            lin = torch.stack(
                [(grad[layer] * b).sum() for layer in range(L) for b in blocks[layer]]
            )
        else:
            Jv, Jbv = sum(t[0] for t in terms), sum(t[1] for t in terms)
            D = torch.stack([torch.stack([dot(a, b) for b in dirs]) for a in dirs])
            lin = torch.stack([dot(grad, v) for v in dirs])
        Q = Jv @ Jv.T / Jv.shape[1] + Jbv @ Jbv.T / Jbv.shape[1]  # type: ignore[union-attr]
        coef = torch.linalg.lstsq(Q + self.damping * D, -lin[:, None]).solution[:, 0]
        predicted = float(0.5 * coef @ Q @ coef + lin @ coef)
        k = len(dirs)
        C = coef.reshape(L, k) if self.per_layer else coef.expand(L, k)
        update = [sum(C[layer, j] * v[layer] for j, v in enumerate(dirs)) for layer in range(L)]
        return update, predicted  # type: ignore[return-value]

    def _judge(self, before: float, after: float, predicted: float) -> bool:
        """Levenberg-Marquardt: ``rho < 1/4`` raises the damping, ``rho > 3/4`` lowers it (by
        ``self.adapt``). Returns whether the step is accepted (the loss did not increase)."""
        actual = after - before
        rho = actual / predicted if predicted < 0 else -1.0
        if rho < 0.25:
            self.damping = min(self.damping * self.adapt, self.max_damping)
        elif rho > 0.75:
            self.damping = max(self.damping / self.adapt, self.min_damping)
        return actual <= 0

    def _auto_step(self, ev: Evaluation, start: Blocks, grad: Blocks, delta: Blocks) -> None:
        """Take the automatic step; judge it now (eager) or at the next evaluation (lazy)."""
        update, predicted = self._auto(ev, grad, delta)
        self.loss.set_blocks([p + u for p, u in zip(start, update)])
        self.previous = update
        if self.adapt == 1.0:
            return
        if self.lazy:
            self._pending = (ev, start, update, predicted)
            return
        with torch.no_grad():
            after = float(self.loss.value())
        if not self._judge(ev.loss, after, predicted):  # rejected: back, no momentum
            self.loss.set_blocks(start)
            self.previous = None

    def _resolve(self, ev: Evaluation | None) -> Evaluation | None:
        """Judge the pending lazy step with the evaluation ``ev`` after it (``None``: evaluate
        the loss); an undone step returns the evaluation before it."""
        if self._pending is None:
            return ev
        before_ev, start, _, predicted = self._pending
        self._pending = None
        if ev is None:
            with torch.no_grad():
                after = float(self.loss.value())
        else:
            after = ev.loss
        if self._judge(before_ev.loss, after, predicted):
            return ev
        self.loss.set_blocks(start)
        self.previous = None
        return before_ev

    def finish(self) -> None:
        """Judge a pending lazy step (undo it if it increased the loss); a no-op otherwise.
        Call it after the last :meth:`step` of a lazy run."""
        self._resolve(None)

    def step(self) -> float:
        """One iteration.

        Returns:
            The loss before the step.
        """
        ev = self._resolve(self.loss.evaluate())
        assert ev is not None
        grad = ev.gradient()
        delta = self._precondition(ev, grad)
        start = self.loss.blocks()
        if self.step_rule == "auto":
            self._auto_step(ev, start, grad, delta)
        else:
            if self.previous is not None:
                delta = [d + self.momentum * p for d, p in zip(delta, self.previous)]
            line_search(self.loss, start, delta, self.grid)
            self.previous = delta
        self.steps += 1
        return ev.loss


class ENGD:
    """Energy natural gradient descent (Mueller & Zeinhofer 2023): the exact Gramian, a damped
    solve and a line search; ``O(P^3)`` per step, for small networks only.

    The direction is ``-(G + damping I)^{-1} grad`` (least squares when ``damping == 0``).

    Args:
        loss: the :class:`~beyondgrad.pinn.PINNLoss` to minimize.
        damping: added to the Gramian's diagonal.
        grid: the step sizes of the line search.
    """

    def __init__(
        self, loss: PINNLoss, damping: float = 1e-10, grid: Sequence[float] = LOG_GRID
    ) -> None:
        dist_group.refuse_rank_local("bg.pinn.ENGD")  # no reduction over ranks
        self.loss, self.damping, self.grid, self.steps = loss, damping, tuple(grid), 0

    def direction(self, ev: Evaluation) -> Blocks:
        """The damped Gauss-Newton direction.

        Args:
            ev: the evaluation at the current parameters.

        Returns:
            Blocks ``[out, in + 1]`` per layer.
        """
        grad = ev.gradient()
        G = ev.gramian()
        G = G + self.damping * torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
        g = flatten(grad)
        step = torch.linalg.lstsq(G, g[:, None], driver="gelsd" if G.device.type == "cpu" else None)
        return unflatten(-step.solution[:, 0], grad)

    def step(self) -> float:
        """One iteration.

        Returns:
            The loss before the step.
        """
        ev = self.loss.evaluate()
        line_search(self.loss, self.loss.blocks(), self.direction(ev), self.grid)
        self.steps += 1
        return ev.loss
