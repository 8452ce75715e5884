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

Each instrument (:class:`~beyondgrad.cockpit.instruments.Instrument`) declares the shared
reductions it needs; per tracked step the Cockpit computes the union of those once
(:mod:`~beyondgrad.cockpit.reductions`), then evaluates every instrument's formula.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..buffers import BufferPool
from ..distributed import group as dist_group
from ..distributed.fsdp import refuse_sharded
from . import curvature as cv
from . import dashboard
from . import reductions as r
from . import state as st
from ._engine import SamplesCoupled, StepWatch, samples_coupled, watch_step
from .drawing import Drawer
from .instruments import REGISTRY, Instrument, resolve
from .runlog import RunLog, wandb_module
from .schedules import every
from .updates import Armed, GradStep, UpdateTracker
from .workspace import Workspace

Schedule = Callable[[int], bool]
_LOSS = REGISTRY["Loss"]  # logged on every tracked step
#: reductions read from the per-sample rows after the backward (not the curvature ones)
_ROW_NEEDS = r.PER_SAMPLE - r.CURVATURE
#: reductions formed in one pass over the layers
_LAYER_NEEDS = frozenset({r.GRAD, r.BATCH_L2, r.DOTS, r.SGS, r.ENTRIES})


@dataclass
class _Plan:
    """What one tracked step computes: the instruments kept and the union of their needs."""

    scheduled: bool
    instruments: list[Instrument]
    needs: frozenset[str]
    coupled: bool
    dropped: dict[str, str] = field(default_factory=dict)


def _check_arguments(
    model: nn.Module, loss_fn: nn.Module, hist_quantile: float, on_undefined: str
) -> None:
    """Raise on invalid settings; a clear error for an FSDP2 model (the instruments need
    whole parameters) and, under ``torch.distributed`` with several ranks, outside
    ``bg.distributed.rank_local()`` (the instruments would be those of this rank's batches
    alone)."""
    if loss_fn.reduction not in ("mean", "sum"):  # type: ignore[operator]
        raise ValueError("the Cockpit needs a loss reduced by 'mean' or 'sum'")
    if not 0 < hist_quantile <= 1:
        raise ValueError(f"hist_quantile must be in (0, 1], got {hist_quantile}")
    if on_undefined not in ("drop", "raise"):
        raise ValueError(f"on_undefined must be 'drop' or 'raise', got {on_undefined!r}")
    refuse_sharded(model.parameters(), "bg.cockpit.Cockpit")
    dist_group.refuse_rank_local("bg.cockpit.Cockpit")


