"""Bad input gets a clear error, never a wrong number."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import beyondgrad as bg
from models import CASES, N


def mlp():
    return CASES["mlp"]()


def test_loss_scaled_after_loss_fn():
    model, X, y, loss_fn = mlp()
    with bg.capture(model, loss_fn, bg.BatchL2()) as session:
        loss = 2 * loss_fn(model(X), y)
    with pytest.raises(RuntimeError, match="not produced directly by loss_fn"):
        session.compute(loss)


def test_loss_called_twice():
    model, X, y, loss_fn = mlp()
    with bg.capture(model, loss_fn, bg.BatchL2()) as session:
        loss_fn(model(X), y)
        loss = loss_fn(model(X), y)
    with pytest.raises(RuntimeError, match="more than once"):
        session.compute(loss)


@pytest.mark.parametrize(
    "loss_fn", [nn.MSELoss(reduction="none"), nn.CrossEntropyLoss(reduction="none")]
)
def test_reduction_none(loss_fn):
    model, X, y, _ = mlp()
    with pytest.raises(ValueError, match="reduction='mean' or 'sum'"):
        bg.compute(model, loss_fn, X, y, bg.BatchGrad())


@pytest.mark.parametrize(
    "loss_fn", [nn.L1Loss(), nn.NLLLoss(), F.cross_entropy, lambda f, y: f.sum()]
)
def test_unsupported_loss_lists_supported(loss_fn):
    model, X, y, _ = mlp()
    with pytest.raises(
        TypeError, match=r"nn\.MSELoss, nn\.CrossEntropyLoss, nn\.BCEWithLogitsLoss"
    ):
        bg.compute(model, loss_fn, X, y, bg.BatchGrad())


def test_loss_subclass_overriding_forward():
    class Scaled(nn.CrossEntropyLoss):
        def forward(self, f, y):
            return 3 * super().forward(f, y)

    model, X, y, _ = mlp()
    with pytest.raises(TypeError, match="overrides forward"):
        bg.compute(model, Scaled(), X, y, bg.BatchGrad())


def test_batchnorm_train_mode_per_sample():
    model, X, y, loss_fn = CASES["resnet"]()
    model.train()
    with pytest.raises(RuntimeError, match=r"block\.bn1.*batch statistics.*model\.eval"):
        bg.compute(model, loss_fn, X, y, bg.BatchL2())
    # the summed gradient stays well defined in train mode
    model, X, y, loss_fn = CASES["mlp_resnet"]()
    model.train()
    res = bg.compute(model, loss_fn, X, y, bg.Grad())
    model.train()
    expected = torch.autograd.grad(loss_fn(model(X), y), list(model.parameters()))
    for (name, _), e in zip(model.named_parameters(), expected):
        torch.testing.assert_close(res.grad[name], e)


def test_non_finite_loss_and_gradients():
    model, X, y, loss_fn = mlp()
    Xbad = X.clone()
    Xbad[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="loss is not finite"):
        bg.compute(model, loss_fn, Xbad, y, bg.BatchGrad())

    class Inf(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, x):  # finite value, infinite gradient (sqrt at 0)
            return torch.sqrt(self.lin(x) * 0)

    model = Inf().double()
    with pytest.raises(FloatingPointError, match=r"non-finite gradient.*'lin"):
        bg.compute(
            model,
            nn.MSELoss(),
            torch.randn(3, 2, dtype=torch.float64),
            torch.zeros(3, 2, dtype=torch.float64),
            bg.BatchGrad(),
        )


def test_batch_sizes_disagree():
    model, X, y, loss_fn = mlp()
    with pytest.raises(ValueError, match="batch sizes disagree"):
        bg.compute(model, loss_fn, X, y[:-1], bg.BatchGrad())
    mse = nn.MSELoss()
    with bg.capture(model, mse, bg.BatchGrad()) as session:
        loss = mse(model(X), torch.zeros(N, 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="target shape"):
        session.compute(loss)


@pytest.mark.parametrize("index", [[0, N], [-N - 1], []])
def test_subsampling_out_of_range(index):
    model, X, y, loss_fn = mlp()
    with pytest.raises((IndexError, ValueError), match="subsampling"):
        bg.compute(model, loss_fn, X, y, bg.BatchGrad(), subsampling=index)


def test_model_without_trainable_parameters():
    model, X, y, loss_fn = mlp()
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        bg.compute(model, loss_fn, X, y, bg.BatchGrad())


def test_functional_use_of_a_tied_weight_is_refused():
    class FunctionalTie(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(7, 4)

        def forward(self, idx):
            return F.linear(self.emb(idx).mean(1), self.emb.weight)

    model = FunctionalTie().double()
    idx = torch.randint(0, 7, (N, 3))
    with pytest.raises(RuntimeError, match=r"'emb\.weight' is used outside the forward"):
        bg.compute(model, nn.CrossEntropyLoss(), idx, torch.randint(0, 7, (N,)), bg.BatchGrad())


def test_flattened_language_model_logits_get_a_hint():
    """Logits flattened to ``[N*T, V]`` before the loss (the usual language-model code)
    put N*T rows where the layers see N samples: refused, with the layout that works."""

    class TinyLM(nn.Module):
        def __init__(self, flat: bool):
            super().__init__()
            self.emb, self.pos = nn.Embedding(7, 4), nn.Embedding(5, 4)
            self.head, self.flat = nn.Linear(4, 7), flat

        def forward(self, idx):
            pos = torch.arange(idx.shape[1])[None]  # broadcast over the batch
            logits = self.head(self.emb(idx) + self.pos(pos))
            return logits.reshape(-1, 7) if self.flat else logits.transpose(1, 2)

    idx = torch.randint(0, 7, (N, 5))
    y = torch.randint(0, 7, (N, 5))
    loss_fn = nn.CrossEntropyLoss()
    for flat in (True, False):
        model = TinyLM(flat).double()
        with bg.capture(model, loss_fn, bg.KFAC()) as session:
            loss = loss_fn(model(idx), y.reshape(-1) if flat else y)
        if flat:
            with pytest.raises(RuntimeError, match=r"logits\.transpose\(1, 2\)"):
                session.compute(loss)
        else:
            assert session.compute(loss)[bg.KFAC()]["head"].A.shape == (5, 5)


def test_sample_axis_not_first_is_refused():
    class SeqFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):  # x [N, T, 3] -> the layer sees [T, N, 3]
            return self.lin(x.transpose(0, 1)).sum(0)

    X = torch.randn(N, 4, 3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="sample axis"):
        bg.compute(
            SeqFirst().double(),
            nn.MSELoss(),
            X,
            torch.zeros(N, 2, dtype=torch.float64),
            bg.BatchL2(),
        )


def test_dropout_in_generic_module_is_refused():
    class Drop(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return F.dropout(x * self.w, 0.5, self.training)

    model = Drop().double().train()
    with pytest.raises(RuntimeError, match="random numbers"):
        bg.compute(
            model,
            nn.MSELoss(),
            torch.randn(N, 3, dtype=torch.float64),
            torch.zeros(N, 3, dtype=torch.float64),
            bg.BatchGrad(),
        )


def test_input_modified_in_place_after_use():
    class Sneaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            h = torch.tanh(x)
            out = self.lin(h)
            return out + h.mul_(2).sum(1, keepdim=True)  # modifies the Linear's input after use

    with pytest.raises(RuntimeError, match="modified in place"):
        bg.compute(
            Sneaky().double(),
            nn.MSELoss(),
            torch.randn(N, 3, dtype=torch.float64),
            torch.zeros(N, 3, dtype=torch.float64),
            bg.BatchGrad(),
        )


def test_bad_quantity_arguments():
    model, X, y, loss_fn = mlp()
    with pytest.raises(TypeError, match="instance"):
        bg.compute(model, loss_fn, X, y, bg.BatchGrad)
    with pytest.raises(ValueError, match="no quantities"):
        bg.compute(model, loss_fn, X, y)
    with pytest.raises(ValueError, match="accumulate_grad"):
        bg.compute(model, loss_fn, X, y, bg.BatchL2(), accumulate_grad=True)


def test_scale_grad_by_freq_embedding():
    model = nn.Sequential(
        nn.Embedding(6, 3, scale_grad_by_freq=True), nn.Flatten(), nn.Linear(6, 2)
    ).double()
    idx = torch.tensor([[1, 1], [2, 1], [3, 3], [1, 0], [5, 5]])
    y = torch.randint(0, 2, (5,))
    with pytest.raises(RuntimeError, match="scale_grad_by_freq"):
        bg.compute(model, nn.CrossEntropyLoss(), idx, y, bg.BatchGrad())
    res = bg.compute(model, nn.CrossEntropyLoss(), idx, y, bg.Grad())
    expected = torch.autograd.grad(nn.CrossEntropyLoss()(model(idx), y), list(model.parameters()))
    for (name, _), e in zip(model.named_parameters(), expected):
        torch.testing.assert_close(res.grad[name], e)
