"""``beyondgrad train``: a built-in task trained with a chosen optimizer, the Cockpit attached.

Writes a run directory (see :mod:`beyondgrad.app.rundir`): ``config.json`` (every setting),
``cockpit.jsonl`` (one record per tracked step, validation metrics included), ``checkpoint.pt``
(every ``checkpoint_every`` steps, at the end, on Ctrl-C and on divergence), ``summary.json``
(status, final loss and metric, the step and seconds at which the task's target was first
reached, ms per step, optimizer routing) and ``dashboard.png``/``.svg`` (redrawn every
``plot_every`` steps and whenever the run stops). Every file but the log is written atomically.

A non-empty run directory is refused unless ``overwrite=True``; :func:`resume` continues a run
from its checkpoint bit-identically to a run that was never interrupted (same parameters,
optimizer and scheduler state, data order and random draws).
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from ..cockpit import Cockpit, every
from .optimizers import make_optimizer, task_settings
from .rundir import (
    RunDirError,
    check_writable,
    load_checkpoint,
    prepare,
    save_checkpoint,
    truncate_log,
    write_json,
)
from .tasks import TASKS, make_task

OPTIMIZERS = ("adamw", "sgd", "kfac", "kfac-bf16", "kfac-adam", "singd", "sirfshampoo")
"""The optimizers ``beyondgrad train`` offers."""
SCHEDULES = ("constant", "cosine")
"""Learning-rate schedules: constant, or cosine decay to zero over the run; both after
``warmup`` steps of linear warm-up."""
CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainConfig:
    """Every setting of a run (saved as ``config.json``; ``progress`` and ``overwrite`` are
    not part of the run)."""

    task: str = "digits-mlp"
    optimizer: str = "kfac"
    cockpit: str = "economy"
    steps: int = 300
    lr: float | None = None
    lr_schedule: str = "constant"
    warmup: int = 0
    weight_decay: float = 0.0
    track_every: int = 1
    eval_every: int = 25
    plot_every: int = 100
    checkpoint_every: int = 100
    seed: int = 0
    device: str = "cpu"
    out: str | None = None
    tensorboard: bool = False
    progress: bool = True
    overwrite: bool = False

    def check(self) -> None:
        """Raise ``ValueError`` for a setting out of range."""
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; choose from {', '.join(TASKS)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose from {OPTIMIZERS}")
        if self.lr_schedule not in SCHEDULES:
            raise ValueError(f"unknown lr_schedule {self.lr_schedule!r}; choose from {SCHEDULES}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive finite number, got {self.lr}")
        for name in ("steps", "track_every", "eval_every", "plot_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def lr_factor(config: TrainConfig, step: int) -> float:
    """The learning rate of ``step`` as a fraction of the base rate."""
    if step < config.warmup:
        return (step + 1) / config.warmup
    if config.lr_schedule == "constant":
        return 1.0
    t = (step - config.warmup) / max(config.steps - config.warmup, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))


@dataclass
class Progress:
    """Where a run stands: the next step, training seconds so far, the last loss and metric,
    when the target was reached, the step of the last checkpoint."""

    step: int = 0
    elapsed: float = 0.0
    loss: float = math.nan
    metric: float = math.nan
    reached: dict[str, Any] | None = None
    checkpoint: int | None = None


class _Diverged(Exception):
    pass


@dataclass
class _Stop:
    """Ctrl-C: the first one asks the loop to stop after the current step."""

    requested: bool = False
    previous: Any = None
    installed: bool = False

    def install(self) -> None:
        """Catch SIGINT (in the main thread only; elsewhere Ctrl-C raises at once)."""
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
            self.installed = True

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True

    def restore(self) -> None:
        """Put back the SIGINT handler found by :meth:`install`."""
        if self.installed:
            signal.signal(signal.SIGINT, self.previous)
            self.installed = False


@dataclass
class _Run:
    config: TrainConfig
    out: Path
    progress: Progress = field(default_factory=Progress)
    phase: str = "idle"  # "step" while a step is under way, "update" from opt.step() on
    divergence: str | None = None  # what diverged, and where
    _rng_at_start: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        config = self.config
        self.device = torch.device(config.device)
        self.task = make_task(config.task, config.seed)
        self.model = self.task.model.to(self.device)
        options = task_settings(config.task, config.optimizer)
        self.lr = options.pop("lr") if config.lr is None else config.lr
        options.pop("lr", None)
        self.opt = make_optimizer(
            config.optimizer, self.model, self.task.loss_fn, self.lr, config.weight_decay,
            **options,
        )  # fmt: skip
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda step: lr_factor(config, step)
        )
        self.cockpit, task_target = None, self.task.target
        if config.cockpit != "none":
            self.cockpit = Cockpit(
                self.model, self.task.loss_fn, config=config.cockpit,
                schedule=every(config.track_every), log_dir=self.out,
                tensorboard=config.tensorboard,
                targets={} if task_target is None else {self.task.metric_key: task_target},
            )  # fmt: skip
        self.stop = _Stop()

    # -- state --------------------------------------------------------------------------------
    def _rng(self) -> dict[str, torch.Tensor]:
        """The random states a step draws from: torch's (CPU, CUDA) and the Cockpit's."""
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        if self.cockpit is not None:
            rng["cockpit"] = self.cockpit.generator.get_state()
        return rng

    def _set_rng(self, rng: dict[str, torch.Tensor]) -> None:
        torch.set_rng_state(rng["torch"].cpu())
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"].cpu(), self.device)
        if "cockpit" in rng and self.cockpit is not None:
            self.cockpit.generator.set_state(rng["cockpit"].cpu())

    def state_dict(self) -> dict[str, Any]:
        """Everything a bit-identical continuation needs."""
        return {
            "format": 1,
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "cockpit": _cockpit_state(self.cockpit),
            "rng": self._rng(),
            "progress": asdict(self.progress),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])  # after the scheduler was built: its lr
        self.scheduler.load_state_dict(state["scheduler"])
        _load_cockpit_state(self.cockpit, state["cockpit"])
        self._set_rng(state["rng"])
        self.progress = Progress(**state["progress"])

    def checkpoint(self) -> None:
        """Write ``checkpoint.pt`` (atomically) for the current step."""
        self.progress.checkpoint = self.progress.step
        save_checkpoint(self.out / CHECKPOINT, self.state_dict())

    # -- the loop -----------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Train from :attr:`progress` to ``config.steps``; stop early on Ctrl-C or divergence.
        Returns the summary."""
        status, consistent = "finished", True
        batches = self.task.batches(self.config.seed, start=self.progress.step)
        bar = self._bar()
        self.stop.install()
        try:
            while self.progress.step < self.config.steps:
                if self.stop.requested:
                    status = "interrupted"
                    break
                self._step(next(batches))
                self._after_step(bar)
        except KeyboardInterrupt:
            status, consistent = "interrupted", self.phase != "update"
            if self.phase == "step":  # the step's random draws are redone on resume
                self._set_rng(self._rng_at_start)
        except _Diverged as err:
            status, self.divergence = "diverged", str(err)
        finally:
            self.stop.restore()
            if bar is not None:
                bar.close()
        return self._finish(status, consistent)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        config, p, task = self.config, self.progress, self.task
        step, info = p.step, {}
        if step % config.eval_every == 0 or step == config.steps - 1:
            p.metric = task.evaluate(self.model)
            info[task.metric_key] = p.metric
            if p.reached is None and task.reached(p.metric):
                p.reached = {"step": step, "seconds": p.elapsed}
        X, y = (t.to(self.device) for t in batch)
        self._rng_at_start = self._rng()
        self.phase = "step"
        start = time.perf_counter()
        try:
            loss_value = self._forward_backward(step, X, y, info)
            self.phase = "update"
            self.opt.step()  # KFAC & co. refuse non-finite statistics before changing state
        except FloatingPointError as err:
            self.phase = "step"
            raise _Diverged(f"step {step}: {err}") from err
        self.scheduler.step()
        p.elapsed += time.perf_counter() - start
        p.step, p.loss = step + 1, loss_value
        self.phase = "idle"

    def _forward_backward(self, step: int, X: torch.Tensor, y: torch.Tensor,
                          info: dict[str, Any]) -> float:  # fmt: skip
        """Gradients (and the Cockpit's and optimizer's statistics) of one batch; the loss.

        Raises:
            FloatingPointError: the loss is not finite.
        """
        self.opt.zero_grad()
        track = (
            self.cockpit(step, optimizer=self.opt, **info)
            if self.cockpit is not None
            else contextlib.nullcontext()
        )
        with track:
            with getattr(self.opt, "capture", contextlib.nullcontext)():
                loss = self.task.loss_fn(self.model(X), y)
            if not bool(torch.isfinite(loss)):
                raise FloatingPointError(f"the loss is not finite ({float(loss.detach())})")
            loss.backward()
        return float(loss.detach())

    def _after_step(self, bar: Any) -> None:
        config, step = self.config, self.progress.step
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{self.progress.loss:.3g}", val=f"{self.progress.metric:.3f}")
        if step % config.checkpoint_every == 0 and step < config.steps:
            self.checkpoint()
        if self.cockpit is not None and step % config.plot_every == 0 and step < config.steps:
            self._dashboard(wait=False)  # drawn in the Cockpit's background worker

    def _bar(self) -> Any:
        if not self.config.progress:
            return None
        try:
            from tqdm import tqdm
        except ImportError:  # the [app] extra brings it; training works without
            return None
        c = self.config
        return tqdm(total=c.steps, initial=self.progress.step, desc=f"{c.task} {c.optimizer}",
                    unit="step")  # fmt: skip

    def _dashboard(self, wait: bool = True) -> None:
        if self.cockpit is None or not self.cockpit.records:
            return
        c = self.config
        title = f"{c.task} / {c.optimizer} / cockpit {c.cockpit}"
        self.cockpit.plot(self.out / "dashboard.png", title=title, wait=wait)  # atomic writes

    def _finish(self, status: str, consistent: bool) -> dict[str, Any]:
        """Final evaluation (when finished), checkpoint (unless stopped in the middle of an
        update), summary and dashboard."""
        p, task = self.progress, self.task
        if status == "finished":
            p.metric = task.evaluate(self.model)
            if p.reached is None and task.reached(p.metric):
                p.reached = {"step": p.step, "seconds": p.elapsed}
        if consistent:
            self.checkpoint()
        metric = p.metric  # stopped early: the metric now, for the summary only
        if status != "finished" and consistent:
            metric = task.evaluate(self.model)
        summary = {
            "task": self.config.task,
            "optimizer": self.config.optimizer,
            "status": status,
            "divergence": self.divergence,
            "final_loss": p.loss,
            task.metric_key: metric,
            "target": task.target,
            "target_reached": p.reached,
            "steps": p.step,
            "planned_steps": self.config.steps,
            "checkpoint_step": p.checkpoint,
            "train_seconds": p.elapsed,
            "ms_per_step": 1e3 * p.elapsed / max(p.step, 1),
            "routing": self.opt.routing() if hasattr(self.opt, "routing") else None,
        }
        if self.cockpit is not None:
            self.cockpit.close()
            self._dashboard()
            summary["dashboard_seconds"] = self.cockpit.draw_seconds  # not in train_seconds
        write_json(self.out / "summary.json", summary)
        return summary | {"out": str(self.out)}