class Cockpit:
    """Training instruments for any model the engine supports.

    Args:
        model: the trained model.
        loss_fn: its loss module (``reduction="mean"`` or ``"sum"``).
        config: ``"economy"``, ``"business"``, ``"full"`` or an iterable of instrument names
            (:data:`~beyondgrad.cockpit.instruments.INSTRUMENTS`) and/or
            :class:`~beyondgrad.cockpit.instruments.Instrument` objects.
        schedule: which steps to track (``step -> bool``, e.g. :func:`~beyondgrad.cockpit.every`
            or :func:`~beyondgrad.cockpit.logarithmic`; default every step).
        log_dir: write ``cockpit.jsonl`` there (one JSON record per tracked step).
        tensorboard: also write TensorBoard scalars (needs the ``tensorboard`` package).
        plot_every: redraw ``log_dir/dashboard.png`` every that many tracked steps, in a
            background thread that never blocks a step (a newer request replaces one still
            waiting), and once more at :meth:`close`.
        hist_bins: bins of the gradient histograms.
        hist_entries: random per-sample gradient entries per layer in the histograms ...
        hist_samples: ... drawn from that many samples.
        spectra_k: GGN eigenvalues per layer (LayerSpectra).
        hess_iters: at most that many Lanczos iterations (Hessian-vector products) for
            HessMaxEV, warm-started from the last tracked step's eigenvector.
        hess_tol: HessMaxEV's Lanczos stops once the top Ritz pair's residual is below
            ``hess_tol`` times the eigenvalue (the value is then accurate to about
            ``hess_tol**2`` relative to the spectral gap; 1e-2 needed 9-11 products per
            tracked step on the benchmarks' cnn, within 0.05% of a tight solve).
        curvature_mc: Monte-Carlo samples of the GGN diagonal and spectra (``None``: exact,
            one backward pass per model output).
        seed: seeds the Cockpit's own generator (histogram entries, MC vectors, Lanczos).
        on_undefined: what to do on a step where an instrument is undefined or cannot be
            computed exactly (per-sample instruments on a model that couples its samples,
            e.g. BatchNorm in train mode; HessMaxEV through an operation without an exact
            second derivative): ``"drop"`` (default) leaves it out of that step's record,
            lists it under the record's ``"dropped"`` key and in :attr:`dropped`, and warns
            once per reason; ``"raise"`` raises a ``RuntimeError`` naming the reason.
        targets: ``{metric: target}`` (e.g. ``{"val_accuracy": 0.97}``), drawn as dashed
            lines in the dashboard's metric panels.
        hist_quantile: the gradient histograms span this quantile of the sampled entries'
            magnitudes (entries beyond fall in the edge bins; 1: the largest entry).
        wandb: log the numbers to Weights & Biases (``cockpit/<name>`` at the step): None
            (default) when the program has imported ``wandb`` and a run is active; True:
            required; False: never.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        config: str | Iterable[str | Instrument] = "economy",
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
        on_undefined: str = "drop",
        targets: dict[str, float] | None = None,
        hist_quantile: float = 0.99,
        wandb: bool | None = None,
        hess_tol: float = 1e-2,
    ):
        selected = resolve(config)
        _check_arguments(model, loss_fn, hist_quantile, on_undefined)
        if not 0 < hess_tol < 1:
            raise ValueError(f"hess_tol must be in (0, 1), got {hess_tol}")
        self.model, self.loss_fn, self.selected = model, loss_fn, selected
        self.instruments = frozenset(i.name for i in selected)
        self.config = config if isinstance(config, str) else "custom"
        self.schedule = schedule or every(1)
        self.on_undefined = on_undefined
        self.settings = r.Settings(hist_bins, hist_entries, hist_samples, hist_quantile)
        self.targets = dict(targets or {})
        self.curvature = cv.CurvatureSettings(spectra_k, hess_iters, curvature_mc, hess_tol)
        self.generator = torch.Generator().manual_seed(seed)
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        wants_distance = any(r.DISTANCE in i.needs for i in selected)
        self.initial = (
            {n: p.detach().clone() for n, p in self.params.items()} if wants_distance else {}
        )
        self.records: list[dict[str, Any]] = []
        #: instruments left out at the last step that dropped any, with the reason
        self.dropped: dict[str, str] = {}
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.plot_every = plot_every
        run = wandb_module(wandb)
        self._log = (
            RunLog(self.log_dir, tensorboard and self.log_dir is not None, run)
            if self.log_dir is not None or run is not None
            else None
        )
        self._warned: set[str] = set()
        self._hooked: set[int] = set()
        self._updates = UpdateTracker(self.params)
        self._alpha_start: dict[str, Any] | None = None  # start point of the last update
        self._drawer = Drawer()
        self._distance_buffer: list[Tensor] | None = None
        self._workspace = Workspace()  # model-sized temporaries reused across steps
        self._pool = BufferPool()  # the rows' large intermediates, reused across steps
        self._unreduced_fn: nn.Module | None = None

    # -- schedule -----------------------------------------------------------------------------
    def tracks(self, step: int) -> bool:
        """Whether ``step`` is tracked (by the schedule, or as Alpha's end point)."""
        return bool(self.schedule(step)) or self._next_step_end(step)

    def _next_step_end(self, step: int) -> bool:
        return (
            any(i.next_step for i in self.selected) and step > 0 and bool(self.schedule(step - 1))
        )

    # -- the context ----------------------------------------------------------------------------
    @contextmanager
    def __call__(
        self, step: int, optimizer: torch.optim.Optimizer | None = None, **info: Any
    ) -> Iterator[dict[str, Any] | None]:
        """Track ``step`` (if scheduled) around the forward pass and ``loss.backward()``.

        Args:
            step: the training step (the schedule's argument).
            optimizer: measure the update after ``optimizer.step()`` (and log its ``lr``).
            **info: extra numbers logged with the step (e.g. ``val_accuracy=...``).

        Yields:
            The step's record (filled when the block exits), or None if not tracked.
        """
        self._resolve_update(step)
        scheduled = bool(self.schedule(step))
        if not (scheduled or self._next_step_end(step)):
            if info:  # logged even when the instruments are not read
                self.records.append({"step": step, **info})
                self._emit(self.records[-1])
            yield None
            return
        record: dict[str, Any] = {"step": step, **info}
        if optimizer is not None:
            record["lr"] = optimizer.param_groups[0]["lr"]
            self._hook_optimizer(optimizer)
        plan = self._plan(scheduled)
        before = {n: None if p.grad is None else p.grad.clone() for n, p in self.params.items()}
        with ExitStack() as stack:
            pending = None
            if plan.needs & r.CURVATURE:  # first: runs before the ordinary backward is watched
                pending = cv.attach(
                    stack, self.model, self.loss_fn, self.params, plan.needs & r.CURVATURE,
                    self.curvature, self.generator, self._pool,
                )  # fmt: skip
            rows = bool(plan.needs & _ROW_NEEDS)  # the gradient alone comes from autograd
            if not rows:  # else reading the rows starts the pool's next round
                self._pool.new_round()
            watch = stack.enter_context(watch_step(self.model, self.loss_fn, rows, self._pool))
            yield record
        given = dict(record)
        try:
            self._measure(record, plan, watch, before, pending, optimizer)
            measured = {k: v for k, v in record.items() if k not in given}  # not the info
            if _loss_scaled(watch) and not _all_finite(measured):
                raise FloatingPointError("non-finite values from the loss-scaled gradients")
        except FloatingPointError as err:
            if not _loss_scaled(watch):
                raise
            self._overflowed(record, given, watch, err)
        self.records.append(record)
        self._emit(record)

    def _overflowed(
        self, record: dict[str, Any], given: dict[str, Any], watch: StepWatch, err: Exception
    ) -> None:
        """A step whose loss-scaled gradients overflowed (``torch.amp.GradScaler`` skips its
        update and lowers the scale): ``record`` back to what it held before the measurement
        (``given``), with the loss and ``overflow`` (the reason); no instrument value, no
        update measured. Without a loss scale the error is raised."""
        record.clear()
        record.update(given)
        record["Loss"] = float(watch.loss_call()[2].detach())
        record["overflow"] = str(err)
        self._updates.armed = None
        self._alpha_start = None

    def _plan(self, scheduled: bool) -> _Plan:
        """The instruments of this step; per-sample ones left out if the samples are coupled."""
        wanted = list(self.selected) if scheduled else [i for i in self.selected if i.next_step]
        if _LOSS not in wanted:
            wanted.insert(0, _LOSS)
        reason = None
        if any(i.per_sample for i in wanted):
            reason = samples_coupled(self.model, self.loss_fn)
        plan = _Plan(scheduled, wanted, frozenset(), coupled=reason is not None)
        if reason is not None:
            self._drop(plan, [i for i in wanted if i.per_sample], reason)
        plan.needs = frozenset().union(*(i.needs for i in plan.instruments))
        return plan

    def _drop(self, plan: _Plan, instruments: list[Instrument], reason: str) -> None:
        if not instruments:
            return
        names = [i.name for i in instruments]
        message = f"Cockpit: {', '.join(names)} not computed: {reason}"
        if self.on_undefined == "raise":
            raise RuntimeError(message)
        plan.instruments = [i for i in plan.instruments if i not in instruments]
        plan.dropped.update(dict.fromkeys(names, reason))
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(message, RuntimeWarning, stacklevel=4)

    # -- measurement ----------------------------------------------------------------------------
    def _measure(
        self,
        record: dict[str, Any],
        plan: _Plan,
        watch: StepWatch,
        before: dict[str, Tensor | None],
        pending: cv.Pending | None,
        optimizer: torch.optim.Optimizer | None,
    ) -> None:
        output, target, loss = watch.loss_call()
        grad_of_loss, plain = _grad_of_loss(self.params, before, watch.loss_scale())
        B = output.shape[0]
        c = float(B) if self.loss_fn.reduction == "mean" else 1.0  # type: ignore[operator]
        data = r.StepData(record["step"], self.settings, B, c, float(loss.detach()))
        data.workspace = self._workspace
        data.lr = optimizer.param_groups[0]["lr"] if optimizer is not None else None
        if pending is not None:
            for need, why in pending.dropped.items():
                self._drop(plan, [i for i in plan.instruments if need in i.needs], why)
            cv.fill(data, pending)
        rows = self._gather(data, plan, watch, output, target, loss, grad_of_loss)
        if r.DISTANCE in plan.needs:
            data.distance = self._distance()
        for instrument in plan.instruments:
            record.update(instrument.evaluate(data))
        if plan.dropped:
            record["dropped"] = sorted(plan.dropped)
            self.dropped = dict(plan.dropped)
        alpha = any(i.next_step for i in plan.instruments)
        if plan.scheduled and r.UPDATE in plan.needs:
            step = _grad_step(data, self.params) if alpha and plain and rows else None
            self._updates.arm(record, rows if alpha else None, data.losses, c, step)
        else:
            self._updates.armed = None

    def _gather(
        self,
        data: r.StepData,
        plan: _Plan,
        watch: StepWatch,
        output: Tensor,
        target: Tensor,
        loss: Tensor,
        grad_of_loss: dict[str, Tensor],
    ) -> dict[str, Any] | None:
        """Fill ``data`` with the step's reductions; returns the per-sample rows (or None)."""
        rows = None
        if plan.needs & _ROW_NEEDS:
            try:
                rows = watch.rows()
            except SamplesCoupled as err:
                self._drop(plan, [i for i in plan.instruments if i.per_sample], str(err))
                plan.needs = frozenset().union(*(i.needs for i in plan.instruments))
                plan.coupled = True
        if r.LOSSES in plan.needs:
            data.losses = (
                _individual_losses(self._unreduced(), output.detach(), target, loss.detach())
                * data.c
            )
        start = self._alpha_start  # Alpha's start point, when this step is its end point
        if rows is None or start is None or start["step"] != data.step - 1:
            start = None
        elif r.DIRECTIONAL not in plan.needs:
            start = None
        else:
            data.alpha_start, self._alpha_start = start, None
        if rows is not None and plan.needs & _LAYER_NEEDS:
            r.gather_rows(data, plan.needs, rows, grad_of_loss, self.params, self.generator, start)
        elif r.GRAD in plan.needs:
            r.gather_grads(data, grad_of_loss, self.params)
        if start is not None and data.directional is None:  # no per-layer reduction needed
            data.directional = (
                r.directional(rows, start["direction"], start.get("rows"), start.get("lr")) * data.c
            )
        return rows

    def _unreduced(self) -> nn.Module:
        """A shallow copy of ``loss_fn`` with ``reduction="none"``, made once and brought up
        to date with ``loss_fn``'s attributes at every call (a copy per step costs more than
        the loss itself on small models)."""
        if self._unreduced_fn is None:
            self._unreduced_fn = copy.copy(self.loss_fn)
        fn = self._unreduced_fn
        fn.__dict__.update(self.loss_fn.__dict__)
        fn.reduction = "none"  # type: ignore[assignment]
        return fn

    def _distance(self) -> dict[str, float]:
        """Per parameter ``||theta - theta_0||``, formed in a buffer set reused from step to
        step (a fresh allocation of the model's size costs page faults every step)."""
        names = list(self.params)
        buf = self._distance_buffer
        if buf is None or any(
            b.shape != p.shape or b.dtype != p.dtype or b.device != p.device
            for b, p in zip(buf, self.params.values())
        ):
            buf = [
                torch.empty_like(p, memory_format=torch.contiguous_format)
                for p in self.params.values()
            ]
            self._distance_buffer = buf
        for b, p, n in zip(buf, self.params.values(), names):  # one pass per parameter
            torch.sub(p.detach(), self.initial[n], out=b)
        return r.layer_norms(dict(zip(names, buf)))

    def _hook_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        if id(optimizer) in self._hooked:
            return
        self._hooked.add(id(optimizer))
        optimizer.register_step_post_hook(lambda opt, args, kwargs: self._resolve_update(None, opt))

    def _resolve_update(self, step: int | None, optimizer: Any = None) -> None:
        """After the update of a tracked step (by ``optimizer``, when its step post-hook calls):
        UpdateSize and Alpha's start point."""
        update = self._updates.resolve(step, optimizer)
        if update is None:
            return
        record = update.record
        data = r.StepData(record["step"], self.settings)
        data.update, data.update_norms = update.delta, update.norms
        values: dict[str, Any] = {}
        for instrument in self.selected:
            if r.UPDATE in instrument.needs:
                values.update(instrument.evaluate(data))
        record.update(values)
        scalars = {k: v for k, v in values.items() if isinstance(v, (int, float))}
        if scalars and self._log is not None:  # the record was written before the update
            self._emit({"step": record["step"], **scalars})
        if update.alpha_start is not None:
            self._alpha_start = update.alpha_start

    # -- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The Cockpit's state between steps, for checkpoints (``torch.save``; loads with
        ``torch.load(weights_only=True)``).

        Holds the random generator, Distance's reference point, the records, Alpha's pending
        start point, a tracked step whose update is not measured yet, and the instruments
        dropped and warnings given (:mod:`beyondgrad.cockpit.state`). Restored into a Cockpit
        of the same model and configuration by :meth:`load_state_dict`, the next steps log
        exactly what an uninterrupted run logs. Take it between steps (after
        ``optimizer.step()``), not inside the ``with cockpit(step)`` block.

        Returns:
            A dict of tensors, numbers, strings, lists and dicts.
        """
        armed = self._updates.armed
        warm = self.curvature.warm.vector
        return {
            "format": st.FORMAT,
            "generator": st.generator_state(self.generator),
            "initial": {n: t.detach().clone() for n, t in self.initial.items()},
            "records": st.records_state(self.records),
            "alpha_start": st.alpha_start_state(self._alpha_start),
            "armed": None
            if armed is None
            else {
                "step": int(armed.record["step"]),
                "before": {n: t.detach().clone() for n, t in armed.before.items()},
                "losses": armed.losses,
                "c": armed.c,
            },
            "dropped": dict(self.dropped),
            "warned": sorted(self._warned),
            "hess_vector": None if warm is None else warm.detach().clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (tensors are moved to the parameters' devices).

        Args:
            state: a state from :meth:`state_dict` of a Cockpit on the same model.

        Raises:
            ValueError: not a Cockpit state, or one of a model with other parameters.
        """
        st.check_format(state)
        self.generator.set_state(state["generator"].cpu())
        if state["initial"]:
            st.check_names(state["initial"], self.params, "reference point")
        self.initial = st.on_devices(state["initial"], self.params) if state["initial"] else {}
        self.records = st.records_state(state["records"])
        self._alpha_start = st.load_alpha_start(state["alpha_start"], self.params)
        self._updates.armed = self._load_armed(state["armed"])
        self.dropped = dict(state["dropped"])
        self._warned = set(state["warned"])
        warm = state.get("hess_vector")
        device = next(iter(self.params.values())).device if self.params else None
        self.curvature.warm.vector = None if warm is None else warm.to(device)

    def _load_armed(self, saved: dict[str, Any] | None) -> Armed | None:
        if saved is None:
            return None
        st.check_names(saved["before"], self.params, "pending update")
        step = saved["step"]
        record = next((rec for rec in reversed(self.records) if rec["step"] == step), None)
        if record is None:
            record = {"step": step}
        before = st.on_devices(saved["before"], self.params)
        return Armed(record, before, None, saved["losses"], float(saved["c"]))

    # -- outputs --------------------------------------------------------------------------------
    def _emit(self, record: dict[str, Any]) -> None:
        if self._log is not None:
            self._log.write(record)
        if (
            self.plot_every
            and self.log_dir is not None
            and "Loss" in record
            and len(self.records) % self.plot_every == 0
            and record is self.records[-1]
        ):
            self.plot(self.log_dir / "dashboard.png", wait=False)

    def output(self) -> dict[int, dict[str, Any]]:
        """All tracked steps: ``{step: record}`` (later partial records merged in)."""
        out: dict[int, dict[str, Any]] = {}
        for rec in self.records:
            out.setdefault(rec["step"], {}).update(rec)
        return out

    def plot(self, path: str | Path, title: str | None = None, wait: bool = True) -> list[Path]:
        """Draw the dashboard of the records so far to ``path`` (PNG) and the same name with
        ``.svg``, each written atomically.

        Args:
            path: the PNG file to write.
            title: the figure title (default: ``"Cockpit (<config>)"``).
            wait: draw now, in this thread, after any background drawing (default); False:
                hand it to the background worker and return at once (it never blocks a
                training step; a newer request replaces one still waiting).

        Returns:
            The two files (written when this returns, or once the worker has drawn them).
        """
        records = list(self.output().values())  # a snapshot: later steps do not change it
        title = title or f"Cockpit ({self.config})"
        selected, targets = tuple(self.selected), dict(self.targets)

        def job() -> list[Path]:
            return dashboard.draw(records, path, title, selected, targets)

        if wait:
            return self._drawer.run(job)
        self._drawer.submit(job)
        path = Path(path)
        return [path.with_suffix(".png"), path.with_suffix(".svg")]

    @property
    def draw_seconds(self) -> float:
        """Seconds spent drawing dashboards so far (background and on demand), apart from
        the training steps."""
        return self._drawer.seconds

    @property
    def draws(self) -> int:
        """Dashboards drawn so far."""
        return self._drawer.count

    def close(self) -> None:
        """Finish background drawing (a last dashboard when ``plot_every`` is set) and close
        the log files. The Cockpit stays usable for :meth:`plot` and :meth:`output`."""
        self._drawer.close()
        if self.plot_every and self.log_dir is not None and self.records:
            self.plot(self.log_dir / "dashboard.png")
            self._drawer.close()
        if self._log is not None:
            self._log.close()


