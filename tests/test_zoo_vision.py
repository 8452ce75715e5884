"""The vision zoo: torchvision and timm models (random weights, nothing downloaded) at tiny
input sizes or widths, in float64 eval mode, against brute-force oracles: BatchGrad and BatchL2
(a per-sample loop), DiagGGN (one backward per output coordinate and sample, ``J^T S``),
``bg.linops.GGN`` products (the same vectors), and KFAC (every conv/linear weight served by a
Kronecker block; with one sample the classifier's block equals its exact GGN block).

torchvision and timm are optional: these tests skip without them (CI runs torch 2.13 CPU,
beside which PyPI's torchvision does not import, so they skip there; run them in a venv with
``torch==2.14.1 torchvision==0.29.1 timm``, see ``benchmarks/zoo_vision.py``). The patterns
these models use that broke or could break -- stochastic depth, layer scale,
squeeze-excitation with Hardsigmoid/Hardswish, channels-last memory, frozen BatchNorm,
``LayerNorm`` over permuted channels, depthwise convolutions, class tokens and position
embeddings as parameters -- are rebuilt from plain torch modules in :class:`PatternNet`, which
runs everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

import beyondgrad as bg
from loops import train_losses
from oracles.first_order import call, reference

CLASSES, N = 3, 2


# -- oracles ----------------------------------------------------------------------------------
def ggn_vectors(model: nn.Module, loss_fn: nn.Module, X: Tensor, y: Tensor) -> list[Tensor]:
    """Flat ``J_n^T s_nk`` for every sample ``n`` and column ``s_nk`` of a square root of the
    loss Hessian w.r.t. that sample's output (the GGN is the sum of their outer products)."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = model(X)
    hess = torch.func.hessian(lambda o: loss_fn(o, y))(out.detach())
    rows = []
    for n in range(out.shape[0]):
        H = hess[n, :, n, :]
        lam, Q = torch.linalg.eigh(H)
        S = Q * lam.clamp_min(0).sqrt()
        for k in range(S.shape[1]):
            u = torch.zeros_like(out)
            u[n] = S[:, k]
            g = torch.autograd.grad(out, params, u, retain_graph=True, allow_unused=True)
            flat = [gi if gi is not None else torch.zeros_like(p) for gi, p in zip(g, params)]
            rows.append(torch.cat([t.reshape(-1) for t in flat]))
    return rows


def _split(model: nn.Module, flat: Tensor) -> dict[str, Tensor]:
    out, start = {}, 0
    for name, p in model.named_parameters():
        out[name] = flat[start : start + p.numel()].reshape(p.shape)
        start += p.numel()
    return out


def _rel(actual: dict[str, Tensor], expected: dict[str, Tensor]) -> float:
    """The largest relative error over the parameters (norm of the difference / norm)."""
    assert set(actual) == set(expected), set(actual) ^ set(expected)
    worst = 0.0
    for k, v in expected.items():
        scale = max(float(v.norm()), 1e-30)
        worst = max(worst, float((actual[k] - v).norm()) / scale)
    return worst


def classifier(model: nn.Module) -> str:
    """Name of the last ``nn.Linear`` (the classifier head)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]


def check(model: nn.Module, X: Tensor, y: Tensor) -> dict[str, float]:
    """Relative errors of beyondgrad against the oracles on one model (float64, eval)."""
    loss_fn = nn.CrossEntropyLoss()
    errors: dict[str, float] = {}
    first = reference(model, loss_fn, X, y)
    diag = bg.DiagGGN(max_vectors=CLASSES)
    res = bg.compute(model, loss_fn, X, y, bg.BatchGrad(), bg.BatchL2(), diag)
    errors["BatchGrad"] = _rel(res[bg.BatchGrad()], first["BatchGrad"])
    errors["BatchL2"] = _rel(res[bg.BatchL2()], first["BatchL2"])
    rows = ggn_vectors(model, loss_fn, X, y)
    errors["DiagGGN"] = _rel(res[diag], _split(model, sum(r.pow(2) for r in rows)))
    v = torch.randn(rows[0].numel(), generator=torch.Generator().manual_seed(0), dtype=X.dtype)
    G = bg.linops.GGN(model, loss_fn, [(X, y)])
    errors["GGN @ v"] = _rel({"v": G @ v}, {"v": sum(r * (r @ v) for r in rows)})
    errors["KFAC head (N=1)"] = check_kfac(model, loss_fn, X[:1], y[:1])
    return errors


def weight_matrices(model: nn.Module) -> set[str]:
    """Names of every weight matrix: those of ``nn.Linear``/``nn.Conv2d`` modules and the
    in-projections of ``nn.MultiheadAttention`` (which beyondgrad re-expresses as Linear
    calls, ``out_proj`` included)."""
    names = set()
    for n, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)) and m.weight.requires_grad:
            names.add(f"{n}.weight")
        if isinstance(m, nn.MultiheadAttention):
            names.add(f"{n}.in_proj_weight")
    return names


def check_kfac(model: nn.Module, loss_fn: nn.Module, X: Tensor, y: Tensor) -> float:
    """Every weight matrix (:func:`weight_matrices`) has a Kronecker block; with one sample
    the classifier's block ``B kron A`` equals its exact GGN block."""
    blocks = bg.compute(model, loss_fn, X, y, bg.KFAC(fisher_type="type-2"))[bg.KFAC]
    kron = {p for b in blocks.values() if isinstance(b, bg.KroneckerFactors) for p in b.params}
    missing = weight_matrices(model) - kron
    assert not missing, f"conv/linear weights without a Kronecker block: {sorted(missing)}"
    head = classifier(model)
    block = blocks[head]
    rows = ggn_vectors(model, loss_fn, X, y)
    W = dict(model.named_parameters())[f"{head}.weight"]
    names = [n for n, _ in model.named_parameters()]
    start = sum(
        p.numel()
        for n, p in model.named_parameters()
        if names.index(n) < names.index(f"{head}.weight")
    )
    O, I = W.shape
    w_rows = [r[start : start + O * I].reshape(O, I) for r in rows]
    if block.bias == "joint":
        b_start = start + O * I
        w_rows = [torch.cat([w, r[b_start : b_start + O, None]], 1) for w, r in zip(w_rows, rows)]
    flat = [w.reshape(-1) for w in w_rows]
    ref = sum(torch.outer(f, f) for f in flat)
    return float((block.to_dense() - ref).norm() / ref.norm())