def _cockpit_state(cockpit: Cockpit | None) -> dict[str, Any]:
    """The Cockpit's state: its own ``state_dict()`` where it has one, else the public part
    (the Distance reference point; its generator is saved with the RNG states)."""
    if cockpit is None:
        return {}
    if hasattr(cockpit, "state_dict"):
        return {"state_dict": cockpit.state_dict()}
    return {"initial": dict(cockpit.initial)}  # its generator: with the RNG states


def _load_cockpit_state(cockpit: Cockpit | None, state: dict[str, Any]) -> None:
    if cockpit is None or not state:
        return
    if "state_dict" in state:
        cockpit.load_state_dict(state["state_dict"])  # type: ignore[attr-defined]
        return
    for name, value in state["initial"].items():
        cockpit.initial[name] = value.to(cockpit.initial[name].device)


def _settings(config: TrainConfig, out: Path, lr: float) -> dict[str, Any]:
    settings = {k: v for k, v in asdict(config).items() if k not in ("progress", "overwrite")}
    return settings | {"lr": lr, "out": str(out), "torch": torch.__version__}


def default_out(config: TrainConfig) -> Path:
    """``runs/TASK-OPTIMIZER-YYYYmmdd-HHMMSS``."""
    return Path(f"runs/{config.task}-{config.optimizer}-{time.strftime('%Y%m%d-%H%M%S')}")


