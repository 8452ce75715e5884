"""Fast conv rules: every first-order quantity against the float64 oracle, over a table of
convolution settings (1-d/2-d/3-d, transposed, stride, padding incl. 'same'/'valid', dilation,
groups, bias, padding modes) and inside CNNs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import beyondgrad as bg
from oracles.first_order import reference
from test_first_order import QUANTITIES, assert_close

N = 3

# (name, layer factory, input spatial shape)
SETTINGS = [
    ("1d-plain", lambda: nn.Conv1d(2, 3, 3), (7,)),
    ("1d-stride-pad-dil", lambda: nn.Conv1d(2, 4, 3, stride=2, padding=2, dilation=2), (9,)),
    ("1d-groups-nobias", lambda: nn.Conv1d(4, 6, 2, groups=2, bias=False), (6,)),
    ("1d-same-even", lambda: nn.Conv1d(2, 3, 4, padding="same"), (7,)),
    ("1d-reflect", lambda: nn.Conv1d(2, 3, 3, padding=2, padding_mode="reflect"), (6,)),
    ("1d-circular", lambda: nn.Conv1d(2, 3, 3, padding=1, padding_mode="circular"), (6,)),
    ("2d-plain", lambda: nn.Conv2d(2, 3, 3), (5, 6)),
    (
        "2d-rect-hyper",
        lambda: nn.Conv2d(2, 4, (2, 3), stride=(2, 1), padding=(1, 2), dilation=(1, 2)),
        (6, 7),
    ),
    ("2d-groups", lambda: nn.Conv2d(4, 6, 3, groups=2, padding=1), (4, 5)),
    ("2d-depthwise", lambda: nn.Conv2d(3, 6, 3, groups=3), (5, 5)),
    ("2d-valid", lambda: nn.Conv2d(2, 3, 2, padding="valid"), (4, 4)),
    ("2d-same-dil", lambda: nn.Conv2d(2, 3, 3, padding="same", dilation=2), (5, 6)),
    ("2d-patchify", lambda: nn.Conv2d(2, 5, 2, stride=2), (4, 6)),
    ("2d-1x1", lambda: nn.Conv2d(3, 4, 1), (3, 4)),
    ("2d-reflect", lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), (4, 5)),
    ("2d-replicate", lambda: nn.Conv2d(2, 3, 3, padding=(2, 1), padding_mode="replicate"), (4, 5)),
    (
        "2d-circular-groups",
        lambda: nn.Conv2d(4, 4, 3, padding=1, groups=2, padding_mode="circular"),
        (4, 4),
    ),
    ("3d-plain", lambda: nn.Conv3d(2, 3, 2), (3, 4, 3)),
    (
        "3d-hyper",
        lambda: nn.Conv3d(
            2, 4, (2, 1, 2), stride=(1, 2, 1), padding=1, dilation=(2, 1, 1), groups=2
        ),
        (4, 4, 3),
    ),
    ("1d-transpose", lambda: nn.ConvTranspose1d(2, 3, 3, stride=2), (4,)),
    (
        "1d-transpose-outpad",
        lambda: nn.ConvTranspose1d(2, 4, 3, stride=3, padding=1, output_padding=2, groups=2),
        (4,),
    ),
    (
        "2d-transpose",
        lambda: nn.ConvTranspose2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2)),
        (3, 4),
    ),
    (
        "2d-transpose-groups-nobias",
        lambda: nn.ConvTranspose2d(4, 6, 2, stride=2, groups=2, bias=False),
        (3, 3),
    ),
    (
        "3d-transpose",
        lambda: nn.ConvTranspose3d(2, 2, 2, stride=(1, 2, 1), output_padding=(0, 1, 0)),
        (2, 3, 2),
    ),
]


class Head(nn.Module):
    def __init__(self, layer: nn.Module, classes: int = 3):
        super().__init__()
        self.layer = layer
        self.out = nn.LazyLinear(classes)

    def forward(self, x):
        return self.out(torch.tanh(self.layer(x)).flatten(1))


def make(factory, spatial, seed=0):
    torch.manual_seed(seed)
    layer = factory()
    x = torch.randn(N, layer.in_channels, *spatial, dtype=torch.float64)
    model = Head(layer).double()
    model(x)  # materialize the lazy head
    y = torch.randint(0, 3, (N,))
    return model, x, y


@pytest.mark.parametrize("name,factory,spatial", SETTINGS, ids=[s[0] for s in SETTINGS])
def test_conv_setting(name, factory, spatial):
    model, x, y = make(factory, spatial)
    loss_fn = nn.CrossEntropyLoss()
    assert bg.coverage(model, loss_fn, x, y)[0].rule in ("conv", "conv_transpose")
    ref = reference(model, loss_fn, x, y)
    together = bg.compute(model, loss_fn, x, y, *QUANTITIES)
    for q in QUANTITIES:
        assert_close(together[q], ref[q.key], f"{name}/{q.key}")
        assert_close(bg.compute(model, loss_fn, x, y, q)[q], ref[q.key], f"{name}/{q.key}/alone")


def test_conv_transpose_with_output_size_argument():
    class Up(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1)
            self.out = nn.Linear(3 * 8 * 8, 2)

        def forward(self, x):
            return self.out(self.up(x, output_size=(8, 8)).flatten(1))

    torch.manual_seed(0)
    model = Up().double()
    x = torch.randn(N, 2, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 2, (N,))
    ref = reference(model, nn.CrossEntropyLoss(), x, y)
    res = bg.compute(model, nn.CrossEntropyLoss(), x, y, bg.BatchGrad(), bg.BatchL2())
    assert_close(res[bg.BatchGrad], ref["BatchGrad"], "output_size")


def c3d3_small(classes=3):
    return nn.Sequential(
        nn.Conv2d(3, 4, 5),
        nn.ReLU(),
        nn.ZeroPad2d((0, 1, 0, 1)),
        nn.MaxPool2d(3, 2),
        nn.Conv2d(4, 5, 3),
        nn.ReLU(),
        nn.ZeroPad2d((0, 1, 0, 1)),
        nn.MaxPool2d(3, 2),
        nn.Conv2d(5, 6, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 2 * 2, 8),
        nn.ReLU(),
        nn.Linear(8, classes),
    )


CNNS = {
    "3c3d": (c3d3_small, (3, 16, 16)),
    "cnn1d": (
        lambda: nn.Sequential(
            nn.Conv1d(2, 4, 3, padding=1, padding_mode="reflect"),
            nn.ReLU(inplace=True),
            nn.Conv1d(4, 4, 3, stride=2, groups=2),
            nn.GELU(),
            nn.AdaptiveAvgPool1d(2),
            nn.Flatten(),
            nn.Linear(8, 3),
        ),
        (2, 9),
    ),
    "cnn3d": (
        lambda: nn.Sequential(
            nn.Conv3d(1, 3, 2, padding=1),
            nn.BatchNorm3d(3).eval(),
            nn.ReLU(),
            nn.Conv3d(3, 2, 2, stride=2, padding_mode="circular", padding=1),
            nn.Flatten(),
            nn.LazyLinear(3),
        ),
        (1, 3, 4, 3),
    ),
    "unet-ish": (
        lambda: nn.Sequential(
            nn.Conv2d(2, 4, 3, stride=2, padding=1),
            nn.GroupNorm(2, 4),
            nn.ReLU(),
            nn.ConvTranspose2d(4, 2, 2, stride=2),
            nn.Flatten(),
            nn.LazyLinear(3),
        ),
        (2, 6, 6),
    ),
}


@pytest.mark.parametrize("name", sorted(CNNS))
def test_cnns(name):
    factory, shape = CNNS[name]
    torch.manual_seed(0)
    model = factory().double()
    x = torch.randn(N, *shape, dtype=torch.float64)
    model(x)
    model.eval()
    y = torch.randint(0, 3, (N,))
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    ref = reference(model, loss_fn, x, y)
    res = bg.compute(model, loss_fn, x, y, *QUANTITIES)
    for q in QUANTITIES:
        assert_close(res[q], ref[q.key], f"{name}/{q.key}")
    rules = {r.rule for r in bg.coverage(model, loss_fn, x, y)}
    assert "generic" not in rules


def test_conv_called_twice_and_subsampling():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3, padding=1, groups=2)
            self.out = nn.Linear(2 * 4 * 4, 3)

        def forward(self, x):
            return self.out(self.conv(torch.relu(self.conv(x))).flatten(1))

    torch.manual_seed(0)
    model = Twice().double()
    x = torch.randn(4, 2, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (4,))
    loss_fn = nn.CrossEntropyLoss()
    ref = reference(model, loss_fn, x, y, index=torch.tensor([2, 0]))
    res = bg.compute(model, loss_fn, x, y, *QUANTITIES, subsampling=[2, 0])
    for q in QUANTITIES:
        assert_close(res[q], ref[q.key], f"twice/{q.key}")


LAZY_CASES = {
    "2d groups stride": (nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), (2, 4, 7, 6)),
    "1d dilation reflect": (
        nn.Conv1d(3, 2, 3, dilation=2, padding=2, padding_mode="reflect"),
        (2, 3, 9),
    ),
    "3d same": (nn.Conv3d(2, 3, (2, 3, 1), padding="same", bias=False), (2, 2, 4, 5, 3)),
    "2d unpadded": (nn.Conv2d(3, 4, 2), (2, 3, 5, 5)),
}


@pytest.mark.parametrize("case", list(LAZY_CASES))
def test_lazy_conv_forms_products_by_convolution_equal_the_rows(case):
    """``project``/``combine``/``grad`` of a convolution's weight form, computed by
    convolutions without unfolding, equal the per-sample weight gradients (autograd per
    sample and vector), float64; the unfolding happens only when a reduction needs it, and
    changing the input in place afterwards changes nothing."""
    from beyondgrad.rules.conv import LazyConvForm, conv_forms

    torch.manual_seed(0)
    module, x_shape = LAZY_CASES[case]
    module = module.double()
    x = torch.randn(x_shape, dtype=torch.float64)
    K, N = 2, x_shape[0]
    out_shape = module(x).shape
    g = torch.randn(K * N, *out_shape[1:], dtype=torch.float64)
    rows = torch.stack(
        [
            torch.autograd.grad(module(x[n : n + 1]), module.weight, g[k * N + n : k * N + n + 1])[
                0
            ]
            for k in range(K)
            for n in range(N)
        ]
    )  # [K N, *weight.shape]
    form = conv_forms(module, x, g, vectors=K)["weight"]
    x.add_(1.0)  # e.g. a loader refilling its buffer: the form holds its own copy
    parts = form.parts if hasattr(form, "parts") else [form]
    assert all(isinstance(p, LazyConvForm) and p._A is None for p in parts)
    V = torch.randn(3, *module.weight.shape, dtype=torch.float64)
    C = torch.randn(K * N, 3, dtype=torch.float64)
    flat = rows.reshape(K * N, -1)
    torch.testing.assert_close(form.project(V), flat @ V.reshape(3, -1).T)
    torch.testing.assert_close(form.combine(C), (C.T @ flat).reshape(3, *module.weight.shape))
    torch.testing.assert_close(form.grad(), rows.sum(0))
    assert all(p._A is None for p in parts)  # none of them unfolded the input
    torch.testing.assert_close(form.batch_l2(), flat.square().sum(1))  # needs the rows' factors
    assert all(p._A is not None for p in parts)
    torch.testing.assert_close(form.project(V), flat @ V.reshape(3, -1).T)  # the GEMM path