def _all_finite(value: Any) -> bool:
    """Whether every number in a record (nested dicts and lists included) is finite."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_all_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(_all_finite(v) for v in value)
    return True


def _loss_scaled(watch: StepWatch) -> bool:
    """Whether the step's backward was seeded with a loss scale (a ``GradScaler``)."""
    try:
        return not bool((watch.loss_scale() == 1).all())
    except RuntimeError:  # no backward was watched
        return False


def _grad_of_loss(
    params: dict[str, Tensor], before: dict[str, Tensor | None], seed: Tensor
) -> tuple[dict[str, Tensor], bool]:
    """This backward's contribution to ``.grad``, per unit of loss (a loss scale removed),
    and whether it is ``.grad`` itself (no loss scale, nothing accumulated before)."""
    unit = bool((seed == 1).all())
    grads = {
        n: (g if unit else g / seed)
        for n, p in params.items()
        if p.grad is not None
        for g in [p.grad if before[n] is None else p.grad - before[n]]
    }
    return grads, unit and all(b is None for b in before.values())


def _grad_step(data: r.StepData, params: dict[str, Tensor]) -> GradStep | None:
    """Alpha's shortcut for a plain gradient step, from the gradient tests' dot products
    ``g_n . g`` (None when the step does not compute them)."""
    if data.dots is None:
        return None
    grads = [(p, p.grad, p.grad._version) for p in params.values() if p.grad is not None]
    return GradStep(data.dots * (data.B / data.c), grads)


def _individual_losses(
    unreduced_fn: nn.Module, output: Tensor, target: Tensor, loss: Tensor
) -> Tensor:
    """Per-sample contributions ``c_n`` with ``sum_n c_n = loss`` (``[N]``, float64), from the
    loss module with ``reduction="none"``."""
    with torch.no_grad():
        per = unreduced_fn(output, target)
    per = per.reshape(per.shape[0], -1).sum(1).double() if per.ndim > 0 else per.double()
    total = per.sum()
    scale = torch.where(total != 0, loss.double() / total, 1.0)  # on the device: one sync
    return (per * scale).cpu()


__all__ = ["Cockpit"]