def run_case(build: Callable[[], nn.Module], size: int) -> dict[str, float]:
    """Build a model (seeded), float64 eval, random images ``[N, 3, size, size]``."""
    torch.manual_seed(0)
    model = build().double().eval()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(N, 3, size, size, generator=g, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (N,), generator=g)
    return check(model, X, y)


# -- plain-torch patterns (run everywhere) --------------------------------------------------
class StochasticDepth(nn.Module):
    """Drops the residual branch per sample in training; the identity in eval."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        keep = torch.rand(x.shape[0], *([1] * (x.ndim - 1)), device=x.device) >= self.p
        return x * keep / (1 - self.p)


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm with fixed statistics and affine parameters held as buffers."""

    def __init__(self, c: int):
        super().__init__()
        self.register_buffer("weight", torch.rand(c) + 0.5)
        self.register_buffer("bias", torch.randn(c))
        self.register_buffer("running_mean", torch.randn(c))
        self.register_buffer("running_var", torch.rand(c) + 0.5)

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * (self.running_var + 1e-5).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale[:, None, None] + shift[:, None, None]


class SqueezeExcite(nn.Module):
    """MobileNetV3-style: pool, 1x1 conv, ReLU, 1x1 conv, Hardsigmoid gate."""

    def __init__(self, c: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Conv2d(c, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, c, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: Tensor) -> Tensor:
        s = self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1))))
        return x * self.gate(s)


