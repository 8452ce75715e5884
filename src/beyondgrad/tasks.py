"""Built-in training tasks with no downloads, shared by ``beyondgrad train`` and the optimizer
benchmark (``beyondgrad bench optim``).

==================  ====================================================================  ========
task                model and data                                                        target
==================  ====================================================================  ========
``digits-mlp``      MLP 64-128-128-10 (ReLU) on scikit-learn's bundled digits (1,437       val acc
                    train / 360 validation images, standardized)                           0.98
``digits-cnn``      conv 16 - conv 32 - avg-pool - linear on the digits as 1x8x8 images    val acc
                                                                                           0.985
``transformer``     2-layer transformer encoder (d=64, 4 heads, pre-norm) sorting          val token
                    sequences of 12 tokens over 16 symbols (generated)                      acc 0.99
``kron-lsq``        least squares ``U W x``: ``W`` [16, 32] trained, ``U`` fixed; inputs   excess
                    with covariance of condition 1e3 and ``U^T U`` of condition 1e2, so    loss
                    the Hessian ``U^T U kron Sigma`` is Kronecker-structured, ill-          1e-3 of
                    conditioned and known                                                  initial
==================  ====================================================================  ========

A task gives a model, a loss, a training iterator of batches and an ``evaluate`` function
returning the validation metric (higher is better; ``kron-lsq``: ``1 - excess/initial``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class Task:
    name: str
    model: nn.Module
    loss_fn: nn.Module
    train: tuple[Tensor, Tensor]
    val: tuple[Tensor, Tensor]
    metric: str
    target: float
    evaluate: Callable[[nn.Module], float]
    batch_size: int

    def __post_init__(self) -> None:
        self.model = self.model.float()  # data are float32, whatever the default dtype

    @property
    def metric_key(self) -> str:
        """The validation metric's name in logs, e.g. ``val_accuracy``."""
        return "val_" + re.sub(r"[^a-z0-9]+", "_", self.metric.lower()).strip("_")

    def batches(self, seed: int) -> Iterator[tuple[Tensor, Tensor]]:
        """An endless stream of shuffled mini-batches (epochs reshuffled with ``seed``)."""
        X, y = self.train
        g = torch.Generator().manual_seed(seed)
        while True:
            order = torch.randperm(X.shape[0], generator=g)
            for start in range(0, X.shape[0] - self.batch_size + 1, self.batch_size):
                idx = order[start : start + self.batch_size]
                yield X[idx], y[idx]


def _digits(seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - scikit-learn is a dependency
        raise ImportError("the digits tasks need scikit-learn (pip install scikit-learn)") from err
    data = load_digits()
    X = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.long)
    g = torch.Generator().manual_seed(1234)  # one fixed split for every seed
    order = torch.randperm(X.shape[0], generator=g)
    X, y = X[order], y[order]
    n_train = 1437
    mean, std = X[:n_train].mean(0), X[:n_train].std(0).clamp(min=1e-3)
    X = (X - mean) / std
    return X[:n_train], y[:n_train], X[n_train:], y[n_train:]


def _accuracy(model: nn.Module, X: Tensor, y: Tensor) -> float:
    was = model.training
    model.eval()
    with torch.no_grad():
        out = model(X)
    model.train(was)
    pred = out.argmax(1)
    return float((pred == y).float().mean())


class SequenceSorter(nn.Module):
    """Token + position embeddings, pre-norm encoder layers, a linear head per position."""

    def __init__(
        self, vocab: int = 10, length: int = 8, d: int = 64, heads: int = 4, layers: int = 2
    ):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(length, d)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True
            )
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, x: Tensor) -> Tensor:
        positions = torch.arange(x.shape[1], device=x.device).expand_as(x)
        h = self.tok(x) + self.pos(positions)  # positions per sample: a sample axis first
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h)).transpose(1, 2)  # [N, V, S]: classes on axis 1


