"""The built-in model zoo (no downloads), shared by ``beyondgrad train``, ``beyondgrad demo``,
``beyondgrad bench optim``, the benchmark scripts and the tests.

Every entry is a :class:`Task`: a model, a loss, training and validation data, a metric and,
for the trainable tasks, a target. :meth:`Task.batches` streams shuffled mini-batches (resumable
at any step); :meth:`Task.problem` gives one fixed batch (model, loss, ``X``, ``y``) for timing.

==================  ====================================================================  ========
trainable task      model and data                                                        target
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
``char-gpt``        4-layer pre-LN GPT (d=128, 4 heads, context 128, untied head) on       val loss
                    bytes: the first 2 MiB of the standard library's top-level ``.py``     <= 1.9
                    files in sorted order (:func:`stdlib_corpus`), 90 % train / the next
                    128 windows validation; batch 16 windows
``autoencoder``     64-1000-500-250-30-250-500-1000-64 (tanh, linear code and output) on   val MSE
                    the digits scaled to [0, 1]; MSE reconstruction loss, batch 128         <= 0.02
``digits-resnet``   residual CNN with BatchNorm (:func:`resnet`, 32/64 channels) on the    val acc
                    digits upscaled to 16x16, 4 (train) / 2 (validation) fixed random      0.97
                    affine variants each (:func:`augment_digits`), batch 128
==================  ====================================================================  ========

The last three (with ``kron-lsq``: :data:`SUITE_TASKS`) are the optimizer suite's
(``benchmarks/optim_suite.py``); their targets here are provisional, the suite calibrates its
own (AdamW's median quality at a fixed budget, ``benchmarks/results/optim_suite_configs.json``).
Their metrics are minimized for ``char-gpt`` and ``autoencoder`` (:attr:`Task.maximize`;
:meth:`Task.reached` compares in the right direction). The ``char-gpt`` corpus depends on the
Python version (the files ship with it).

Benchmark shapes (one batch of random data from a seeded generator, random labels, no target):

* ``mlp``: 784-512-256-10 ReLU MLP, batch 128, cross-entropy (535,818 parameters).
* ``cnn``: DeepOBS 3C3D on 3x32x32, batch 64, cross-entropy (895,210 parameters).
* ``gpt``: 2-layer pre-LN GPT, d=128, 4 heads, vocab 256, sequence 64, batch 16, MLP with GELU,
  causal attention written with ``nn.Linear``, head tied to the token embedding, cross-entropy
  averaged over tokens. Among the benchmark problems (:data:`PROBLEMS`,
  :func:`make_problem`) it is called ``transformer``.

The digits tasks need scikit-learn (``pip install "beyondgrad[app]"``); the others need torch.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class Problem:
    """One fixed batch of a zoo entry: ``loss_fn(model(X), y)``."""

    name: str
    model: nn.Module
    loss_fn: nn.Module
    X: Tensor
    y: Tensor

    def to(self, device: str | torch.device) -> Problem:
        """The same problem with model, loss and data on ``device``."""
        return Problem(
            self.name,
            self.model.to(device),
            self.loss_fn.to(device),
            self.X.to(device),
            self.y.to(device),
        )

    @property
    def num_params(self) -> int:
        """Number of parameters of the model."""
        return sum(p.numel() for p in self.model.parameters())


@dataclass
class Task:
    """A zoo entry.

    Attributes:
        name: the zoo name.
        model: the model (its initialization set by the seed given to :func:`make_task`).
        loss_fn: the loss, ``loss_fn(model(X), y)``.
        train: training inputs and targets (leading sample axis).
        val: validation inputs and targets.
        metric: the validation metric's name.
        target: the metric value that counts as solved (``None``: no target).
        evaluate: ``model -> metric`` on the validation data.
        batch_size: mini-batch size of :meth:`batches`.
        maximize: whether a higher metric is better (``False`` for losses and errors).
    """

    name: str
    model: nn.Module
    loss_fn: nn.Module
    train: tuple[Tensor, Tensor]
    val: tuple[Tensor, Tensor]
    metric: str
    target: float | None
    evaluate: Callable[[nn.Module], float]
    batch_size: int
    maximize: bool = True

    def reached(self, metric: float) -> bool:
        """Whether ``metric`` meets the target (``>=`` it, or ``<=`` for a minimized metric);
        ``False`` without a target or for a non-finite metric."""
        if self.target is None or not math.isfinite(metric):
            return False
        return metric >= self.target if self.maximize else metric <= self.target

    def better(self, a: float, b: float) -> bool:
        """Whether metric ``a`` is strictly better than ``b`` (a non-finite one never is)."""
        if not math.isfinite(a):
            return False
        if not math.isfinite(b):
            return True
        return a > b if self.maximize else a < b

    @property
    def metric_key(self) -> str:
        """The validation metric's name in logs, e.g. ``val_accuracy``."""
        return "val_" + re.sub(r"[^a-z0-9]+", "_", self.metric.lower()).strip("_")

    @property
    def batches_per_epoch(self) -> int:
        """Full mini-batches per pass over the training data (a last partial one is dropped)."""
        return self.train[0].shape[0] // self.batch_size

    def batches(self, seed: int, start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """An endless stream of shuffled mini-batches, each epoch reshuffled by a generator
        seeded with ``seed``; ``start`` skips that many batches (so a resumed run sees exactly
        the batches an uninterrupted one would), without gathering them."""
        X, y = self.train
        g = torch.Generator().manual_seed(seed)
        per_epoch, bs = self.batches_per_epoch, self.batch_size
        epochs, offset = divmod(start, per_epoch)
        for _ in range(epochs):
            torch.randperm(X.shape[0], generator=g)
        while True:
            order = torch.randperm(X.shape[0], generator=g)
            for b in range(offset, per_epoch):
                idx = order[b * bs : (b + 1) * bs]
                yield X[idx], y[idx]
            offset = 0

    def problem(self, batch_size: int | None = None) -> Problem:
        """The first ``batch_size`` (default: :attr:`batch_size`) training samples, in order."""
        n = batch_size or self.batch_size
        X, y = self.train
        return Problem(self.name, self.model, self.loss_fn, X[:n], y[:n])


# -- models ------------------------------------------------------------------------------------
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
        """Logits ``[N, vocab, S]`` (classes on axis 1) for tokens ``x`` ``[N, S]``."""
        positions = torch.arange(x.shape[1], device=x.device).expand_as(x)
        h = self.tok(x) + self.pos(positions)  # positions per sample: a sample axis first
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h)).transpose(1, 2)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention written with two ``nn.Linear`` layers."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, T, D] -> [B, T, D]``."""
        B, T, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=-1)
        q, k, v = (t.view(B, T, self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(D // self.heads))
        mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        att = att.masked_fill(~mask, float("-inf")).softmax(-1)
        return self.proj((att @ v).transpose(1, 2).reshape(B, T, D))


class GPTBlock(nn.Module):
    """Pre-LN transformer block: attention and a GELU MLP, both residual."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, heads)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, T, d] -> [B, T, d]``."""
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyGPT(nn.Module):
    """Returns logits ``[N, vocab, T]`` (class axis second, for ``nn.CrossEntropyLoss``);
    ``tied``: the head shares the token embedding's weight."""

    def __init__(
        self, vocab: int = 256, d: int = 128, heads: int = 4, layers: int = 2,
        max_len: int = 64, tied: bool = True,
    ):  # fmt: skip
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(max_len, d)
        self.blocks = nn.ModuleList(GPTBlock(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.head.weight = self.tok.weight

    def forward(self, idx: Tensor) -> Tensor:
        """Logits ``[B, vocab, T]`` for tokens ``idx`` ``[B, T]``."""
        B, T = idx.shape
        pos = torch.arange(T, device=idx.device).unsqueeze(0).expand(B, T)
        x = self.tok(idx) + self.pos(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x)).transpose(1, 2)


def c3d3(num_classes: int = 10) -> nn.Sequential:
    """DeepOBS 3C3D (TF 'same' max-pool padding = bottom/right zero padding on even sizes)."""
    return nn.Sequential(
        nn.Conv2d(3, 64, 5),
        nn.ReLU(),
        nn.ZeroPad2d((0, 1, 0, 1)),
        nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 96, 3),
        nn.ReLU(),
        nn.ZeroPad2d((0, 1, 0, 1)),
        nn.MaxPool2d(3, 2),
        nn.Conv2d(96, 128, 3, padding=1),
        nn.ReLU(),
        nn.ZeroPad2d((0, 1, 0, 1)),
        nn.MaxPool2d(3, 2),
        nn.Flatten(),
        nn.Linear(128 * 3 * 3, 512),
        nn.ReLU(),
        nn.Linear(512, 256),
        nn.ReLU(),
        nn.Linear(256, num_classes),
    )


# -- data and metrics ---------------------------------------------------------------------------
def _digits(standardize: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's digits ``[N, 64]`` (pixels 0-16) and labels, one fixed split: 1,437
    train, 360 validation; ``standardize``: per pixel, with the training statistics."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError(
            'the digits tasks need scikit-learn: pip install "beyondgrad[app]"'
        ) from err
    data = load_digits()
    X = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.long)
    g = torch.Generator().manual_seed(1234)  # one fixed split for every seed
    order = torch.randperm(X.shape[0], generator=g)
    X, y = X[order], y[order]
    n_train = 1437
    if not standardize:
        return X[:n_train], y[:n_train], X[n_train:], y[n_train:]
    mean, std = X[:n_train].mean(0), X[:n_train].std(0).clamp(min=1e-3)
    X = (X - mean) / std
    return X[:n_train], y[:n_train], X[n_train:], y[n_train:]


def _accuracy(model: nn.Module, X: Tensor, y: Tensor) -> float:
    """Fraction of correct argmax predictions (classes on axis 1), in eval mode, no grad."""
    was = model.training
    model.eval()
    with torch.no_grad():
        out = model(X.to(next(model.parameters()).device))
    model.train(was)
    return float((out.argmax(1).cpu() == y).float().mean())


def _classification(name: str, model: nn.Module, train: tuple[Tensor, Tensor],
                    val: tuple[Tensor, Tensor], metric: str, target: float | None,
                    batch_size: int) -> Task:  # fmt: skip
    return Task(
        name, model, nn.CrossEntropyLoss(), train, val, metric, target,
        lambda m: _accuracy(m, *val), batch_size,
    )  # fmt: skip


# -- the entries --------------------------------------------------------------------------------
def _digits_task(name: str, batch_size: int | None) -> Task:
    Xtr, ytr, Xva, yva = _digits()
    if name == "digits-mlp":
        model: nn.Module = nn.Sequential(
            nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
        )
        target = 0.98
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
        target = 0.985
    return _classification(
        name, model.float(), (Xtr, ytr), (Xva, yva), "accuracy", target, batch_size or 64
    )


def _sorting_task(batch_size: int | None) -> Task:
    g = torch.Generator().manual_seed(4321)
    Xtr = torch.randint(0, 16, (8192, 12), generator=g)
    Xva = torch.randint(0, 16, (1024, 12), generator=g)
    model = SequenceSorter(vocab=16, length=12).float()
    train, val = (Xtr, Xtr.sort(1).values), (Xva, Xva.sort(1).values)
    return _classification(
        "transformer", model, train, val, "token accuracy", 0.99, batch_size or 64
    )


def _spectrum(n: int, cond: float, g: torch.Generator) -> Tensor:
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return Q @ torch.diag(torch.logspace(0, math.log10(cond), n, dtype=torch.float64)) @ Q.T


def _kron_lsq(batch_size: int | None) -> Task:
    g = torch.Generator().manual_seed(99)
    n_in, n_out, N = 32, 16, 4096
    Sigma = _spectrum(n_in, 1e3, g)
    UtU = _spectrum(n_out, 1e2, g)
    U = torch.linalg.cholesky(UtU).T  # U^T U = UtU
    L = torch.linalg.cholesky(Sigma)
    X = (torch.randn(N, n_in, generator=g, dtype=torch.float64) @ L.T).float()
    W_true = torch.randn(n_out, n_in, generator=g, dtype=torch.float64) / n_in**0.5
    noise = 0.01 * torch.randn(N, n_out, generator=g, dtype=torch.float64)
    Y = (X.double() @ W_true.T @ U.T + noise).float()
    mixer = nn.Linear(n_out, n_out, bias=False)
    mixer.weight.data = U.float()
    mixer.weight.requires_grad_(False)
    model = nn.Sequential(nn.Linear(n_in, n_out, bias=False), mixer).float()
    model[0].weight.data.zero_()
    # the exact minimizer and minimum of the training loss (normal equations in float64)
    Xd, Yd = X.double(), Y.double()
    Z = torch.linalg.solve(U, Yd.T).T  # targets in the space of W x
    W_star = torch.linalg.lstsq(Xd, Z).solution.T

    def full_loss(W: Tensor) -> float:
        return float(((Xd @ W.T @ U.T - Yd) ** 2).mean())

    best = full_loss(W_star)
    initial = full_loss(torch.zeros_like(W_star)) - best

    def evaluate(m: nn.Module) -> float:
        return 1.0 - (full_loss(m[0].weight.detach().cpu().double()) - best) / initial

    return Task(
        "kron-lsq", model, nn.MSELoss(), (X, Y), (X, Y), "1 - excess/initial", 1 - 1e-3,
        evaluate, batch_size or 256,
    )  # fmt: skip


# -- the optimizer suite's tasks (benchmarks/optim_suite.py) -----------------------------------
CORPUS_BYTES = 2 * 2**20
"""Size of the ``char-gpt`` corpus: the first 2 MiB of the concatenated standard library."""
CONTEXT = 128
"""Context length (tokens) of ``char-gpt``."""


def stdlib_corpus(num_bytes: int = CORPUS_BYTES) -> bytes:
    """The first ``num_bytes`` of the top-level ``.py`` files of this Python's standard library
    (``sysconfig.get_paths()['stdlib']``), in sorted file-name order, concatenated.

    Deterministic for a given Python version (the files ship with Python; nothing is
    downloaded). Raises ``RuntimeError`` where the sources are missing or too short.
    """
    import sysconfig
    from pathlib import Path

    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, size = [], 0
    for path in sorted(root.glob("*.py"), key=lambda p: p.name):
        data = path.read_bytes()
        chunks.append(data)
        size += len(data)
        if size >= num_bytes:
            return b"".join(chunks)[:num_bytes]
    raise RuntimeError(f"the standard library's sources in {root} have {size} < {num_bytes} bytes")


def _windows(tokens: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """Non-overlapping windows of ``length + 1`` tokens: inputs ``[n, length]`` and the next
    tokens ``[n, length]``."""
    n = (tokens.numel() - 1) // length
    X = tokens[: n * length].view(n, length)
    y = tokens[1 : n * length + 1].view(n, length)
    return X, y


def _mean_loss(model: nn.Module, loss_fn: nn.Module, X: Tensor, y: Tensor, chunk: int) -> float:
    """Mean of ``loss_fn`` over ``(X, y)`` in chunks of ``chunk`` samples, eval mode, no grad."""
    was, device = model.training, next(model.parameters()).device
    model.eval()
    total = 0.0
    with torch.no_grad():
        for i in range(0, X.shape[0], chunk):
            xb, yb = X[i : i + chunk].to(device), y[i : i + chunk].to(device)
            total += float(loss_fn(model(xb), yb)) * xb.shape[0]
    model.train(was)
    return total / X.shape[0]


def _char_gpt(batch_size: int | None) -> Task:
    data = torch.frombuffer(bytearray(stdlib_corpus()), dtype=torch.uint8).long()
    n_train = int(0.9 * data.numel())  # the first 90 % train, the last 10 % validation
    train = _windows(data[:n_train], CONTEXT)
    Xva, yva = _windows(data[n_train:], CONTEXT)
    Xva, yva = Xva[:128], yva[:128]  # 16,384 validation tokens
    model = TinyGPT(vocab=256, d=128, heads=4, layers=4, max_len=CONTEXT, tied=False)
    loss_fn = nn.CrossEntropyLoss()
    return Task(
        "char-gpt", model.float(), loss_fn, train, (Xva, yva), "loss", 1.9,
        lambda m: _mean_loss(m, loss_fn, Xva, yva, 64), batch_size or 16, maximize=False,
    )  # fmt: skip


def _autoencoder(batch_size: int | None) -> Task:
    Xtr, _, Xva, _ = _digits(standardize=False)
    Xtr, Xva = Xtr / 16.0, Xva / 16.0  # pixels in [0, 1]
    widths = [64, 1000, 500, 250, 30, 250, 500, 1000, 64]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(a, b))
        if i not in (3, len(widths) - 2):  # linear code layer and output
            layers.append(nn.Tanh())
    loss_fn = nn.MSELoss()
    return Task(
        "autoencoder", nn.Sequential(*layers).float(), loss_fn, (Xtr, Xtr), (Xva, Xva),
        "reconstruction error", 0.02, lambda m: _mean_loss(m, loss_fn, Xva, Xva, 1024),
        batch_size or 128, maximize=False,
    )  # fmt: skip


class ResBlock(nn.Module):
    """``relu(x + bn(conv(relu(bn(conv(x))))))``, 3x3 convolutions, channels kept."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        """``[N, C, H, W] -> [N, C, H, W]``."""
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


def resnet(channels: int = 16, num_classes: int = 10) -> nn.Sequential:
    """Small residual CNN for 1x16x16 images: a stem, a residual block, a strided convolution
    to ``2 * channels``, a residual block, global average pooling, a linear head."""
    c = channels
    return nn.Sequential(
        nn.Conv2d(1, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(), ResBlock(c),
        nn.Conv2d(c, 2 * c, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * c),
        nn.ReLU(), ResBlock(2 * c), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(2 * c, num_classes),
    )  # fmt: skip


def augment_digits(X: Tensor, copies: int, g: torch.Generator) -> Tensor:
    """``copies`` random affine variants of each 8x8 digit ``X`` ``[N, 64]``, upscaled to
    16x16: rotation up to 15 degrees, scale 0.9-1.1, shift up to 2 of 16 pixels (bilinear,
    drawn from ``g``). Returns ``[copies * N, 1, 16, 16]``, copy-major."""
    images = F.interpolate(X.view(-1, 1, 8, 8), size=16, mode="bilinear", align_corners=False)
    images = images.repeat(copies, 1, 1, 1)
    n, dt = images.shape[0], images.dtype  # whatever torch's default dtype
    angle = (torch.rand(n, generator=g, dtype=dt) * 2 - 1) * math.radians(15)
    scale = 1 / (0.9 + 0.2 * torch.rand(n, generator=g, dtype=dt))
    shift = (torch.rand(n, 2, generator=g, dtype=dt) * 2 - 1) * (2 / 8)  # 2 px of 16
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1),
                         torch.stack([sin, cos, shift[:, 1]], 1)], 1)  # fmt: skip
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, align_corners=False)


def _digits_resnet(batch_size: int | None) -> Task:
    Xtr, ytr, Xva, yva = _digits(standardize=False)
    g = torch.Generator().manual_seed(2024)  # one fixed augmentation for every seed
    Xtr, Xva = augment_digits(Xtr / 16.0, 4, g), augment_digits(Xva / 16.0, 2, g)
    ytr, yva = ytr.repeat(4), yva.repeat(2)
    mean, std = Xtr.mean(), Xtr.std()
    Xtr, Xva = (Xtr - mean) / std, (Xva - mean) / std
    return _classification(
        "digits-resnet", resnet(32).float(), (Xtr, ytr), (Xva, yva), "accuracy", 0.97,
        batch_size or 128,
    )  # fmt: skip


def _random_classification(name: str, seed: int, batch_size: int | None) -> Task:
    """A benchmark shape: one batch of random inputs and labels (the data generator seeded by
    ``seed``, independently of the model's initialization)."""
    g = torch.Generator().manual_seed(seed)
    if name == "mlp":
        N = batch_size or 128
        model: nn.Module = nn.Sequential(
            nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10)
        )
        X, y = torch.randn(N, 784, generator=g), torch.randint(0, 10, (N,), generator=g)
    elif name == "cnn":
        N = batch_size or 64
        model = c3d3()
        X, y = torch.randn(N, 3, 32, 32, generator=g), torch.randint(0, 10, (N,), generator=g)
    else:
        N = batch_size or 16
        model = TinyGPT()
        X = torch.randint(0, 256, (N, 64), generator=g)
        y = torch.randint(0, 256, (N, 64), generator=g)
    return _classification(name, model, (X, y), (X, y), "train accuracy", None, N)


_BUILDERS: dict[str, Callable[[int, int | None], Task]] = {
    "digits-mlp": lambda seed, bs: _digits_task("digits-mlp", bs),
    "digits-cnn": lambda seed, bs: _digits_task("digits-cnn", bs),
    "transformer": lambda seed, bs: _sorting_task(bs),
    "kron-lsq": lambda seed, bs: _kron_lsq(bs),
    "char-gpt": lambda seed, bs: _char_gpt(bs),
    "autoencoder": lambda seed, bs: _autoencoder(bs),
    "digits-resnet": lambda seed, bs: _digits_resnet(bs),
    "mlp": lambda seed, bs: _random_classification("mlp", seed, bs),
    "cnn": lambda seed, bs: _random_classification("cnn", seed, bs),
    "gpt": lambda seed, bs: _random_classification("gpt", seed, bs),
}

ZOO: tuple[str, ...] = tuple(_BUILDERS)
"""Every zoo entry."""
TASKS: tuple[str, ...] = (
    "digits-mlp", "digits-cnn", "transformer", "kron-lsq", "char-gpt", "autoencoder",
    "digits-resnet",
)  # fmt: skip
"""The trainable tasks (with a target): ``beyondgrad train``."""
SMALL_TASKS: tuple[str, ...] = ("digits-mlp", "digits-cnn", "transformer", "kron-lsq")
"""The tasks solved in seconds: ``beyondgrad bench optim``'s default."""
SUITE_TASKS: tuple[str, ...] = ("char-gpt", "autoencoder", "digits-resnet", "kron-lsq")
"""The optimizer suite's tasks (``benchmarks/optim_suite.py``): minutes of AdamW each."""
PROBLEMS: tuple[str, ...] = ("mlp", "cnn", "transformer")
"""The benchmark problems: ``beyondgrad demo``, ``coverage`` and ``benchmarks/``."""
_PROBLEM_ENTRY = {"mlp": "mlp", "cnn": "cnn", "transformer": "gpt"}


def make_task(name: str, seed: int = 0, batch_size: int | None = None) -> Task:
    """Build zoo entry ``name`` on the CPU.

    Args:
        name: one of :data:`ZOO`.
        seed: seeds the global torch RNG before the model is built (its initialization) and,
            for the benchmark shapes, the data generator.
        batch_size: mini-batch size (default: the entry's own; for the benchmark shapes the
            size of their one batch).

    Returns:
        The :class:`Task`.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(ZOO)}")
    torch.manual_seed(seed)
    return _BUILDERS[name](seed, batch_size)


def make_problem(name: str, seed: int = 0, batch_size: int | None = None) -> Problem:
    """One batch of a zoo entry, for timing and tests: a benchmark problem (:data:`PROBLEMS`:
    ``mlp``, ``cnn``, ``transformer`` = the zoo's ``gpt``) or any other zoo entry (its first
    ``batch_size`` training samples). Arguments as for :func:`make_task`."""
    entry = _PROBLEM_ENTRY.get(name, name)
    if entry not in _BUILDERS:
        raise ValueError(f"unknown problem {name!r}; choose from {', '.join(PROBLEMS)}")
    problem = make_task(entry, seed, batch_size).problem(batch_size)
    problem.name = name
    return problem


__all__ = [
    "CONTEXT",
    "CORPUS_BYTES",
    "PROBLEMS",
    "SMALL_TASKS",
    "SUITE_TASKS",
    "TASKS",
    "ZOO",
    "Problem",
    "ResBlock",
    "SequenceSorter",
    "Task",
    "TinyGPT",
    "augment_digits",
    "c3d3",
    "make_problem",
    "make_task",
    "resnet",
    "stdlib_corpus",
]
