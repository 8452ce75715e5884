"""The README's optimizer loop, shared by the zoo tests."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn


def train_losses(
    opt: Any, model: nn.Module, loss_fn: nn.Module, X: Tensor, y: Tensor, steps: int
) -> list[float]:
    """``steps`` steps of ``capture`` / ``backward`` / ``step`` on one fixed batch; the loss
    before each step."""
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        with opt.capture():
            loss = loss_fn(model(X), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses
