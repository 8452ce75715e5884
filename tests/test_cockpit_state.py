"""The Cockpit's state_dict: a resumed run logs exactly what an uninterrupted run logs (Alpha,
Distance, histograms drawn from the Cockpit's generator, the record count), through
``torch.save``/``torch.load(weights_only=True)`` and through ``beyondgrad train --resume``;
the log reader skips a truncated last line."""

from __future__ import annotations

import io
import json
import signal

import pytest
import torch
from torch import nn

import beyondgrad as bg
from beyondgrad.cockpit import Cockpit


def _problem(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    data = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 4, generator=data), torch.randint(3, (8,), generator=data))
               for _ in range(6)]  # fmt: skip
    return model, nn.CrossEntropyLoss(), batches


def _run(model, loss_fn, opt, cockpit, batches, steps):
    for step in steps:
        X, y = batches[step]
        opt.zero_grad()
        with cockpit(step, optimizer=opt):
            loss = loss_fn(model(X), y)
            loss.backward()
        opt.step()


def _fresh(config="economy"):
    model, loss_fn, batches = _problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    cockpit = Cockpit(model, loss_fn, config=config, hist_entries=30, hist_samples=3, seed=5)
    return model, loss_fn, opt, cockpit, batches


@pytest.mark.parametrize("config", ["economy", ["Loss", "Alpha", "Distance", "GradHist1d"]])
def test_resumed_cockpit_logs_what_an_uninterrupted_one_logs(config):
    model, loss_fn, opt, cockpit, batches = _fresh(config)
    _run(model, loss_fn, opt, cockpit, batches, range(6))
    full = cockpit.output()

    model, loss_fn, opt, cockpit, batches = _fresh(config)
    _run(model, loss_fn, opt, cockpit, batches, range(3))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                "cockpit": cockpit.state_dict()}, buffer)  # fmt: skip
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    model, loss_fn, opt, cockpit, batches = _fresh(config)
    torch.manual_seed(123)  # the resumed process's global RNG differs
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    cockpit.load_state_dict(saved["cockpit"])
    _run(model, loss_fn, opt, cockpit, batches, range(3, 6))
    resumed = cockpit.output()
    assert list(resumed) == list(full) == list(range(6))
    assert "Alpha" in resumed[3] and "Distance" in resumed[3]
    for step in range(6):
        assert resumed[step] == full[step], step


def test_without_a_state_the_first_step_after_a_resume_differs():
    """The regression the state fixes: a fresh Cockpit has no Alpha start point and another
    reference point for Distance."""
    model, loss_fn, opt, cockpit, batches = _fresh()
    _run(model, loss_fn, opt, cockpit, batches, range(4))
    full = cockpit.output()
    model, loss_fn, opt, cockpit, batches = _fresh()
    _run(model, loss_fn, opt, cockpit, batches, range(3))
    fresh = Cockpit(model, loss_fn, config="economy", hist_entries=30, hist_samples=3, seed=5)
    _run(model, loss_fn, opt, fresh, batches, [3])
    assert "Alpha" in full[3] and "Alpha" not in fresh.output()[3]
    assert fresh.output()[3]["Distance"] != full[3]["Distance"]


def test_pending_update_without_optimizer_hook_is_saved():
    """Without ``optimizer=`` the update is measured at the next step: the saved state keeps
    the parameters before it, so UpdateSize of the last step before the checkpoint is right."""
    model, loss_fn, batches = _problem()
    cockpit = Cockpit(model, loss_fn, config=["Loss", "UpdateSize"])
    X, y = batches[0]
    with cockpit(0):
        loss_fn(model(X), y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(0.1 * p.grad)
    state = cockpit.state_dict()
    again = Cockpit(model, loss_fn, config=["Loss", "UpdateSize"])
    again.load_state_dict(state)
    model.zero_grad()
    with again(1):
        loss_fn(model(batches[1][0]), batches[1][1]).backward()
    moved = torch.cat([(p.detach() - b).reshape(-1) for p, b in zip(model.parameters(), before)])
    assert again.output()[0]["UpdateSize"] == pytest.approx(float(moved.norm()), rel=1e-6)


def test_state_of_another_model_is_refused():
    model, loss_fn, opt, cockpit, batches = _fresh()
    _run(model, loss_fn, opt, cockpit, batches, range(1))
    other = Cockpit(nn.Linear(4, 3), loss_fn, config="economy")
    with pytest.raises(ValueError, match="another model"):
        other.load_state_dict(cockpit.state_dict())
    with pytest.raises(ValueError, match="Cockpit state_dict"):
        other.load_state_dict({"records": []})


# -- beyondgrad train --resume ----------------------------------------------------------------
def test_train_resume_logs_every_instrument_as_the_uninterrupted_run(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from beyondgrad.app import train as train_mod
    from beyondgrad.app.tasks import Task

    def config(out):
        return train_mod.TrainConfig(
            task="digits-mlp", optimizer="sgd", cockpit="economy", steps=6, eval_every=2,
            plot_every=100, checkpoint_every=100, progress=False, out=str(out),
        )  # fmt: skip

    train_mod.train(config(tmp_path / "full"))
    batches = Task.batches

    def interrupted(self, seed, start=0):
        for i, batch in enumerate(batches(self, seed, start), start):
            if i == 3 and start == 0:
                signal.raise_signal(signal.SIGINT)  # stop after the step under way
            yield batch

    with monkeypatch.context() as m:
        m.setattr(Task, "batches", interrupted)
        part = train_mod.train(config(tmp_path / "part"))
    assert part["status"] == "interrupted" and part["checkpoint_step"] == 4
    train_mod.resume(tmp_path / "part", progress=False)
    logs = [bg.cockpit.load(tmp_path / r) for r in ("full", "part")]
    assert [r["step"] for r in logs[1]] == list(range(6))
    assert "Alpha" in logs[1][4]
    for r0, r1 in zip(*logs):
        assert r0 == r1, r0["step"]


# -- the log reader ----------------------------------------------------------------------------
def test_load_skips_a_truncated_last_line(tmp_path):
    log = tmp_path / "cockpit.jsonl"
    lines = [json.dumps({"step": s, "Loss": 1.0 / (s + 1)}) for s in range(3)]
    log.write_text("\n".join(lines) + "\n" + lines[0][:7])  # killed mid-write
    with pytest.warns(RuntimeWarning, match="truncated last line"):
        records = bg.cockpit.load(tmp_path)
    assert [r["step"] for r in records] == [0, 1, 2]
    log.write_text(lines[0] + "\n{not json\n" + lines[1] + "\n")
    with pytest.raises(ValueError, match="line 2"):
        bg.cockpit.load(log)
