"""The Cockpit: instruments computed during an ordinary training step.

::

    cockpit = bg.cockpit.Cockpit(model, loss_fn, config="economy", log_dir="run")
    for step, (X, y) in enumerate(loader):
        opt.zero_grad()
        with cockpit(step, optimizer=opt):
            loss = loss_fn(model(X), y)
            loss.backward()
        opt.step()
    cockpit.plot("run/dashboard.png")

On a tracked step the block records the forward pass; first-order instruments reuse the
layer-output gradients of the ordinary ``loss.backward()`` (no backward pass of their own),
curvature instruments (business, full) backpropagate one Monte-Carlo vector (and Hessian-vector
products for HessMaxEV) when ``loss_fn`` returns, before the ordinary backward. With
``optimizer=`` the update (UpdateSize, Alpha's start point) is measured by a step post-hook;
without it, at the next tracked step. Alpha needs the step after a tracked step, which is
then tracked too (loss and Alpha only). Untracked steps cost nothing.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..engine.compute import capture as engine_capture
from ..linalg import eigsh
from ..linops.base import LinearOperator
from ..quantities import DiagGGN, Forms, GGNEigen
from . import instruments as ins
from .schedules import every

#: per-sample gradients of a layer with positions (convolutions) are materialized once for all
#: statistics when they take at most this many elements (64 MiB in float32)
_MATERIALIZE_BUDGET = 1 << 24

Schedule = Callable[[int], bool]


class Cockpit:
    """Training instruments for any model the engine supports.

    ``config``: ``"economy"``, ``"business"``, ``"full"`` or an iterable of instrument names
    (:data:`~beyondgrad.cockpit.instruments.INSTRUMENTS`). ``schedule``: which steps to track
    (a callable ``step -> bool``, e.g. :func:`~beyondgrad.cockpit.every` or
    :func:`~beyondgrad.cockpit.logarithmic`; default every step). ``log_dir``: write
    ``cockpit.jsonl`` there (one JSON record per tracked step); ``tensorboard=True`` also
    writes TensorBoard scalars (needs the ``tensorboard`` package). ``plot_every``: redraw
    ``log_dir/dashboard.png`` every that many tracked steps. Histograms: ``hist_bins`` bins,
    ``hist_entries`` random per-sample gradient entries per layer from ``hist_samples``
    samples. ``spectra_k``: GGN eigenvalues per layer (LayerSpectra). ``hess_iters``: Lanczos
    iterations for HessMaxEV. ``curvature_mc``: Monte-Carlo samples of the GGN diagonal and
    spectra (``None``: exact, one backward pass per model output).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        config: str | Iterable[str] = "economy",
        schedule: Schedule | None = None,
        log_dir: str | Path | None = None,
        tensorboard: bool = False,
        plot_every: int | None = None,
        hist_bins: int = 40,
        hist_entries: int = 2048,
        hist_samples: int = 8,
        spectra_k: int = 4,
        hess_iters: int = 20,
        curvature_mc: int | None = 1,
        seed: int = 0,
    ):
        if isinstance(config, str):
            if config not in ins.PRESETS:
                raise ValueError(
                    f"unknown config {config!r}; use one of {sorted(ins.PRESETS)} or a list of "
                    "instrument names"
                )
            names = ins.PRESETS[config]
        else:
            names = tuple(config)
            unknown = [n for n in names if n not in ins.INSTRUMENTS]
            if unknown:
                raise ValueError(f"unknown instruments {unknown}; choose from {ins.INSTRUMENTS}")
        if loss_fn.reduction not in ("mean", "sum"):  # type: ignore[operator]
            raise ValueError("the Cockpit needs a loss reduced by 'mean' or 'sum'")
        self.model, self.loss_fn, self.instruments = model, loss_fn, frozenset(names)
        self.config = config if isinstance(config, str) else "custom"
        self.schedule = schedule or every(1)
        self.hist_bins, self.hist_entries, self.hist_samples = hist_bins, hist_entries, hist_samples
        self.spectra_k, self.hess_iters, self.curvature_mc = spectra_k, hess_iters, curvature_mc
        self.generator = torch.Generator().manual_seed(seed)
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.initial = (
            {n: p.detach().clone() for n, p in self.params.items()} if ("Distance" in names) else {}
        )
        self.records: list[dict[str, Any]] = []
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.plot_every = plot_every
        self._log_file = None
        self._tb = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._log_file = open(self.log_dir / "cockpit.jsonl", "a")
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError as err:
                    raise ImportError(
                        "tensorboard=True needs the tensorboard package (pip install tensorboard)"
                    ) from err
                self._tb = SummaryWriter(str(self.log_dir))
        self._hooked: set[int] = set()
        self._update_pending: dict[str, Any] | None = None  # after a tracked step, until update
        self._alpha_start: dict[str, Any] | None = None  # start point of the last update
        self._buffers: list[dict[str, Tensor] | None] = [None, None]  # parameter snapshots
        self._flip = 0

    # -- schedule -----------------------------------------------------------------------------
    def tracks(self, step: int) -> bool:
        """Whether ``step`` is tracked (by the schedule, or as Alpha's end point)."""
        return bool(self.schedule(step)) or self._alpha_end(step)

    def _alpha_end(self, step: int) -> bool:
        return "Alpha" in self.instruments and step > 0 and bool(self.schedule(step - 1))

    # -- the context ----------------------------------------------------------------------------
    @contextmanager
    def __call__(
        self, step: int, optimizer: torch.optim.Optimizer | None = None, **info: Any
    ) -> Iterator[dict[str, Any] | None]:
        """Track ``step`` (if scheduled) around the forward pass and ``loss.backward()``.
        ``optimizer``: measure the update after ``optimizer.step()`` (and log its ``lr``).
        ``info``: extra numbers logged with the step (e.g. ``val_accuracy=...``). Yields the
        step's record (filled when the block exits) or None if the step is not tracked."""
        self._resolve_update(step)
        scheduled = bool(self.schedule(step))
        if not (scheduled or self._alpha_end(step)):
            if info:  # logged even when the instruments are not read
                self.records.append({"step": step, **info})
                self._emit(self.records[-1])
            yield None
            return
        record: dict[str, Any] = {"step": step, **info}
        if optimizer is not None:
            record["lr"] = optimizer.param_groups[0]["lr"]
            self._hook_optimizer(optimizer)
        curvature = scheduled and bool(
            self.instruments & {*ins.CURVATURE, "HessMaxEV", "LayerSpectra"}
        )
        extra: dict[str, Any] = {}
        before = {n: None if p.grad is None else p.grad.clone() for n, p in self.params.items()}
        with ExitStack() as stack:
            if curvature:  # first, so that it runs before the ordinary backward is watched
                self._curvature_hooks(stack, extra)
            session = stack.enter_context(
                engine_capture(self.model, self.loss_fn, Forms(), from_backward=True)
            )
            yield record
        if not session.loss_calls:
            raise RuntimeError(
                "Cockpit: loss_fn was not called inside the `with cockpit(...)` block"
            )
        output, target, loss = session.loss_calls[-1]
        if session.backward_seed is None:
            raise RuntimeError(
                "Cockpit: call loss.backward() inside the `with cockpit(step):` block"
            )
        forms = session.compute(loss)[Forms()]
        seed = session.backward_seed
        unit = bool((seed == 1).all())
        grad_of_loss = {  # this backward's contribution to .grad, per unit of loss
            n: (g if unit else g / seed)
            for n, p in self.params.items()
            if p.grad is not None
            for g in [p.grad if before[n] is None else p.grad - before[n]]
        }
        self._measure(
            record,
            forms,
            grad_of_loss,
            output.detach(),
            target,
            loss.detach(),
            scheduled,
            extra,
            optimizer,
        )
        self.records.append(record)
        self._emit(record)

    # -- measurement ----------------------------------------------------------------------------
    def _measure(
        self,
        record: dict[str, Any],
        forms: dict[str, Any],
        grad_of_loss: dict[str, Tensor],
        output: Tensor,
        target: Tensor,
        loss: Tensor,
        scheduled: bool,
        extra: dict[str, Any],
        optimizer: torch.optim.Optimizer | None,
    ) -> None:
        want = self.instruments if scheduled else frozenset({"Loss", "Alpha"})
        B = output.shape[0]
        c = float(B) if self.loss_fn.reduction == "mean" else 1.0  # type: ignore[operator]
        losses = _individual_losses(self.loss_fn, output, target, loss) * c
        record["Loss"] = float(loss)
        if (
            "Alpha" in want
            and self._alpha_start is not None
            and self._alpha_start["step"] == record["step"] - 1
        ):
            start = self._alpha_start
            df1 = self._directional(forms, start["direction"]) * c
            record["Alpha"] = ins.alpha(start["losses"], start["derivatives"], losses, df1)
            self._alpha_start = None
        if not scheduled:
            return
        l2: Tensor | float = 0.0
        dots: Tensor | float = 0.0
        grads, sgs_all = [], []
        need_entries = bool(want & {"MeanGSNR", "EarlyStopping", "CABS", *ins.CURVATURE})
        need_tests = bool(want & {"NormTest", "InnerTest", "OrthoTest", "GradNoiseScale"})
        reduce = need_entries or need_tests or want & {"GradNorm", "GradHist1d", "GradHist2d"}
        hist_values: list[Tensor] = []
        hist_pairs: list[tuple[Tensor, Tensor]] = []
        reductions = (  # per-sample reductions this step asks of every form
            2 * need_tests
            + need_entries
            + ("Alpha" in want)
            + bool(want & {"GradHist1d", "GradHist2d"})
        )
        for name, form in forms.items() if reduce else ():
            if name in grad_of_loss:  # the ordinary backward already formed it
                form.seed("grad", grad_of_loss[name])
            if reductions > 1 and form.worth_materializing(_MATERIALIZE_BUDGET):
                form.batch_grad()  # (conv layers) one GEMM instead of one per statistic
            g = form.grad()  # mean_n g_n (scaled below only for sum losses: no copy)
            if c != B:
                g = g * (c / B)
            grads.append(g.reshape(-1))
            if need_tests:
                l2 = l2 + form.batch_l2() * c**2
                dots = dots + form.dots_with_sum() * (c * c / B)
            if need_entries:
                sgs_all.append((form.sum_grad_squared() * c**2).reshape(-1))
            if want & {"GradHist1d", "GradHist2d"}:
                rows, flat = self._sample_entries(form, B, g.numel())
                values = form.entries(rows, flat) * c
                hist_values.append(values.detach().cpu())
                if "GradHist2d" in want:
                    hist_pairs.append(
                        (self.params[name].detach().reshape(-1)[flat].cpu(), values.cpu())
                    )
        if grads:
            norms = torch.stack(torch._foreach_norm(grads)).double().cpu()  # one sync
            grad_sq = float((norms**2).sum())
            if "GradNorm" in want:
                record["GradNorm"] = grad_sq**0.5
                record["GradNorm_layers"] = dict(zip(forms, norms.tolist()))
        if need_tests:
            l2_t, dots_t = torch.as_tensor(l2).double().cpu(), torch.as_tensor(dots).double().cpu()
            tests = ins.gradient_tests(B, l2_t, dots_t, grad_sq)
            record.update({k: v for k, v in tests.items() if k in want})
        if "Distance" in want:
            names = list(self.params)
            current = [self.params[n].detach() for n in names]
            moved = torch._foreach_sub(current, [self.initial[n] for n in names])
            dist = torch.stack(torch._foreach_norm(moved)).double().cpu()
            record["Distance"] = float(dist.pow(2).sum().sqrt())
            record["Distance_layers"] = dict(zip(names, dist.tolist()))
        if need_entries:
            grad = torch.cat(grads)
            sgs = torch.cat(sgs_all)
            lr = optimizer.param_groups[0]["lr"] if optimizer is not None else None
            eps = torch.finfo(grad.dtype).eps
            stats = ins.entry_statistics(B, grad.double(), sgs.double(), float(loss), lr, eps)
            record.update({k: v for k, v in stats.items() if k in want})
            if "diag" in extra:
                diag = torch.cat([extra["diag"][n].reshape(-1) for n in forms])
                curv = ins.curvature_statistics(sgs.double(), B, diag.double())
                record.update({k: v for k, v in curv.items() if k in want})
                record["HessTrace_layers"] = {n: float(extra["diag"][n].sum()) for n in forms}
        for key in ("HessMaxEV", "LayerSpectra", "LayerEffectiveRank"):
            if key in extra:
                record[key] = extra[key]
        if hist_values:
            values = torch.cat(hist_values)
            limit = float(values.abs().max()) or 1.0
            if "GradHist1d" in want:
                record["GradHist1d"] = ins.histogram(values, self.hist_bins, limit)
            if "GradHist2d" in want:
                theta = torch.cat([p for p, _ in hist_pairs])
                gvals = torch.cat([v for _, v in hist_pairs])
                t_lim = float(theta.abs().max()) or 1.0
                counts = torch.histogramdd(
                    torch.stack(
                        [theta.float().clamp(-t_lim, t_lim), gvals.float().clamp(-limit, limit)], 1
                    ),
                    bins=[self.hist_bins, self.hist_bins],
                    range=[-t_lim, t_lim, -limit, limit],
                ).hist
                record["GradHist2d"] = {
                    "param_limit": t_lim,
                    "grad_limit": limit,
                    "counts": counts.tolist(),
                }
        if want & {"UpdateSize", "Alpha"}:
            self._update_pending = {
                "record": record,
                "before": self._snapshot(),
                "forms": forms if "Alpha" in want else None,
                "losses": losses,
                "c": c,
            }
            if optimizer is None:
                return
        else:
            self._update_pending = None

    def _snapshot(self) -> dict[str, Tensor]:
        """The parameters copied into one of two reused buffer sets (fresh large allocations
        cost page faults every step; two sets because the previous update stays in use as
        Alpha's direction until the next tracked step has been measured)."""
        self._flip = 1 - self._flip
        buf = self._buffers[self._flip]
        if buf is None or any(
            buf[n].shape != p.shape or buf[n].dtype != p.dtype or buf[n].device != p.device
            for n, p in self.params.items()
        ):
            buf = {
                n: torch.empty_like(p, memory_format=torch.contiguous_format)
                for n, p in self.params.items()
            }
            self._buffers[self._flip] = buf
        torch._foreach_copy_(
            [buf[n] for n in self.params], [p.detach() for p in self.params.values()]
        )
        return buf

    def _sample_entries(self, form: Any, B: int, D: int) -> tuple[Tensor, Tensor]:
        samples = torch.randperm(B, generator=self.generator)[: self.hist_samples]
        E = min(self.hist_entries, len(samples) * D)
        rows = samples[torch.randint(len(samples), (E,), generator=self.generator)]
        flat = torch.randint(D, (E,), generator=self.generator)
        device = next(iter(self.params.values())).device
        return rows.to(device), flat.to(device)

    @staticmethod
    def _directional(forms: dict[str, Any], direction: dict[str, Tensor]) -> Tensor:
        """Per-row inner products with ``direction`` (a tensor per parameter), summed."""
        total = None
        for name, form in forms.items():
            part = form.project(direction[name][None])[:, 0].double()
            total = part if total is None else total + part
        assert total is not None
        return total.cpu()

    def _hook_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        if id(optimizer) in self._hooked:
            return
        self._hooked.add(id(optimizer))
        optimizer.register_step_post_hook(lambda opt, args, kwargs: self._resolve_update(None))

    def _resolve_update(self, step: int | None) -> None:
        """After the update of a tracked step: UpdateSize and Alpha's start point."""
        pending, self._update_pending = self._update_pending, None
        if pending is None:
            return
        record = pending["record"]
        if step is not None and step != record["step"] + 1:
            return  # too late: the parameters moved more than one step
        names = list(self.params)
        # the update, formed in the snapshot's buffers: before - after, negated
        diffs = [pending["before"][n] for n in names]
        torch._foreach_sub_(diffs, [self.params[n].detach() for n in names])
        torch._foreach_neg_(diffs)
        delta = dict(zip(names, diffs))
        if "UpdateSize" in self.instruments:
            sizes = torch.stack(torch._foreach_norm(diffs)).double().cpu()
            record["UpdateSize"] = float(sizes.pow(2).sum().sqrt())
            record["UpdateSize_layers"] = dict(zip(names, sizes.tolist()))
            if self._log_file is not None:  # the record was written before the update
                self._emit({"step": record["step"], "UpdateSize": record["UpdateSize"]})
        if pending["forms"] is not None:
            derivatives = self._directional(pending["forms"], delta) * pending["c"]
            self._alpha_start = {
                "step": record["step"],
                "direction": delta,
                "losses": pending["losses"],
                "derivatives": derivatives,
            }

    # -- curvature (before the ordinary backward) -------------------------------------------------
    def _curvature_hooks(self, stack: ExitStack, extra: dict[str, Any]) -> None:
        quantities: list[Any] = []
        if self.instruments & set(ins.CURVATURE):
            quantities.append(DiagGGN(mc_samples=self.curvature_mc))
        modules = _layer_groups(self.model, self.params)
        if "LayerSpectra" in self.instruments:
            quantities.append(
                GGNEigen(
                    mc_samples=self.curvature_mc,
                    top_k=self.spectra_k,
                    param_groups=tuple(modules.values()),
                )
            )
        session = (
            stack.enter_context(
                engine_capture(self.model, self.loss_fn, *quantities, generator=self.generator)
            )
            if quantities
            else None
        )

        def on_loss(module: nn.Module, args: tuple, loss: Tensor) -> None:
            if not torch.is_grad_enabled() or "done" in extra:
                return
            extra["done"] = True
            if session is not None:
                res = session.compute(loss, retain_graph=True)
                if quantities and isinstance(quantities[0], DiagGGN):
                    extra["diag"] = {n: v.detach() for n, v in res[quantities[0]].items()}
                if "LayerSpectra" in self.instruments:
                    eig = res[quantities[-1]]
                    names = list(modules)
                    extra["LayerSpectra"] = (
                        {names[i]: r.eigenvalues.tolist() for i, r in enumerate(eig.values())}
                        if isinstance(eig, dict)
                        else {}
                    )
                    extra["LayerEffectiveRank"] = {
                        k: ins.effective_rank(torch.tensor(v))
                        for k, v in extra["LayerSpectra"].items()
                    }
            if "HessMaxEV" in self.instruments:
                extra["HessMaxEV"] = self._hess_max_ev(loss)

        handle = self.loss_fn.register_forward_hook(on_loss)
        stack.callback(handle.remove)

    def _hess_max_ev(self, loss: Tensor) -> float:
        params = list(self.params.values())
        try:
            grads = torch.autograd.grad(loss, params, create_graph=True)
        except RuntimeError:
            return float("nan")  # e.g. kernels without double backward
        op = _HessianOfGraph(params, grads)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            values, _ = eigsh(op, k=1, tol=1e-3, max_iter=self.hess_iters, generator=self.generator)
        return float(values[0])

    # -- outputs --------------------------------------------------------------------------------
    def _emit(self, record: dict[str, Any]) -> None:
        if self._log_file is not None:
            self._log_file.write(json.dumps(record) + "\n")
            self._log_file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step" and math.isfinite(value):
                    self._tb.add_scalar(f"cockpit/{key}", value, record["step"])
        if (
            self.plot_every
            and self.log_dir is not None
            and "Loss" in record
            and len(self.records) % self.plot_every == 0
            and record is self.records[-1]
        ):
            self.plot(self.log_dir / "dashboard.png")

    def output(self) -> dict[int, dict[str, Any]]:
        """All tracked steps: ``{step: record}`` (later partial records merged in)."""
        out: dict[int, dict[str, Any]] = {}
        for r in self.records:
            out.setdefault(r["step"], {}).update(r)
        return out

    def plot(self, path: str | Path, title: str | None = None) -> list[Path]:
        """Draw the dashboard to ``path`` (PNG) and the same name with ``.svg``."""
        from .dashboard import draw

        return draw(list(self.output().values()), path, title=title or f"Cockpit ({self.config})")

    def close(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


class _HessianOfGraph(LinearOperator):
    """Hessian-vector products by double backward through a kept gradient graph."""

    symmetric = True

    def __init__(self, params: list[Tensor], grads: tuple[Tensor, ...]):
        n = sum(p.numel() for p in params)
        super().__init__((n, n), params[0].dtype, params[0].device)
        self.params, self.grads = params, grads

    def _matmat(self, M: Tensor) -> Tensor:
        cols = []
        for v in M.T:
            pieces, start = [], 0
            for p in self.params:
                pieces.append(v[start : start + p.numel()].view_as(p))
                start += p.numel()
            hv = torch.autograd.grad(self.grads, self.params, pieces, retain_graph=True)
            cols.append(torch.cat([h.reshape(-1) for h in hv]))
        return torch.stack(cols, 1)


def _layer_groups(model: nn.Module, params: dict[str, Tensor]) -> dict[str, tuple[str, ...]]:
    """Parameter names grouped by the module that owns them (module name -> names)."""
    groups: dict[str, list[str]] = {}
    for name in params:
        module = name.rsplit(".", 1)[0] if "." in name else ""
        groups.setdefault(module, []).append(name)
    return {k: tuple(v) for k, v in groups.items()}


def _individual_losses(loss_fn: nn.Module, output: Tensor, target: Tensor, loss: Tensor) -> Tensor:
    """Per-sample contributions ``c_n`` with ``sum_n c_n = loss`` (``[N]``, float64)."""
    unreduced_fn = copy.copy(loss_fn)
    unreduced_fn.reduction = "none"  # type: ignore[assignment]
    with torch.no_grad():
        per = unreduced_fn(output, target)
    per = per.reshape(per.shape[0], -1).sum(1).double() if per.ndim > 0 else per.double()
    total = float(per.sum())
    scale = float(loss) / total if total != 0 else 1.0
    return (per * scale).cpu()


__all__ = ["Cockpit"]
