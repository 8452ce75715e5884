"""The optimizers at their library defaults on the Hugging Face zoo (tiny random-weight configs,
``tests/zoo.py``): 20 steps lower the loss, 30 by 3%, no divergence, and every weight matrix
(Linear and GPT-2's Conv1D) is preconditioned rather than sent to AdamW."""

from __future__ import annotations

import pytest
import torch

import beyondgrad as bg

pytest.importorskip("transformers")
from loops import train_losses
from zoo import MODELS, case

OPTIMIZERS = ["KFAC", "SINGD", "SIRFShampoo"]


def _weight_matrices(model: torch.nn.Module) -> list[str]:
    """Names of the 2-d weights of Linear and Conv1D modules, tied copies left out."""
    names = []
    for mname, m in model.named_modules():
        if type(m).__name__ in ("Linear", "Conv1D"):
            p = m._parameters.get("weight")
            if p is not None and p.requires_grad and p.ndim == 2:
                names.append(f"{mname}.weight")
    unique = {n for n, _ in model.named_parameters()}
    return [n for n in names if n in unique]


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_default_optimizers_lower_the_loss(name, optimizer):
    model, X, y, loss_fn = case(name)  # eval mode: no dropout noise in the comparison
    cls = getattr(bg.optim, optimizer)
    opt = cls(model) if optimizer == "SIRFShampoo" else cls(model, loss_fn)
    routes = {n: r[0] for n, r in opt.routes.items()}
    leftover = [n for n in _weight_matrices(model) if routes.get(n) in ("adamw", "adam")]
    assert not leftover, opt.routing()
    losses = train_losses(opt, model, loss_fn, X, y, 30)
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert max(losses) <= 1.05 * losses[0], f"diverging: {losses}"
    assert losses[19] < losses[0], f"20 steps did not lower the loss: {losses}"
    assert losses[-1] < 0.97 * losses[0], f"not learning: {losses}"
