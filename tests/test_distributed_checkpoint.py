"""``bg.distributed.checkpoint`` in one process: optimizers and the Cockpit saved through
``torch.distributed.checkpoint`` resume bit-identically (the 2-rank checks and the resume on
another world size are in ``test_distributed.py``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import beyondgrad as bg
from beyondgrad.cockpit import Cockpit


def _problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 4, generator=g), torch.randint(3, (8,), generator=g))
               for _ in range(4)]  # fmt: skip
    return model, nn.CrossEntropyLoss(), batches


def _optimizer(kind: str, model: nn.Module, loss_fn: nn.Module):
    if kind == "KFAC":
        return bg.optim.KFAC(model, loss_fn, fisher_type="type-2", refresh_every=2)
    if kind == "SINGD":
        return bg.optim.SINGD(model, loss_fn, refresh_every=1, warm_start=True)
    return bg.optim.SIRFShampoo(model, refresh_every=1)


def _run(model, loss_fn, opt, cockpit, batches, steps) -> None:
    for step in steps:
        X, y = batches[step]
        opt.zero_grad()
        with cockpit(step, optimizer=opt):
            with opt.capture():  # its curvature backward before the ordinary one
                loss = loss_fn(model(X), y)
            loss.backward()
        opt.step()


@pytest.mark.parametrize("kind", ["KFAC", "SINGD", "SIRFShampoo"])
def test_optimizer_and_cockpit_resume_bit_identically(kind, tmp_path):
    def fresh():
        model, loss_fn, batches = _problem()
        opt = _optimizer(kind, model, loss_fn)
        cockpit = Cockpit(model, loss_fn, config=["Loss", "Alpha", "Distance"], seed=5)
        return model, loss_fn, opt, cockpit, batches

    model, loss_fn, opt, cockpit, batches = fresh()
    _run(model, loss_fn, opt, cockpit, batches, range(4))
    want, log = dict(model.named_parameters()), cockpit.output()

    model, loss_fn, opt, cockpit, batches = fresh()
    _run(model, loss_fn, opt, cockpit, batches, range(2))
    objects = {"model": model, "optim": opt, "cockpit": cockpit}
    bg.distributed.checkpoint.save(str(tmp_path / "ckpt"), objects)

    model, loss_fn, opt, cockpit, batches = fresh()
    torch.manual_seed(123)  # the resumed process's global generator differs
    objects = {"model": model, "optim": opt, "cockpit": cockpit}
    bg.distributed.checkpoint.load(str(tmp_path / "ckpt"), objects)
    assert opt.steps == 2
    _run(model, loss_fn, opt, cockpit, batches, range(2, 4))
    for name, p in model.named_parameters():
        assert torch.equal(p, want[name]), name
    resumed = cockpit.output()
    for step in (2, 3):
        assert resumed[step] == log[step], step


def test_unknown_object_raises(tmp_path):
    model, _, _ = _problem()
    bg.distributed.checkpoint.save(str(tmp_path / "c"), {"model": model})
    with pytest.raises(KeyError, match="no object 'optim'"):
        bg.distributed.checkpoint.load(
            str(tmp_path / "c"), {"optim": torch.optim.SGD(model.parameters())}
        )
