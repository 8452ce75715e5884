"""Built-in problems (model, loss, generated data) shared by the demo, benchmarks and tests.

* ``mlp``: 784-512-256-10 ReLU MLP, batch 128, cross-entropy (535,818 parameters).
* ``cnn``: DeepOBS 3C3D on 3x32x32, batch 64, cross-entropy (895,210 parameters).
* ``transformer``: 2-layer pre-LN GPT, d=128, 4 heads, vocab 256, sequence 64, batch 16, MLP
  with GELU, causal attention written with ``nn.Linear``, head tied to the token embedding,
  cross-entropy averaged over tokens.

Data are random tensors from a seeded generator: nothing is downloaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class Problem:
    name: str
    model: nn.Module
    loss_fn: nn.Module
    X: Tensor
    y: Tensor

    def to(self, device: str | torch.device) -> Problem:
        return Problem(
            self.name,
            self.model.to(device),
            self.loss_fn.to(device),
            self.X.to(device),
            self.y.to(device),
        )

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


class CausalSelfAttention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=-1)
        q, k, v = (t.view(B, T, self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(D // self.heads))
        mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        att = att.masked_fill(~mask, float("-inf")).softmax(-1)
        return self.proj((att @ v).transpose(1, 2).reshape(B, T, D))


class GPTBlock(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, heads)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyGPT(nn.Module):
    """Returns logits ``[N, vocab, T]`` (class axis second, for ``nn.CrossEntropyLoss``)."""

    def __init__(
        self, vocab: int = 256, d: int = 128, heads: int = 4, layers: int = 2, max_len: int = 64
    ):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(max_len, d)
        self.blocks = nn.ModuleList(GPTBlock(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, idx: Tensor) -> Tensor:
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


PROBLEMS = ("mlp", "cnn", "transformer")


def make_problem(name: str, seed: int = 0, batch_size: int | None = None) -> Problem:
    """Build a built-in problem on the CPU in float32."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
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
    elif name == "transformer":
        N = batch_size or 16
        model = TinyGPT()
        X = torch.randint(0, 256, (N, 64), generator=g)
        y = torch.randint(0, 256, (N, 64), generator=g)
    else:
        raise ValueError(f"unknown problem {name!r}; choose from {PROBLEMS}")
    return Problem(name, model, nn.CrossEntropyLoss(), X, y)
