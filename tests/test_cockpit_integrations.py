"""Trainer integrations: the Lightning and Hugging Face ``Trainer`` callbacks attach the Cockpit
(and a beyondgrad optimizer) with one line, on a tiny model; W&B logging through a fake
``wandb`` module. Skipped when a framework is not installed."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from torch import nn

import beyondgrad as bg
from beyondgrad.cockpit import Cockpit

N, D_IN, D_OUT = 8, 4, 3


def _data(steps):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(N, D_IN, generator=g), torch.randint(D_OUT, (N,), generator=g))
            for _ in range(steps)]  # fmt: skip


def _grad_norm(model, loss_fn, X, y):
    grads = torch.autograd.grad(loss_fn(model(X), y), list(model.parameters()))
    return float(torch.cat([g.reshape(-1) for g in grads]).norm())


# -- PyTorch Lightning -------------------------------------------------------------------------
def _lightning_module(pl, optimizer="sgd"):
    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(D_IN, 5), nn.Tanh(), nn.Linear(5, D_OUT))
            self.loss_fn = nn.CrossEntropyLoss()

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            X, y = batch
            return self.loss_fn(self(X), y)

        def configure_optimizers(self):
            if optimizer == "kfac":
                return bg.optim.KFAC(self, self.loss_fn, lr=0.05)
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return Tiny()


def _fit(pl, module, callback, steps, tmp_path, **kw):
    trainer = pl.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, callbacks=[callback],
        default_root_dir=str(tmp_path), **kw,
    )  # fmt: skip
    X = torch.cat([b[0] for b in _data(steps)])
    y = torch.cat([b[1] for b in _data(steps)])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=N)
    trainer.fit(module, train_dataloaders=loader)
    return trainer


def test_lightning_callback_attaches_the_cockpit(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from beyondgrad.integrations.lightning import CockpitCallback

    module = _lightning_module(pl)
    start = {k: v.clone() for k, v in module.state_dict().items()}
    logger = pl.loggers.CSVLogger(str(tmp_path), name="csv")
    callback = CockpitCallback("economy", log_dir=tmp_path / "cockpit")  # the one line
    _fit(pl, module, callback, 3, tmp_path, logger=logger)
    out = callback.cockpit.output()
    assert sorted(out) == [0, 1, 2]
    assert {"Loss", "GradNorm", "NormTest", "UpdateSize", "GradHist1d"} <= set(out[0])
    assert "Alpha" in out[1] and "Distance" in out[2]
    X, y = _data(3)[0]
    fresh = _lightning_module(pl)
    fresh.load_state_dict(start)
    assert out[0]["GradNorm"] == pytest.approx(_grad_norm(fresh, fresh.loss_fn, X, y), rel=1e-5)
    assert [r["step"] for r in bg.cockpit.load(tmp_path / "cockpit")] == [0, 1, 2]
    logged = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text()
    assert "cockpit/GradNorm" in logged and "cockpit/UpdateSize" in logged
    state = callback.state_dict()["cockpit"]
    again = CockpitCallback("economy")
    again.load_state_dict({"cockpit": state})  # restored once the Cockpit is built
    assert again.state_dict()["cockpit"] is state


def test_lightning_callback_with_a_beyondgrad_optimizer(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from beyondgrad.integrations.lightning import CockpitCallback

    module = _lightning_module(pl, optimizer="kfac")
    before = [p.detach().clone() for p in module.parameters()]
    callback = CockpitCallback(["Loss", "GradNorm", "UpdateSize"], log_dir=tmp_path / "c")
    trainer = _fit(pl, module, callback, 3, tmp_path, logger=False)
    opt = trainer.optimizers[0]
    assert isinstance(opt, bg.optim.KFAC)
    assert all(
        target == "kfac" for target, _ in opt.routes.values()
    )  # preconditioned, not fallback
    assert any(not torch.equal(b, p) for b, p in zip(before, module.parameters()))
    assert sorted(callback.cockpit.output()) == [0, 1, 2]
    assert all(r["UpdateSize"] > 0 for r in callback.cockpit.output().values())


# -- Hugging Face transformers -----------------------------------------------------------------
class _HFModel(nn.Module):
    """A transformers-style model: ``forward(x, labels)`` returns ``{"loss", "logits"}``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(D_IN, 5), nn.Tanh(), nn.Linear(5, D_OUT))
        self.loss_fn = nn.CrossEntropyLoss()

    def forward(self, x, labels=None):
        logits = self.net(x)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = self.loss_fn(logits, labels)
        return out


