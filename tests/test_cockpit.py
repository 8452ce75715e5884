"""Cockpit instruments against brute-force reimplementations (per-sample loops, dense
Hessians/GGNs) in float64."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import beyondgrad as bg
from beyondgrad.cockpit import Cockpit, every, logarithmic
from beyondgrad.cockpit import instruments as ins
from models import CASES, call_model
from oracles.curvature import ggn
from oracles.first_order import per_sample_grads

torch.set_default_dtype(torch.float64)


def _track(cockpit, model, loss_fn, X, y, step=0, optimizer=None):
    if optimizer is not None:
        optimizer.zero_grad()
    else:
        model.zero_grad()
    with cockpit(step, optimizer=optimizer):
        loss = loss_fn(call_model(model, X), y)
        loss.backward()
    if optimizer is not None:
        optimizer.step()
    return cockpit.output().get(step)


def _brute_first_order(model, loss_fn, X, y):
    """Per-sample gradients g_n (scaled so that the batch gradient is their mean)."""
    N = y.shape[0]
    c = float(N) if loss_fn.reduction == "mean" else 1.0
    per = per_sample_grads(model, loss_fn, X, y)
    G = torch.cat([v.reshape(N, -1) for v in per.values()], 1) * c  # [N, D]
    return G, per, c


@pytest.mark.parametrize("case", ["mlp", "resnet", "gpt", "lstm", "dict_inputs"])
def test_first_order_instruments_match_per_sample_loops(case):
    model, X, y, loss_fn = CASES[case]()
    cockpit = Cockpit(model, loss_fn, config="business", curvature_mc=None)
    rec = _track(cockpit, model, loss_fn, X, y)
    G, _, _ = _brute_first_order(model, loss_fn, X, y)
    N, D = G.shape
    g = G.mean(0)
    g2 = float(g @ g)
    assert rec["Loss"] == pytest.approx(float(loss_fn(call_model(model, X), y).detach()), rel=1e-12)
    assert rec["GradNorm"] == pytest.approx(g2**0.5, rel=1e-9)
    dev = G - g
    assert rec["NormTest"] == pytest.approx(
        math.sqrt(float((dev**2).sum()) / (N * (N - 1))) / g2**0.5, rel=1e-8
    )
    dots = G @ g
    assert rec["InnerTest"] == pytest.approx(
        math.sqrt(float(((dots - g2) ** 2).sum()) / (N * (N - 1))) / g2, rel=1e-8
    )
    ortho = G - torch.outer(dots / g2, g)
    assert rec["OrthoTest"] == pytest.approx(
        math.sqrt(float((ortho**2).sum()) / (N * (N - 1))) / g2**0.5, rel=1e-8
    )
    assert rec["GradNoiseScale"] == pytest.approx(float((dev**2).sum()) / (N - 1) / g2, rel=1e-8)
    var = (G**2).mean(0) - g**2
    second = (G**2).mean(0)
    keep = (var > 10 * 2.3e-16 * second) & (second > (10 * 2.3e-16) ** 2 * float(second.max()))
    assert rec["MeanGSNR"] == pytest.approx(float((g[keep] ** 2 / var[keep]).mean()), rel=1e-6)
    s2 = G.var(0)
    assert rec["EarlyStopping"] == pytest.approx(
        1 - N / D * float((g[keep] ** 2 / s2[keep]).sum()), rel=1e-6
    )
    # curvature: the exact GGN diagonal of the mini-batch loss
    dense = ggn(model, loss_fn, X, y)
    diag = torch.diagonal(dense["full"])
    second = (G**2).mean(0)
    assert rec["HessTrace"] == pytest.approx(float(diag.sum()), rel=1e-8)
    assert rec["TICDiag"] == pytest.approx(float((second / (diag + 1e-7)).sum()), rel=1e-6)
    assert rec["TICTrace"] == pytest.approx(float(second.sum() / diag.sum()), rel=1e-8)


def test_full_preset_hessian_eigenvalue_spectra_and_histograms():
    model, X, y, loss_fn = CASES["mlp"]()
    cockpit = Cockpit(
        model, loss_fn, config="full", curvature_mc=None, hess_iters=200, hess_tol=1e-4,
        spectra_k=3, hist_samples=100, hist_entries=500,
    )  # fmt: skip
    rec = _track(cockpit, model, loss_fn, X, y)
    params = dict(model.named_parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in params.values()])
    names, shapes = list(params), [p.shape for p in params.values()]

    def loss_of(theta):
        chunks, start = {}, 0
        for n, s in zip(names, shapes):
            chunks[n] = theta[start : start + s.numel()].view(s)
            start += s.numel()
        return loss_fn(torch.func.functional_call(model, chunks, (X,)), y)

    H = torch.func.hessian(loss_of)(flat)
    assert rec["HessMaxEV"] == pytest.approx(float(torch.linalg.eigvalsh(H)[-1]), rel=1e-6)
    # per-layer GGN spectra = top eigenvalues of the dense per-layer GGN blocks
    dense = ggn(model, loss_fn, X, y)["full"]
    start = 0
    blocks = {}
    for n, s in zip(names, shapes):
        blocks.setdefault(n.rsplit(".", 1)[0], []).append((start, start + s.numel()))
        start += s.numel()
    for layer, spans in blocks.items():
        idx = torch.cat([torch.arange(a, b) for a, b in spans])
        top = torch.linalg.eigvalsh(dense[idx][:, idx]).flip(0)[:3]
        torch.testing.assert_close(torch.tensor(rec["LayerSpectra"][layer]), top)
        assert rec["LayerEffectiveRank"][layer] == pytest.approx(
            float(top.sum() ** 2 / (top**2).sum()), rel=1e-8
        )
    # histograms: every sampled entry counted, inside the range of the true entries
    G, _, _ = _brute_first_order(model, loss_fn, X, y)
    hist = rec["GradHist1d"]
    N = y.shape[0]
    expected = sum(min(500, N * p.numel()) for p in params.values())
    assert sum(hist["counts"]) == expected
    assert hist["limit"] <= float(G.abs().max()) * (1 + 1e-9)
    hist2 = torch.tensor(rec["GradHist2d"]["counts"])
    assert float(hist2.sum()) == expected


def test_sampled_entries_are_per_sample_gradient_entries():
    model, X, y, loss_fn = CASES["resnet"]()
    forms = bg.compute(model, loss_fn, X, y, vectors=[("grad", 1)]).stats.forms()
    per = per_sample_grads(model, loss_fn, X, y)
    g = torch.Generator().manual_seed(0)
    for name, form in forms.items():
        D = per[name][0].numel()
        rows = torch.randint(y.shape[0], (30,), generator=g)
        flat = torch.randint(D, (30,), generator=g)
        torch.testing.assert_close(
            form.entries(rows, flat), per[name].reshape(y.shape[0], -1)[rows, flat]
        )


def test_distance_update_size_and_alpha_on_a_quadratic():
    """Noise-free quadratic (every sample identical): Alpha is -1/2, 0, 1 for steps reaching
    half-way, the floor, and twice as far along the line."""
    torch.manual_seed(0)
    w_star = torch.tensor([[1.0, 2.0]])
    x = torch.tensor([[1.0, 0.5]])
    X, y = x.repeat(4, 1), (x @ w_star.T).repeat(4, 1)
    for lr_scale, expected in ((0.5, -0.5), (1.0, 0.0), (2.0, 1.0)):
        model = nn.Linear(2, 1, bias=False)
        model.weight.data.zero_()
        loss_fn = nn.MSELoss()
        curvature = 2 * float(x @ x.T)  # d^2/dt^2 of the loss along the gradient direction
        lr = lr_scale / curvature
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        cockpit = Cockpit(model, loss_fn, config="economy")
        w0 = model.weight.detach().clone()
        rec0 = _track(cockpit, model, loss_fn, X, y, step=0, optimizer=opt)
        w1 = model.weight.detach().clone()
        rec1 = _track(cockpit, model, loss_fn, X, y, step=1, optimizer=opt)
        assert rec0["UpdateSize"] == pytest.approx(float((w1 - w0).norm()), rel=1e-12)
        assert rec1["Distance"] == pytest.approx(float((w1 - w0).norm()), rel=1e-12)
        assert rec1["Alpha"] == pytest.approx(expected, abs=1e-6)


def test_alpha_without_optimizer_and_with_noise_matches_formula():
    model, X, y, loss_fn = CASES["mlp"]()
    cockpit = Cockpit(model, loss_fn, config=["Loss", "Alpha", "UpdateSize"])
    _track(cockpit, model, loss_fn, X, y, step=0)
    G0, _, _ = _brute_first_order(model, loss_fn, X, y)
    f0 = _per_sample_losses(model, loss_fn, X, y)
    before = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    s = torch.cat([(p.detach() - b).reshape(-1) for p, b in zip(model.parameters(), before)])
    rec1 = _track(cockpit, model, loss_fn, X, y, step=1)
    G1, _, _ = _brute_first_order(model, loss_fn, X, y)
    f1 = _per_sample_losses(model, loss_fn, X, y)
    expected = ins.alpha(f0, G0 @ s, f1, G1 @ s)
    assert rec1["Alpha"] == pytest.approx(expected, rel=1e-8)
    assert cockpit.output()[0]["UpdateSize"] == pytest.approx(float(s.norm()), rel=1e-12)


def _per_sample_losses(model, loss_fn, X, y):
    N = y.shape[0]
    return torch.stack([loss_fn(model(X[n : n + 1]), y[n : n + 1]) for n in range(N)]).detach()


def test_schedules_and_untracked_steps():
    assert [s for s in range(10) if every(3, offset=1)(s)] == [1, 4, 7]
    log = logarithmic(0, 1000, 8)
    tracked = [s for s in range(1001) if log(s)]
    assert tracked[0] == 0 and tracked[-1] == 1000 and len(tracked) <= 8
    model, X, y, loss_fn = CASES["mlp"]()
    cockpit = Cockpit(model, loss_fn, config="economy", schedule=every(4))
    for step in range(6):
        _track(cockpit, model, loss_fn, X, y, step=step)
    assert sorted(cockpit.output()) == [0, 1, 4, 5]  # 1 and 5: Alpha's end points only
    assert set(cockpit.output()[1]) == {"step", "Loss", "Alpha"}


def test_log_dashboard_and_plot_command(tmp_path):
    model, X, y, loss_fn = CASES["mlp"]()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for config in ("economy", "business", "full", ["Loss", "GradNorm"]):
        run = tmp_path / str(config)
        cockpit = Cockpit(model, loss_fn, config=config, log_dir=run, plot_every=2)
        for step in range(3):
            _track(cockpit, model, loss_fn, X, y, step=step, optimizer=opt)
        cockpit.close()
        records = bg.cockpit.load(run)
        assert [r["step"] for r in records] == [0, 1, 2]
        assert "UpdateSize" in records[0] or config == ["Loss", "GradNorm"]
        assert (run / "dashboard.png").stat().st_size > 10_000
        out = bg.cockpit.draw(records, run / "again.png")
        assert all(p.exists() for p in out)
    from beyondgrad.app.cli import main

    assert main(["plot", str(tmp_path / "full"), "--out", str(tmp_path / "redrawn.png")]) == 0
    assert (tmp_path / "redrawn.svg").exists()
    line = (tmp_path / "economy" / "cockpit.jsonl").read_text().splitlines()[0]
    assert json.loads(line)["step"] == 0


def test_errors_are_clear():
    model, X, y, loss_fn = CASES["mlp"]()
    with pytest.raises(ValueError, match="unknown config"):
        Cockpit(model, loss_fn, config="first-class")
    with pytest.raises(ValueError, match="unknown instruments"):
        Cockpit(model, loss_fn, config=["Loss", "Speedometer"])
    cockpit = Cockpit(model, loss_fn)
    with pytest.raises(RuntimeError, match=r"loss\.backward"), cockpit(0):
        loss_fn(model(X), y)
    with pytest.raises(RuntimeError, match="loss_fn was not called"), cockpit(1):
        model(X)


def test_train_command_end_to_end(tmp_path, capsys):
    from beyondgrad.app.cli import main

    out = tmp_path / "run"
    argv = ["train", "--steps", "12", "--eval-every", "5", "--plot-every", "100", "--quiet"]
    assert main([*argv, "--out", str(out), "--optimizer", "singd", "--cockpit", "business"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["optimizer"] == "singd"
    assert "singd" in summary["routing"]
    records = bg.cockpit.load(out)
    assert [r["step"] for r in records] == list(range(12))
    assert all("HessTrace" in r and "NormTest" in r for r in records)
    assert sum("val_accuracy" in r for r in records) == 4  # steps 0, 5, 10, 11
    assert (out / "dashboard.png").exists() and (out / "dashboard.svg").exists()
    assert json.loads((out / "config.json").read_text())["cockpit"] == "business"
    assert "run directory" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["train", "--steps", "0"])
    with pytest.raises(SystemExit):
        main(["train", "--optimizer", "lbfgs"])
    with pytest.raises(SystemExit):
        main(["plot", str(tmp_path / "missing")])