def make_task(name: str, seed: int = 0) -> Task:
    """Build task ``name`` (see the module table); ``seed`` sets the initialization."""
    torch.manual_seed(seed)
    if name in ("digits-mlp", "digits-cnn"):
        Xtr, ytr, Xva, yva = _digits(seed)
        if name == "digits-mlp":
            model: nn.Module = nn.Sequential(
                nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
            )
        else:
            Xtr, Xva = Xtr.reshape(-1, 1, 8, 8), Xva.reshape(-1, 1, 8, 8)
            model = nn.Sequential(
                nn.Conv2d(1, 16, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(16, 32, 3, padding=1),
                nn.ReLU(),
                nn.AvgPool2d(2),
                nn.Flatten(),
                nn.Linear(32 * 16, 10),
            )
        return Task(
            name,
            model,
            nn.CrossEntropyLoss(),
            (Xtr, ytr),
            (Xva, yva),
            "accuracy",
            0.98 if name == "digits-mlp" else 0.985,
            lambda m: _accuracy(m, Xva, yva),
            64,
        )
    if name == "transformer":
        g = torch.Generator().manual_seed(4321)
        Xtr = torch.randint(0, 16, (8192, 12), generator=g)
        Xva = torch.randint(0, 16, (1024, 12), generator=g)
        model = SequenceSorter(vocab=16, length=12)
        return Task(
            name,
            model,
            nn.CrossEntropyLoss(),
            (Xtr, Xtr.sort(1).values),
            (Xva, Xva.sort(1).values),
            "token accuracy",
            0.99,
            lambda m: _accuracy(m, Xva, Xva.sort(1).values),
            64,
        )
    if name == "kron-lsq":
        return _kron_lsq()
    raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")


def _spectrum(n: int, cond: float, g: torch.Generator) -> Tensor:
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return Q @ torch.diag(torch.logspace(0, math.log10(cond), n, dtype=torch.float64)) @ Q.T


def _kron_lsq() -> Task:
    g = torch.Generator().manual_seed(99)
    n_in, n_out, N = 32, 16, 4096
    Sigma = _spectrum(n_in, 1e3, g)
    UtU = _spectrum(n_out, 1e2, g)
    U = torch.linalg.cholesky(UtU).T  # U^T U = UtU
    L = torch.linalg.cholesky(Sigma)
    X = (torch.randn(N, n_in, generator=g, dtype=torch.float64) @ L.T).float()
    W_true = torch.randn(n_out, n_in, generator=g, dtype=torch.float64) / n_in**0.5
    Y = (
        X.double() @ W_true.T @ U.T + 0.01 * torch.randn(N, n_out, generator=g, dtype=torch.float64)
    ).float()
    mixer = nn.Linear(n_out, n_out, bias=False)
    mixer.weight.data = U.float()
    mixer.weight.requires_grad_(False)
    model = nn.Sequential(nn.Linear(n_in, n_out, bias=False), mixer)
    model[0].weight.data.zero_()
    # the exact minimizer and minimum of the training loss (normal equations in float64)
    Xd, Yd = X.double(), Y.double()
    Z = torch.linalg.solve(U, Yd.T).T  # targets in the space of W x
    W_star = torch.linalg.lstsq(Xd, Z).solution.T
    loss_fn = nn.MSELoss()

    def full_loss(W: Tensor) -> float:
        return float(((Xd @ W.T @ U.T - Yd) ** 2).mean())

    best = full_loss(W_star)
    initial = full_loss(torch.zeros_like(W_star)) - best

    def evaluate(m: nn.Module) -> float:
        return 1.0 - (full_loss(m[0].weight.detach().double()) - best) / initial

    return Task(
        "kron-lsq", model, loss_fn, (X, Y), (X, Y), "1 - excess/initial", 1 - 1e-3, evaluate, 256
    )


TASKS = ("digits-mlp", "digits-cnn", "transformer", "kron-lsq")

__all__ = ["TASKS", "Task", "make_task"]