class _Rows(torch.utils.data.Dataset):
    def __init__(self, batches):
        self.X = torch.cat([b[0] for b in _data(batches)])
        self.y = torch.cat([b[1] for b in _data(batches)])

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"x": self.X[i], "labels": self.y[i]}


def _hf_train(tmp_path, callback, steps=3, optimizers=(None, None), max_grad_norm=1.0):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    model = _HFModel()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf"), per_device_train_batch_size=N, max_steps=steps,
        learning_rate=0.1, lr_scheduler_type="constant", report_to=[], save_strategy="no",
        logging_strategy="no", use_cpu=True, max_grad_norm=max_grad_norm, seed=0,
        dataloader_drop_last=True, data_seed=0,
    )  # fmt: skip
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=_Rows(1), callbacks=[callback],
        optimizers=optimizers,
    )  # fmt: skip
    trainer.train()
    return trainer, model


def test_transformers_callback_attaches_the_cockpit(tmp_path):
    pytest.importorskip("transformers")
    from beyondgrad.integrations.huggingface import CockpitCallback

    callback = CockpitCallback("economy", log_dir=tmp_path / "cockpit")  # the one line
    start = _HFModel().state_dict()
    _hf_train(tmp_path, callback, max_grad_norm=1e-3)  # clipping: after the Cockpit read
    out = callback.cockpit.output()
    assert sorted(out) == [0, 1, 2]
    assert {"Loss", "GradNorm", "NormTest", "UpdateSize"} <= set(out[0]) and "Alpha" in out[1]
    fresh = _HFModel()
    fresh.load_state_dict(start)
    X, y = _data(1)[0]  # every step's batch: the whole (shuffled) data set
    expected = _grad_norm(fresh.net, fresh.loss_fn, X, y)
    assert expected > 1e-2  # the clipped gradient's norm would be 1e-3
    assert out[0]["GradNorm"] == pytest.approx(expected, rel=1e-5)
    assert [r["step"] for r in bg.cockpit.load(tmp_path / "cockpit")] == [0, 1, 2]


def test_transformers_callback_with_a_beyondgrad_optimizer(tmp_path):
    pytest.importorskip("transformers")
    from beyondgrad.integrations.huggingface import CockpitCallback

    torch.manual_seed(0)
    model = _HFModel()
    opt = bg.optim.KFAC(model, model.loss_fn, lr=0.05)
    callback = CockpitCallback(["Loss", "GradNorm"], log_dir=tmp_path / "c")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf"), per_device_train_batch_size=N, max_steps=2,
        report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
        max_grad_norm=0.0,
    )  # fmt: skip
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=_Rows(1), callbacks=[callback],
        optimizers=(opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)),
    )  # fmt: skip
    trainer.train()
    assert all(target == "kfac" for target, _ in opt.routes.values())
    assert sorted(callback.cockpit.output()) == [0, 1]


# -- Weights & Biases --------------------------------------------------------------------------
def test_wandb_logging_through_a_fake_module(monkeypatch):
    logged = []
    fake = types.ModuleType("wandb")
    fake.run = object()  # an active run
    fake.log = lambda values, step=None: logged.append((step, dict(values)))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    torch.manual_seed(0)
    model, loss_fn = nn.Linear(D_IN, D_OUT), nn.CrossEntropyLoss()
    cockpit = Cockpit(model, loss_fn, config=["Loss", "GradNorm"])  # wandb=None: automatic
    X, y = _data(1)[0]
    with cockpit(0):
        loss_fn(model(X), y).backward()
    assert logged and logged[0][0] == 0
    assert logged[0][1]["cockpit/Loss"] == pytest.approx(cockpit.output()[0]["Loss"])
    assert "cockpit/GradNorm" in logged[0][1]
    off = Cockpit(model, loss_fn, config=["Loss"], wandb=False)
    with off(1):
        loss_fn(model(X), y).backward()
    assert len(logged) == 1
    fake.run = None  # no active run: nothing logged automatically; wandb=True refuses
    with pytest.raises(RuntimeError, match=r"wandb\.init"):
        Cockpit(model, loss_fn, config=["Loss"], wandb=True)