class ConvNeXtBlock(nn.Module):
    """Depthwise conv, LayerNorm over permuted channels, MLP, layer scale, stochastic depth."""

    def __init__(self, c: int):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.norm = nn.LayerNorm(c)
        self.fc1 = nn.Linear(c, 2 * c)
        self.fc2 = nn.Linear(2 * c, c)
        self.gamma = nn.Parameter(torch.full((c,), 0.5))
        self.drop = StochasticDepth(0.2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(self.dw(x).permute(0, 2, 3, 1))
        h = self.fc2(F.gelu(self.fc1(h))) * self.gamma
        return x + self.drop(h.permute(0, 3, 1, 2))


class PatternNet(nn.Module):
    """Stem conv + frozen BN (channels-last input), SE block with Hardswish, ConvNeXt block,
    then a ViT-style token stage (class token and position embedding parameters, attention
    through ``F.scaled_dot_product_attention``), and a linear head."""

    def __init__(self, c: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, stride=2, padding=1, bias=False)
        self.bn = FrozenBatchNorm2d(c)
        self.act = nn.Hardswish()
        self.se = SqueezeExcite(c, 2)
        self.block = ConvNeXtBlock(c)
        self.cls = nn.Parameter(torch.randn(1, 1, c) * 0.1)
        self.pos = nn.Parameter(torch.randn(1, 5, c) * 0.1)
        self.qkv = nn.Linear(c, 3 * c)
        self.head = nn.Linear(c, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        h = self.block(self.se(self.act(self.bn(self.stem(x)))))
        h = F.adaptive_avg_pool2d(h, 2).flatten(2).transpose(1, 2)  # [N, 4, c]
        t = torch.cat([self.cls.expand(h.shape[0], -1, -1), h], 1) + self.pos
        q, k, v = self.qkv(t).chunk(3, -1)
        t = t + F.scaled_dot_product_attention(q, k, v)
        return self.head(t[:, 0])


def test_plain_torch_vision_patterns():
    errors = run_case(PatternNet, 8)
    for what, err in errors.items():
        assert err < 1e-9, (what, errors)


# -- torchvision and timm (skipped without them) ----------------------------------------------
def torchvision_models() -> dict[str, tuple[Callable[[], nn.Module], int]]:
    tv = pytest.importorskip("torchvision")
    from torchvision.models.convnext import CNBlockConfig

    M = tv.models
    return {
        "tv_resnet18": (lambda: M.resnet18(num_classes=CLASSES), 16),
        "tv_mobilenet_v3_small": (lambda: M.mobilenet_v3_small(num_classes=CLASSES), 32),
        "tv_efficientnet_b0": (lambda: M.efficientnet_b0(num_classes=CLASSES), 32),
        "tv_vit (vit_b_16 class, tiny)": (
            lambda: M.VisionTransformer(
                image_size=32,
                patch_size=16,
                num_layers=1,
                num_heads=2,
                hidden_dim=8,
                mlp_dim=16,
                num_classes=CLASSES,
            ),
            32,
        ),
        "tv_convnext (convnext_tiny class, tiny)": (
            lambda: M.ConvNeXt(
                [CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)],
                stochastic_depth_prob=0.1,
                num_classes=CLASSES,
            ),
            16,
        ),
    }


def timm_models() -> dict[str, tuple[Callable[[], nn.Module], int]]:
    timm = pytest.importorskip("timm")

    def make(name: str, **kw: Any) -> Callable[[], nn.Module]:
        return lambda: timm.create_model(name, pretrained=False, num_classes=CLASSES, **kw)

    return {
        "timm_vit_tiny": (make("vit_tiny_patch16_224", img_size=32, depth=1), 32),
        "timm_resnet10t": (make("resnet10t"), 32),
        "timm_convnext_atto": (make("convnext_atto", depths=(1, 1, 1, 1), dims=(8, 8, 16, 16)), 32),
        "timm_mixer (MlpMixer, tiny)": (
            lambda: timm.models.mlp_mixer.MlpMixer(
                num_classes=CLASSES, img_size=32, patch_size=16, num_blocks=1, embed_dim=16
            ),
            32,
        ),
    }


TOLERANCE = 1e-8


@pytest.mark.parametrize("index", range(5))
def test_torchvision_models(index):
    name, (build, size) = sorted(torchvision_models().items())[index]
    errors = run_case(build, size)
    bad = {k: v for k, v in errors.items() if not v < TOLERANCE}
    assert not bad, (name, errors)


@pytest.mark.parametrize("index", range(4))
def test_timm_models(index):
    name, (build, size) = sorted(timm_models().items())[index]
    errors = run_case(build, size)
    bad = {k: v for k, v in errors.items() if not v < TOLERANCE}
    assert not bad, (name, errors)


# -- the optimizers at their defaults ---------------------------------------------------------
def _zoo() -> list[tuple[str, Callable[[], nn.Module], int]]:
    models = [("PatternNet", PatternNet, 8)]
    for table in (torchvision_models, timm_models):
        try:
            models += [(k, b, s) for k, (b, s) in sorted(table().items())]
        except pytest.skip.Exception:
            pass
    return models


def optimizer_run(build: Callable[[], nn.Module], size: int, optimizer: str) -> list[float]:
    """``optimizer`` at its defaults for 20 steps on one fixed batch (float32, eval mode, 4
    images): asserts that KFAC/SINGD precondition every weight matrix; returns the losses."""
    torch.manual_seed(0)
    model = build().float().eval()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(4, 3, size, size, generator=g, dtype=torch.float32)
    y = torch.randint(0, CLASSES, (4,), generator=g)
    loss_fn = nn.CrossEntropyLoss()
    cls = getattr(bg.optim, optimizer)
    opt = cls(model) if optimizer == "SIRFShampoo" else cls(model, loss_fn)
    if optimizer != "SIRFShampoo":
        routed = {n for n, (target, _) in opt.routes.items() if target == optimizer.lower()}
        expected = weight_matrices(model)  # grouped (depthwise) convolutions included
        assert expected <= routed, opt.routing()
    return train_losses(opt, model, loss_fn, X, y, 20)


@pytest.mark.parametrize("optimizer", ["KFAC", "SINGD", "SIRFShampoo"])
@pytest.mark.parametrize("index", range(10))
def test_default_optimizers_precondition_and_lower_the_loss(index, optimizer):
    """Every zoo model: KFAC and SINGD route every weight matrix (attention in-projections
    and ``out_proj``, grouped and depthwise convolutions included) to their Kronecker blocks,
    and 20 default steps lower the loss without a
    non-finite value (which would raise)."""
    models = _zoo()
    if index >= len(models):
        pytest.skip("torchvision/timm not installed")
    name, build, size = models[index]
    losses = optimizer_run(build, size, optimizer)
    assert all(math.isfinite(v) for v in losses), (name, losses)
    assert losses[-1] < losses[0], (name, losses)


__all__ = ["call", "check", "optimizer_run", "run_case", "timm_models", "torchvision_models"]
