"""What KFAC, SINGD and SIRFShampoo share: the torch optimizer shell, routing of parameters to
the preconditioner or to an AdamW fallback, collection of Kronecker statistics from the
engine, data-parallel reduction, the parameter update (decoupled weight decay, momentum) and
a ``state_dict`` that resumes bit-identically.

The training loop is the ordinary one plus one ``with`` line around the forward pass (which
records the layer inputs and, on statistics steps, backpropagates the curvature vectors)::

    for X, y in loader:
        opt.zero_grad()
        with opt.capture():
            loss = loss_fn(model(X), y)
        loss.backward()
        opt.step()

Gradient accumulation: several ``capture`` + ``backward`` blocks before one ``step``; the
statistics are averaged over all their samples. ``torch.amp.GradScaler``: use
``scaler.step(opt)`` as usual (the statistics come from the unscaled loss). Data parallel
(``torch.distributed`` initialized): statistics are averaged over ranks, weighted by their
sample counts; gradients too unless the model is wrapped in ``DistributedDataParallel``
(which already averages them).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer

from ..engine.capture import plan_units
from ..engine.compute import capture as engine_capture
from ..factors import KroneckerFactors
from ..quantities import KFAC as KFACQuantity

ADAMW_DEFAULTS: dict[str, Any] = {
    "adam_lr": 1e-3,
    "adam_betas": (0.9, 0.999),
    "adam_eps": 1e-8,
    "precondition": True,
}


def distributed_world() -> int:
    """Number of ranks when ``torch.distributed`` is initialized, else 1."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _is_ddp(model: nn.Module) -> bool:
    return isinstance(model, nn.parallel.DistributedDataParallel)


