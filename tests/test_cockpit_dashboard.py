"""The dashboard: every drawn panel filled for each preset (the matplotlib figure's axes are
inspected), the metric panel named with its target line, gradient tests against their
thresholds, Alpha's overflow labelled; drawing in a background worker that never blocks a step
(events, no timing), timed apart from the steps."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

import beyondgrad as bg
from beyondgrad.cockpit import Cockpit
from beyondgrad.cockpit import dashboard as dash
from beyondgrad.cockpit import panels as pn

pytest.importorskip("matplotlib")

CURVATURE_TITLES = {"Largest Hessian eigenvalue", "Curvature trace (GGN diagonal)",
                    "Takeuchi information criterion"}  # fmt: skip


def _records(config, steps=3, **kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cockpit = Cockpit(model, loss_fn, config=config, hist_entries=40, **kw)
    data = torch.Generator().manual_seed(1)
    for step in range(steps):
        X, y = torch.randn(8, 4, generator=data), torch.randint(3, (8,), generator=data)
        opt.zero_grad()
        info = {"val_accuracy": 0.5 + 0.1 * step} if step % 2 == 0 else {}
        with cockpit(step, optimizer=opt, **info):
            loss_fn(model(X), y).backward()
        opt.step()
    return cockpit, list(cockpit.output().values())


def _filled(ax) -> bool:
    texts = [t.get_text() for t in ax.texts]
    drawn = ax.lines or ax.images or ax.patches or ax.collections
    return bool(drawn) and not any("no finite values" in t for t in texts)


@pytest.mark.parametrize("config", ["economy", "business", "full"])
def test_every_drawn_panel_of_a_preset_is_filled(config):
    cockpit, records = _records(config)
    fig = bg.cockpit.figure(records, targets={"val_accuracy": 0.9}, instruments=cockpit.selected)
    axes = fig.axes
    titles = {ax.get_title().split(" (median")[0] for ax in axes}
    empty = [ax.get_title() for ax in axes if not _filled(ax)]
    assert not empty, empty
    assert len(axes) == len(dash.panels(records, cockpit.selected, {"val_accuracy": 0.9}))
    expected = {"Alpha", "Gradient noise scale (B_simple)", "Gradient tests (dashed: thresholds)",
                "Mini-batch loss", "val_accuracy", "Learning rate"}  # fmt: skip
    assert expected <= titles
    if config == "economy":  # what economy does not track is hidden, not drawn empty
        assert not titles & CURVATURE_TITLES and len(axes) == 9
    else:
        assert "Early stopping" in titles and "Mean gradient signal-to-noise ratio" in titles
    if config == "full":
        assert CURVATURE_TITLES | {"Per-layer top GGN eigenvalue"} <= titles
    metric = next(ax for ax in axes if ax.get_title() == "val_accuracy")
    assert any(list(ln.get_ydata()) == [0.9, 0.9] for ln in metric.lines)  # the target line


def test_gradient_tests_are_drawn_against_their_thresholds(monkeypatch):
    monkeypatch.setitem(pn.TEST_THRESHOLDS, "InnerTest", 0.7)
    _, records = _records(["Loss", "NormTest", "InnerTest", "OrthoTest"])
    fig = bg.cockpit.figure(records)
    ax = next(a for a in fig.axes if a.get_title().startswith("Gradient tests"))
    levels = {ln.get_label(): ln.get_ydata()[0] for ln in ax.lines if ln.get_linestyle() == "--"}
    assert levels == {"NormTest threshold 1": 1.0, "InnerTest threshold 0.7": 0.7,
                      "OrthoTest threshold 1": 1.0}  # fmt: skip


def test_alpha_overflow_bins_are_labelled():
    records = [{"step": s, "Alpha": a} for s, a in enumerate([0.1, -0.3, 4.0, 9.0, -2.0])]
    fig = bg.cockpit.figure(records)
    (ax,) = fig.axes
    labels = " ".join(t.get_text() for t in ax.texts)
    assert "> 1.5\n(overflow 2)" in labels and "< -1.5\n(overflow 1)" in labels


def test_custom_instrument_panel_and_nothing_logged():
    panel = pn.Panel((0, 5), "My gauge")
    custom = bg.cockpit.Instrument("Mine", frozenset({"grad"}), lambda d: {"Mine": 1.0}, panel)
    records = [{"step": 0, "Mine": 1.0, "Loss": 2.0}, {"step": 1, "Mine": 2.0, "Loss": 1.0}]
    fig = bg.cockpit.figure(records, instruments=[custom])
    assert [ax.get_title() for ax in fig.axes] == ["My gauge", "Mini-batch loss"]
    assert all(_filled(ax) for ax in fig.axes)


# -- the background worker ---------------------------------------------------------------------
def test_background_drawing_never_blocks_a_step(tmp_path, monkeypatch):
    """A draw held in progress (an event) while three more steps run: they all return; the
    newest request replaces the waiting ones; close() draws the final dashboard."""
    started, release = threading.Event(), threading.Event()
    calls, timed_out = [], []

    def slow_draw(records, path, *args):
        calls.append(len(records))
        started.set()
        if len(calls) == 1:  # the first draw waits until the test releases it
            timed_out.append(not release.wait(60))  # 60 s: only a guard against a deadlock
        return []

    monkeypatch.setattr(dash, "draw", slow_draw)
    torch.manual_seed(0)
    model, loss_fn = nn.Linear(3, 2), nn.MSELoss()
    cockpit = Cockpit(model, loss_fn, config=["Loss", "GradNorm"], log_dir=tmp_path, plot_every=1)
    X, y = torch.randn(4, 3), torch.randn(4, 2)
    for step in range(4):
        with cockpit(step):
            loss_fn(model(X), y).backward()
        if step == 0:
            assert started.wait(60)
    finished_while_drawing = not release.is_set()
    release.set()
    cockpit.close()
    assert finished_while_drawing and timed_out == [False]
    assert calls == [1, 4, 4]  # step 0; the newest of steps 1-3; the final one at close()
    assert cockpit.draws == 3 and cockpit.draw_seconds > 0
    assert not any(t.name == "beyondgrad-dashboard" for t in threading.enumerate())  # idle: gone


def test_background_failure_is_a_warning_not_a_crash(tmp_path, monkeypatch):
    def broken(*args):
        raise OSError("disk full")

    monkeypatch.setattr(dash, "draw", broken)
    model, loss_fn = nn.Linear(3, 2), nn.MSELoss()
    cockpit = Cockpit(model, loss_fn, config=["Loss"], log_dir=tmp_path, plot_every=1)
    with cockpit(0):
        loss_fn(model(torch.randn(4, 3)), torch.randn(4, 2)).backward()
    with pytest.warns(RuntimeWarning, match="disk full"):
        cockpit._drawer.wait()
    with pytest.raises(OSError, match="disk full"):  # on demand: the error itself
        cockpit.plot(tmp_path / "again.png")


def test_plot_on_demand_writes_atomically_and_is_timed(tmp_path):
    cockpit, _ = _records("economy", steps=2)
    out = cockpit.plot(tmp_path / "d.png")
    assert all(p.stat().st_size > 1000 for p in out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.png", "d.svg"]  # no temp files
    assert cockpit.draws == 1 and cockpit.draw_seconds > 0