def train(config: TrainConfig) -> dict[str, Any]:
    """Run ``config`` in a fresh run directory.

    Args:
        config: the settings (``config.out``: the run directory, default :func:`default_out`;
            it must be empty or absent unless ``config.overwrite``).

    Returns:
        The summary (also written to ``summary.json``) with ``out``, the run directory;
        ``status`` is ``"finished"``, ``"interrupted"`` (Ctrl-C) or ``"diverged"``.

    Raises:
        RunDirError: the run directory is not empty or not writable.
    """
    config.check()
    out = Path(config.out) if config.out else default_out(config)
    prepare(out, config.overwrite)
    run = _Run(config, out)
    write_json(out / "config.json", _settings(config, out, run.lr))
    return run.run()


def load_config(run_dir: str | Path) -> TrainConfig:
    """The :class:`TrainConfig` of a run directory (from its ``config.json``).

    Raises:
        RunDirError: no run directory there.
    """
    import json

    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise RunDirError(f"{run_dir} is not a run directory of beyondgrad train (no config.json)")
    saved = json.loads(path.read_text())
    names = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in saved.items() if k in names})


def resume(run_dir: str | Path, steps: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Continue the run in ``run_dir`` from its checkpoint, bit-identically to a run that was
    never interrupted; log records after the checkpoint are dropped (those steps are redone).

    Args:
        run_dir: a run directory written by :func:`train`.
        steps: train to this many steps in total (default: the run's own); a different
            value also stretches a cosine schedule.
        progress: show a progress bar.

    Returns:
        The summary, as :func:`train`.

    Raises:
        RunDirError: not a run directory, no checkpoint, or not writable.
    """
    out = Path(run_dir)
    config = load_config(out)
    config.progress, config.out = progress, str(out)
    if not (out / CHECKPOINT).is_file():
        raise RunDirError(f"{out} has no {CHECKPOINT} to resume from")
    check_writable(out)
    state = load_checkpoint(out / CHECKPOINT, torch.device(config.device))
    if steps is not None and steps != config.steps:
        config.steps = steps
        config.check()
    truncate_log(out / "cockpit.jsonl", state["progress"]["step"])
    run = _Run(config, out)  # built as at the start (the Cockpit's reference point included)
    run.load_state_dict(state)
    write_json(out / "config.json", _settings(config, out, run.lr))
    return run.run()


__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "Progress",
    "TrainConfig",
    "default_out",
    "load_config",
    "lr_factor",
    "resume",
    "train",
]