class CurvatureOptimizer(Optimizer):
    """Base class (not used directly). ``model``: the network (module hooks record layer
    inputs). ``params``: parameters or param groups (default: all of ``model``'s trainable
    parameters); a group with ``precondition=False`` goes to the AdamW fallback. Every
    parameter the method cannot precondition also goes there, never left untrained;
    :meth:`routing` reports where each one went and why."""

    method = "base"

    def __init__(
        self,
        model: nn.Module,
        params: Iterable[Any] | None,
        defaults: dict[str, Any],
        loss_fn: nn.Module | None = None,
        seed: int = 0,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
        for key, value in ADAMW_DEFAULTS.items():
            defaults.setdefault(key, value)
        super().__init__(params, defaults)
        self.model, self.loss_fn, self.seed = model, loss_fn, seed
        self.names = {id(p): n for n, p in model.named_parameters()}
        for group in self.param_groups:
            for p in group["params"]:
                if id(p) not in self.names:
                    raise ValueError("every optimized parameter must belong to `model`")
            _check_common(group)
        self.steps = 0
        self.layers: dict[str, dict[str, Any]] = {}  # per-layer preconditioner state
        self._pending: dict[str, list[Any]] = {}  # statistics since the last step
        self.routes: dict[str, tuple[str, str]] = {}  # parameter name -> (target, reason)
        self._group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        self._refused: dict[str, str] = {}

    # -- routing ------------------------------------------------------------------------------
    def routing(self) -> str:
        """A table: every optimized parameter, where it goes (the method or ``adamw``), why."""
        width = max((len(n) for n in self.routes), default=4)
        lines = [f"{'parameter':<{width}}  {'update':<12}  reason"]
        for name, (target, reason) in self.routes.items():
            lines.append(f"{name:<{width}}  {target:<12}  {reason}")
        return "\n".join(lines)

    def _route(self, preconditioned: dict[str, str]) -> None:
        """``preconditioned``: parameter name -> reason, for those the method takes."""
        for group in self.param_groups:
            for p in group["params"]:
                name = self.names[id(p)]
                if not group["precondition"]:
                    self.routes[name] = ("adamw", "its param group has precondition=False")
                elif name in preconditioned:
                    self.routes[name] = (self.method, preconditioned[name])
                else:
                    self.routes[name] = ("adamw", self._why_not(name))

    def _why_not(self, name: str) -> str:
        return self._refused.get(name, f"{self.method} has no rule for it")

    def _take_layers(self, layers: dict[str, tuple[str, ...]], refused: dict[str, str]) -> None:
        """Precondition these layers (module name -> weight and bias names) when all their
        parameters are optimized in one group with ``precondition=True``; route the rest."""
        self._refused = dict(refused)
        named = dict(self.model.named_parameters())
        taken: dict[str, str] = {}
        for name, pnames in layers.items():
            members = [named[n] for n in pnames]
            groups = {id(self._group_of[id(p)]) for p in members if id(p) in self._group_of}
            if len(groups) != 1 or any(id(p) not in self._group_of for p in members):
                for n in pnames:
                    self._refused[n] = "its layer's weight and bias are not in one param group"
                continue
            if not self._group_of[id(members[0])]["precondition"]:
                continue
            self.layers[name] = {"params": pnames}
            taken.update({n: f"Kronecker factors of layer '{name}'" for n in pnames})
        self._route(taken)

    def _preconditioned(self, p: Tensor) -> bool:
        return self.routes[self.names[id(p)]][0] == self.method

    # -- statistics ---------------------------------------------------------------------------
    def _stats_quantity(self) -> KFACQuantity | None:
        """The engine quantity whose Kronecker factors feed the method (None: gradients only)."""
        return None

    def _stats_due(self) -> bool:
        return False

    @contextmanager
    def capture(self) -> Iterator[CurvatureOptimizer]:
        """Wrap the forward pass (model call and ``loss_fn`` call) of every training step.
        On statistics steps, this backpropagates the curvature vectors when the block exits
        (the forward graph is kept for the ordinary ``loss.backward()``)."""
        quantity = self._stats_quantity()
        if quantity is None or not self._stats_due():
            yield self
            return
        device = next(self.model.parameters()).device
        generator = torch.Generator(device=device).manual_seed(
            self.seed * 1_000_003 + self.steps * 101 + len(self._pending.get("_calls", []))
        )
        with engine_capture(self.model, self.loss_fn, quantity, generator=generator) as session:
            yield self
        if not session.loss_calls:
            raise RuntimeError(
                f"{type(self).__name__}.capture(): loss_fn was not called inside the block; "
                "compute the loss there (loss = loss_fn(model(X), y))"
            )
        result = session.compute(session.loss_calls[-1][2], retain_graph=True)
        self._pending.setdefault("_calls", []).append(1)
        blocks = result[quantity]
        if self.steps == 0 and len(self._pending["_calls"]) == 1:
            self._drop_layers_without_stats(blocks)
        for name, block in blocks.items():
            if name in self.layers and isinstance(block, KroneckerFactors):
                N = block.num_data
                part = [block.A * N, block.B * N, N]
                acc = self._pending.get(name)
                self._pending[name] = (
                    part if acc is None else [acc[0] + part[0], acc[1] + part[1], acc[2] + N]
                )
                self.layers[name].setdefault("order", block.order)
                self.layers[name].setdefault("weight_perm", block.weight_perm)

    def _drop_layers_without_stats(self, blocks: dict[str, Any]) -> None:
        """After the first captured forward pass: layers that got no Kronecker block (not
        called as modules, e.g. applied functionally by a parent) go to the AdamW fallback."""
        for name in [n for n in self.layers if not isinstance(blocks.get(n), KroneckerFactors)]:
            for pname in self.layers.pop(name)["params"]:
                self.routes[pname] = ("adamw", "no Kronecker statistics in the first step")

    def _consume_stats(self) -> dict[str, tuple[Tensor, Tensor]]:
        """The statistics since the last step, averaged over samples (and ranks); checked."""
        pending, self._pending = self._pending, {}
        pending.pop("_calls", None)
        names = sorted(self.layers)
        have = [n for n in names if n in pending]
        world = distributed_world()
        if world > 1:  # every rank must reduce the same tensors
            flags = torch.tensor([n in pending for n in names], dtype=torch.float64)
            dist.all_reduce(flags, op=dist.ReduceOp.MIN)
            have = [n for n, f in zip(names, flags.tolist()) if f > 0]
        stats: dict[str, tuple[Tensor, Tensor]] = {}
        for name in have:
            A_sum, B_sum, N = pending[name]
            count = torch.tensor(float(N), dtype=A_sum.dtype, device=A_sum.device)
            if world > 1:
                for t in (A_sum, B_sum, count):
                    dist.all_reduce(t)
            A, B = A_sum / count, B_sum / count
            if not (bool(torch.isfinite(A).all()) and bool(torch.isfinite(B).all())):
                raise FloatingPointError(
                    f"{type(self).__name__}: non-finite curvature statistics in layer '{name}'; "
                    "the optimizer state was left unchanged (lower the learning rate, clip "
                    "gradients or check the data)"
                )
            stats[name] = (A, B)
        return stats

    def _sync_grads(self) -> None:
        if distributed_world() == 1 or _is_ddp(self.model):
            return
        world = distributed_world()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad.div_(world)

    # -- the update ---------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        """One update of every parameter (preconditioned ones and the AdamW fallback)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._sync_grads()
        stats = self._consume_stats()
        self._check_grads()
        self._precondition_step(stats)
        self._adamw_step()
        self.steps += 1
        return loss

    def _check_grads(self) -> None:
        named = [(p, p.grad) for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not named:
            return
        finite = torch.stack([torch.isfinite(grad).all() for _, grad in named])
        if bool(finite.all()):  # one synchronization for all parameters
            return
        bad = [self.names[id(p)] for (p, _), ok in zip(named, finite.tolist()) if not ok]
        raise FloatingPointError(
            f"{type(self).__name__}: non-finite gradient of {', '.join(repr(b) for b in bad)}; "
            "the optimizer state was left unchanged (with mixed precision, step through "
            "torch.amp.GradScaler.step, which skips such steps)"
        )

    def _precondition_step(self, stats: dict[str, tuple[Tensor, Tensor]]) -> None:
        raise NotImplementedError

    def _apply(self, p: Tensor, direction: Tensor, group: dict[str, Any]) -> None:
        """``p <- p (1 - lr wd) - lr buf`` with ``buf <- momentum buf + direction``."""
        lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
        if wd:
            p.mul_(1 - lr * wd)
        if mu:
            state = self.state[p]
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = direction.clone()
            else:
                buf.mul_(mu).add_(direction)
            direction = buf
        p.add_(direction.to(p.dtype), alpha=-lr)

    def _adamw_step(self) -> None:
        """AdamW (decoupled weight decay, bias correction) for every parameter routed there.
        Its learning rate ``adam_lr`` follows schedulers: it is scaled by ``lr/initial_lr``."""
        for group in self.param_groups:
            scale = group["lr"] / group["initial_lr"] if group.get("initial_lr") else 1.0
            lr = group["adam_lr"] * scale
            beta1, beta2 = group["adam_betas"]
            for p in group["params"]:
                if p.grad is None or self._preconditioned(p):
                    continue
                state = self.state[p]
                if "exp_avg" not in state:
                    state["adam_step"] = torch.zeros((), dtype=torch.float64)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["adam_step"] += 1
                t = float(state["adam_step"])
                g = p.grad
                state["exp_avg"].lerp_(g, 1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
                denom = (state["exp_avg_sq"] / (1 - beta2**t)).sqrt_().add_(group["adam_eps"])
                if group["weight_decay"]:
                    p.mul_(1 - lr * group["weight_decay"])
                p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1**t))

    # -- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        layers = {
            name: {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in state.items()}
            for name, state in self.layers.items()
        }
        sd["beyondgrad"] = {"steps": self.steps, "layers": layers, "method": self.method}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        sd = dict(state_dict)
        extra = sd.pop("beyondgrad", None)
        if extra is None or extra.get("method") != self.method:
            raise ValueError(
                f"not a {type(self).__name__} state_dict (saved by "
                f"{None if extra is None else extra.get('method')!r})"
            )
        super().load_state_dict(sd)
        self.steps = extra["steps"]
        device = next(self.model.parameters()).device
        for name, state in extra["layers"].items():
            if name not in self.layers:
                raise ValueError(f"the state_dict has layer '{name}' which this model lacks")
            self.layers[name] = {
                k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in state.items()
            }

    def optimizer_state_bytes(self) -> int:
        """Bytes held by the optimizer state (preconditioners, momenta, AdamW moments)."""
        total = 0
        for state in list(self.state.values()) + list(self.layers.values()):
            for v in state.values():
                for t in v if isinstance(v, (tuple, list)) else (v,):
                    if isinstance(t, Tensor):
                        total += t.numel() * t.element_size()
        return total


