"""``beyondgrad train``: a built-in task trained with a chosen optimizer, the Cockpit attached.

Writes a run directory: ``config.json`` (every setting), ``cockpit.jsonl`` (one record per
tracked step, validation metrics included), ``dashboard.png``/``.svg`` (redrawn during
training and at the end) and ``summary.json`` (final loss and metric, the step and seconds at
which the task's target was first reached, ms per step, optimizer routing).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .cockpit import Cockpit, every
from .optim import KFAC, SINGD, SIRFShampoo
from .tasks import make_task

OPTIMIZERS = ("adamw", "sgd", "kfac", "singd", "sirfshampoo")
DEFAULT_LR = {"adamw": 3e-3, "sgd": 0.05, "kfac": 0.05, "singd": 0.02, "sirfshampoo": 3e-3}
"""Learning rates that train every built-in task (``--lr`` overrides)."""


@dataclass
class TrainConfig:
    task: str = "digits-mlp"
    optimizer: str = "kfac"
    cockpit: str = "economy"
    steps: int = 300
    lr: float | None = None
    weight_decay: float = 0.0
    track_every: int = 1
    eval_every: int = 25
    plot_every: int = 100
    seed: int = 0
    device: str = "cpu"
    out: str | None = None
    tensorboard: bool = False
    progress: bool = True


def make_optimizer(name: str, model: torch.nn.Module, loss_fn: torch.nn.Module, lr: float,
                   weight_decay: float) -> Any:  # fmt: skip
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    if name == "kfac":
        return KFAC(model, loss_fn, lr=lr, weight_decay=weight_decay, damping=5e-2, stats_every=2)
    if name == "singd":
        return SINGD(model, loss_fn, lr=lr, weight_decay=weight_decay, damping=1e-2, T=5)
    if name == "sirfshampoo":
        return SIRFShampoo(model, lr=lr, weight_decay=weight_decay, T=2, max_dense=512)
    raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")


def train(config: TrainConfig) -> dict[str, Any]:
    """Run ``config``; returns the summary (also written to ``summary.json``)."""
    if config.optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {config.optimizer!r}; choose from {OPTIMIZERS}")
    torch.manual_seed(config.seed)
    task = make_task(config.task, config.seed)
    device = torch.device(config.device)
    model = task.model.to(device)
    loss_fn = task.loss_fn
    lr = config.lr if config.lr is not None else DEFAULT_LR[config.optimizer]
    opt = make_optimizer(config.optimizer, model, loss_fn, lr, config.weight_decay)
    out = Path(
        config.out or f"runs/{config.task}-{config.optimizer}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    out.mkdir(parents=True, exist_ok=True)
    settings = asdict(config) | {"lr": lr, "out": str(out), "torch": torch.__version__}
    (out / "config.json").write_text(json.dumps(settings, indent=1))
    cockpit = (
        Cockpit(
            model,
            loss_fn,
            config=config.cockpit,
            schedule=every(config.track_every),
            log_dir=out,
            tensorboard=config.tensorboard,
            plot_every=config.plot_every,
        )
        if config.cockpit != "none"
        else None
    )
    capture = getattr(opt, "capture", contextlib.nullcontext)
    batches = task.batches(config.seed)
    steps = range(config.steps)
    bar = None
    if config.progress:
        from tqdm import tqdm

        bar = tqdm(steps, desc=f"{config.task} {config.optimizer}", unit="step")
        steps = bar  # type: ignore[assignment]
    reached: dict[str, Any] | None = None
    metric, elapsed, loss_value = math.nan, 0.0, math.nan
    for step in steps:
        info: dict[str, Any] = {}
        if step % config.eval_every == 0 or step == config.steps - 1:
            metric = task.evaluate(model)
            info[task.metric_key] = metric
            if reached is None and metric >= task.target:
                reached = {"step": step, "seconds": elapsed}
        X, y = next(batches)
        X, y = X.to(device), y.to(device)
        start = time.perf_counter()
        opt.zero_grad()
        track = cockpit(step, optimizer=opt, **info) if cockpit else contextlib.nullcontext()
        with track:
            with capture():  # the optimizer's statistics (kfac, singd), before the backward
                loss = loss_fn(model(X), y)
            loss.backward()
        opt.step()
        elapsed += time.perf_counter() - start
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"the loss diverged at step {step} (lower --lr)")
        if bar is not None:
            bar.set_postfix(loss=f"{loss_value:.3g}", val=f"{metric:.3f}")
    metric = task.evaluate(model)
    if reached is None and metric >= task.target:
        reached = {"step": config.steps, "seconds": elapsed}
    summary = {
        "task": config.task,
        "optimizer": config.optimizer,
        "final_loss": loss_value,
        task.metric_key: metric,
        "target": task.target,
        "target_reached": reached,
        "steps": config.steps,
        "train_seconds": elapsed,
        "ms_per_step": 1e3 * elapsed / max(config.steps, 1),
        "routing": opt.routing() if hasattr(opt, "routing") else None,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    if cockpit is not None:
        cockpit.close()
        cockpit.plot(
            out / "dashboard.png",
            title=f"{config.task} / {config.optimizer} / cockpit {config.cockpit}",
        )
    return summary | {"out": str(out)}


__all__ = ["DEFAULT_LR", "OPTIMIZERS", "TrainConfig", "make_optimizer", "train"]
