"""Small models of every supported family for float64 oracle tests.

Each ``case_*`` returns ``(model, X, y, loss_fn)``; models are in eval mode where they hold
BatchNorm. Shapes are tiny so the brute-force oracles stay fast.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

N = 5


def call_model(model: nn.Module, X):
    """``model(X)`` for tensor, tuple/list (``model(*X)``) or dict (``model(**X)``) inputs."""
    if isinstance(X, dict):
        return model(**X)
    if isinstance(X, (tuple, list)):
        return model(*X)
    return model(X)


class ResidualBlock(nn.Module):
    """Conv -> BN -> ReLU -> Conv -> BN, plus identity, in-place ReLU (torchvision style)."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return self.relu(out)


class SmallResNet(nn.Module):
    def __init__(self, c: int = 3, classes: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(1, c, 3, padding=1)
        self.block = ResidualBlock(c)
        self.fc = nn.Linear(c * 4 * 4, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.block(self.stem(x)).flatten(1))


class MLPResNet(nn.Module):
    """Linear/BatchNorm1d residual MLP with a functional GELU and a product between layers."""

    def __init__(self, d: int = 6, classes: int = 3):
        super().__init__()
        self.inp = nn.Linear(4, d)
        self.bn = nn.BatchNorm1d(d)
        self.hidden = nn.Linear(d, d)
        self.gate = nn.Linear(d, d)
        self.out = nn.Linear(d, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = F.gelu(self.bn(self.inp(x)))
        h = h + torch.relu(self.hidden(h)) * torch.sigmoid(self.gate(h))
        return self.out(h)


class HandAttention(nn.Module):
    """Causal self-attention from nn.Linear layers (qkv and output projections)."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=-1)
        q, k, v = (t.view(B, T, self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(D // self.heads)
        mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        att = att.masked_fill(~mask, float("-inf")).softmax(-1)
        return self.proj((att @ v).transpose(1, 2).reshape(B, T, D))


class TorchAttention(nn.Module):
    """Causal self-attention with nn.MultiheadAttention (generic rule)."""

    def __init__(self, d: int, heads: int, batch_first: bool = True):
        super().__init__()
        self.batch_first = batch_first
        self.attn = nn.MultiheadAttention(d, heads, batch_first=batch_first)

    def forward(self, x: Tensor) -> Tensor:
        T = x.shape[1]
        mask = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        if self.batch_first:
            return self.attn(x, x, x, attn_mask=mask, need_weights=False)[0]
        xt = x.transpose(0, 1)
        return self.attn(xt, xt, xt, attn_mask=mask, need_weights=False)[0].transpose(0, 1)


class Block(nn.Module):
    def __init__(self, d: int, heads: int, attention: str):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        if attention == "hand":
            self.attn: nn.Module = HandAttention(d, heads)
        else:
            self.attn = TorchAttention(d, heads, batch_first=attention != "torch_seq_first")
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyGPT(nn.Module):
    """Token + position embeddings, pre-LN blocks, final LN, head tied to the token embedding.
    Returns logits ``[N, V, T]`` (class axis second, as ``CrossEntropyLoss`` expects)."""

    def __init__(
        self,
        vocab: int = 11,
        d: int = 8,
        heads: int = 2,
        T: int = 4,
        attention: tuple[str, ...] = ("hand", "torch"),
    ):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(T, d)
        self.blocks = nn.ModuleList(Block(d, heads, a) for a in attention)
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight  # weight tying

    def forward(self, idx: Tensor) -> Tensor:
        B, T = idx.shape
        pos = torch.arange(T, device=idx.device).unsqueeze(0).expand(B, T)
        x = self.tok(idx) + self.pos(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x)).transpose(1, 2)


class LoopRNN(nn.Module):
    """One nn.Linear (and one input projection) applied at every step: h = tanh(Wx + Uh)."""

    def __init__(self, d_in: int = 3, d: int = 5, classes: int = 3):
        super().__init__()
        self.inp = nn.Linear(d_in, d)
        self.rec = nn.Linear(d, d, bias=False)
        self.out = nn.Linear(d, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.zeros(x.shape[0], self.rec.in_features, dtype=x.dtype)
        for t in range(x.shape[1]):
            h = torch.tanh(self.inp(x[:, t]) + self.rec(h))
        return self.out(h)


class Scaled(nn.Module):
    """A user-defined module owning a parameter and a child layer (generic rule)."""

    def __init__(self, d: int):
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, d))
        self.shift = nn.Parameter(torch.zeros(d) + 0.1)
        self.inner = nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x * self.scale) + self.shift


class TwoInputs(nn.Module):
    """Takes (image-ish, side) or a dict; uses RMSNorm and GroupNorm."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 4)
        self.b = nn.Linear(2, 4)
        self.gn = nn.GroupNorm(2, 4)
        self.rms = nn.RMSNorm(4)
        self.custom = Scaled(4)
        self.out = nn.Linear(4, 3)

    def forward(self, x: Tensor, side: Tensor) -> Tensor:
        h = self.gn(self.a(x) + self.b(side))
        return self.out(self.custom(torch.tanh(self.rms(h))))


class DictModel(TwoInputs):
    def forward(self, inputs: dict[str, Tensor]) -> Tensor:  # type: ignore[override]
        return super().forward(inputs["x"], inputs["side"])


class LSTMNet(nn.Module):
    """nn.LSTM (batch_first) through the generic rule (vmap cannot run it: per-sample loop)."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(3, 4, batch_first=True)
        self.out = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h, _ = self.lstm(x)
        return self.out(h[:, -1])


class GRUSeqFirst(nn.Module):
    """nn.GRU with the sequence axis first: the generic rule knows its layout."""

    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(3, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h, _ = self.gru(x.transpose(0, 1))
        return self.out(h[-1])


class EncoderLayerNet(nn.Module):
    """nn.TransformerEncoderLayer (its own attention, LayerNorms and Linears)."""

    def __init__(self):
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.out = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.enc(x).mean(1))


def _init(model: nn.Module, seed: int) -> nn.Module:
    """Give BatchNorm non-trivial running statistics and affine parameters."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)):
            with torch.no_grad():
                if m.weight is not None:
                    m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                if getattr(m, "bias", None) is not None:
                    m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
    return model.double().eval()


def case_mlp(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Sigmoid(), nn.Linear(5, 3)
    )
    return (
        _init(model, seed),
        torch.randn(N, 4, dtype=torch.float64),
        torch.randint(0, 3, (N,)),
        nn.CrossEntropyLoss(),
    )


def case_inplace_relu(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(4, 6),
        nn.ReLU(inplace=True),
        nn.Linear(6, 6),
        nn.ReLU(inplace=True),
        nn.Linear(6, 3),
    )
    return (
        _init(model, seed),
        torch.randn(N, 4, dtype=torch.float64),
        torch.randint(0, 3, (N,)),
        nn.CrossEntropyLoss(),
    )


def case_seq_linear(seed: int = 0):
    """nn.Linear on [N, T, d] inputs (shared axis) with in-place ReLU on the 3-d output."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(inplace=True), nn.Linear(5, 2))
    X = torch.randn(N, 4, 3, dtype=torch.float64)
    return _init(model, seed), X, torch.randn(N, 4, 2, dtype=torch.float64), nn.MSELoss()


def case_resnet(seed: int = 0):
    torch.manual_seed(seed)
    X = torch.randn(N, 1, 4, 4, dtype=torch.float64)
    return _init(SmallResNet(), seed), X, torch.randint(0, 4, (N,)), nn.CrossEntropyLoss()


def case_mlp_resnet(seed: int = 0):
    torch.manual_seed(seed)
    X = torch.randn(N, 4, dtype=torch.float64)
    return (
        _init(MLPResNet(), seed),
        X,
        torch.randint(0, 3, (N,)),
        nn.CrossEntropyLoss(reduction="sum"),
    )


def case_gpt(seed: int = 0, attention: tuple[str, ...] = ("hand", "torch")):
    torch.manual_seed(seed)
    model = TinyGPT(attention=attention)
    idx = torch.randint(0, 11, (N, 4))
    return _init(model, seed), idx, torch.randint(0, 11, (N, 4)), nn.CrossEntropyLoss()


def case_gpt_seq_first(seed: int = 0):
    return case_gpt(seed, attention=("torch_seq_first",))


def case_rnn(seed: int = 0):
    torch.manual_seed(seed)
    X = torch.randn(N, 3, 3, dtype=torch.float64)
    return _init(LoopRNN(), seed), X, torch.randint(0, 3, (N,)), nn.CrossEntropyLoss()


def case_two_inputs(seed: int = 0):
    torch.manual_seed(seed)
    X = (torch.randn(N, 6, dtype=torch.float64), torch.randn(N, 2, dtype=torch.float64))
    return (
        _init(TwoInputs(), seed),
        X,
        torch.randn(N, 3, dtype=torch.float64),
        nn.MSELoss(reduction="sum"),
    )


def case_dict_inputs(seed: int = 0):
    torch.manual_seed(seed)
    X = {
        "inputs": {
            "x": torch.randn(N, 6, dtype=torch.float64),
            "side": torch.randn(N, 2, dtype=torch.float64),
        }
    }
    y = (torch.rand(N, 3, dtype=torch.float64) > 0.5).double()
    return _init(DictModel(), seed), X, y, nn.BCEWithLogitsLoss()


def case_lstm(seed: int = 0):
    torch.manual_seed(seed)
    X = torch.randn(N, 4, 3, dtype=torch.float64)
    return _init(LSTMNet(), seed), X, torch.randint(0, 3, (N,)), nn.CrossEntropyLoss()


def case_gru_seq_first(seed: int = 0):
    torch.manual_seed(seed)
    X = torch.randn(N, 4, 3, dtype=torch.float64)
    return _init(GRUSeqFirst(), seed), X, torch.randint(0, 3, (N,)), nn.CrossEntropyLoss()


def case_encoder_layer(seed: int = 0):
    torch.manual_seed(seed)
    X = torch.randn(N, 3, 8, dtype=torch.float64)
    return _init(EncoderLayerNet(), seed), X, torch.randint(0, 3, (N,)), nn.CrossEntropyLoss()


CASES = {
    "mlp": case_mlp,
    "inplace_relu": case_inplace_relu,
    "seq_linear": case_seq_linear,
    "resnet": case_resnet,
    "mlp_resnet": case_mlp_resnet,
    "gpt": case_gpt,
    "gpt_seq_first": case_gpt_seq_first,
    "rnn": case_rnn,
    "two_inputs": case_two_inputs,
    "dict_inputs": case_dict_inputs,
    "lstm": case_lstm,
    "gru_seq_first": case_gru_seq_first,
    "encoder_layer": case_encoder_layer,
}


class SharedAxisNet(nn.Module):
    """Layers called without a sample axis, as real models do: a position embedding on
    ``torch.arange(T)`` (nanoGPT) and on ``position_ids`` ``[1, T]`` (Hugging Face), a
    relative-attention bias embedding on a ``[T, T]`` bucket matrix (T5) and a projection of
    learned latents ``[L, d]`` (Perceiver). Returns logits ``[N, V, T]``."""

    def __init__(self, vocab: int = 7, d: int = 6, T: int = 4, heads: int = 2, latents: int = 3):
        super().__init__()
        self.heads = heads
        self.tok = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(T, d)  # on arange(T)
        self.hf_pos = nn.Embedding(T, d)  # on position_ids [1, T]
        self.rel = nn.Embedding(2 * T - 1, heads)  # on the [T, T] relative positions
        self.qkv = nn.Linear(d, 3 * d)
        self.latents = nn.Parameter(torch.randn(latents, d))
        self.q_proj = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx: Tensor) -> Tensor:
        T = idx.shape[1]
        position_ids = torch.arange(T, device=idx.device)
        x = self.tok(idx) + self.wpe(position_ids) + self.hf_pos(position_ids.unsqueeze(0))
        q, k, v = (
            t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in self.qkv(x).chunk(3, -1)
        )
        buckets = position_ids[None, :] - position_ids[:, None] + T - 1  # [T, T]
        bias = self.rel(buckets).permute(2, 0, 1).unsqueeze(0)  # [1, H, T, T]
        att = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5 + bias, -1)
        x = x + (att @ v).transpose(1, 2).flatten(2)
        lat = self.q_proj(self.latents)  # [L, d]: no sample axis
        cross = torch.softmax(x @ lat.T, -1) @ lat  # [N, T, d]
        return self.head(torch.tanh(x + cross)).transpose(1, 2)


def case_shared_axis(seed: int = 0, num_samples: int = N, T: int = 4):
    """:class:`SharedAxisNet`; ``num_samples == T`` is the coincidence that used to fool the
    sample-axis inference."""
    torch.manual_seed(seed)
    model = SharedAxisNet(T=T)
    idx = torch.randint(0, 7, (num_samples, T))
    return _init(model, seed), idx, torch.randint(0, 7, (num_samples, T)), nn.CrossEntropyLoss()