def _check_common(group: dict[str, Any]) -> None:
    if group["lr"] < 0 or not math.isfinite(group["lr"]):
        raise ValueError(f"lr must be a finite non-negative number, got {group['lr']}")
    if group["weight_decay"] < 0:
        raise ValueError(f"weight_decay must be non-negative, got {group['weight_decay']}")
    if not 0 <= group["momentum"] < 1:
        raise ValueError(f"momentum must be in [0, 1), got {group['momentum']}")
    if group["adam_lr"] < 0:
        raise ValueError(f"adam_lr must be non-negative, got {group['adam_lr']}")


def kronecker_layers(
    model: nn.Module, rules: tuple[str, ...], accept: Callable[[nn.Module], str | None]
) -> tuple[dict[str, tuple[str, ...]], dict[str, str]]:
    """Layers a Kronecker method can precondition: ``(module name -> its parameter names,
    parameter name -> why it cannot be)``. ``rules``: accepted engine rule names;
    ``accept(module)`` returns a reason to refuse or None. Parameters shared by several
    modules (tied weights) are refused."""
    units = plan_units(model)
    counts: dict[int, int] = {}
    for u in units:
        for p in u.params.values():
            counts[id(p)] = counts.get(id(p), 0) + 1
    names = {id(p): n for n, p in model.named_parameters()}
    inside_attention = {
        id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)
    }
    layers, refused = {}, {}
    for u in units:
        kind = type(u.module).__name__
        if id(u.module) in inside_attention:
            reason = "MultiheadAttention.out_proj is applied functionally (no layer call)"
        elif u.rule is None or u.rule.name not in rules or "weight" not in u.params:
            reason = f"no Kronecker rule for {kind}"
        elif set(u.params) - {"weight", "bias"}:
            reason = f"{kind} has parameters besides weight and bias"
        elif any(counts[id(p)] > 1 for p in u.params.values()):
            reason = "shared by several modules (tied weights)"
        else:
            reason = accept(u.module)
        pnames = tuple(names[id(p)] for p in u.params.values())
        if reason is None:
            layers[u.name] = tuple(
                names[id(u.params[k])] for k in ("weight", "bias") if k in u.params
            )
        else:
            for n in pnames:
                refused.setdefault(n, reason)
    return layers, refused


__all__ = ["CurvatureOptimizer", "distributed_world", "kronecker_layers"]
